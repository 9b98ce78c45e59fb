"""Could a greedy row skip most of the lm_head? A cheap product screens the vocabulary, a bound on
its error keeps every row that could still be the argmax, and only those are recomputed exactly.

    python benchmarks/head_screen.py [--prompts 64] [--tokens 32]

The hidden states are the embedded model's own (bfloat16): random-token prompts of 64 tokens
(the side-by-side trace's shape) decoded greedily, every state the lm_head sees captured. Two
screens, each with a bound that holds for every row (Cauchy-Schwarz on each rounding term):
  w8a8: per-token int8 activations times per-row int8 weights (--quantization w8a8's head):
        |err| <= ||h|| ||W_i - W'_i|| + ||h - h'|| ||W'_i||
  int8 weights: bfloat16 activations times per-row int8 weights: |err| <= ||h|| ||W_i - W'_i||
A vocabulary row stays a candidate when its screened logit plus the bound reaches the largest
screened logit minus the bound. Prints the bound against the true error (float64) and the
candidates per token; writes JSON. Then rank-k screens: h and W projected on k directions,
  |err| <= ||h - h_k|| ||W_i - W_i,k||, for the embedding's singular directions and for the
  states' own principal directions.
"""

from __future__ import annotations

import argparse
import random

import torch
from bench_json import write_json

from slserve import LLM, SamplingParams
from slserve.model.quant import Int8Weight, quantize_rows


def capture_states(prompts: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lm_head's inputs over a greedy run, [N, hidden], and its weight [vocab, hidden]."""
    llm = LLM()
    model = llm.engine.runner.model
    states = []
    head = model._lm_head

    def recording_head(h: torch.Tensor) -> torch.Tensor:
        states.append(h.clone())
        return head(h)

    model._lm_head = recording_head
    rng = random.Random(seed)
    vocab = model.cfg.vocab_size
    batch = [[rng.randrange(vocab) for _ in range(64)] for _ in range(prompts)]
    llm.generate(batch, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    return torch.cat(states), model.lm_head.data


def screen(approx: torch.Tensor, bound: torch.Tensor, exact: torch.Tensor) -> dict:
    err = (approx.double() - exact).abs()
    top = (approx - bound).amax(dim=1, keepdim=True)
    keep = approx + bound >= top
    truth = exact.argmax(dim=1)
    counts = keep.sum(dim=1).float()
    return {
        "bound_mean": bound.mean().item(),
        "error_mean": err.mean().item(),
        "error_over_bound_max": (err / bound.double()).max().item(),
        "argmax_kept": bool(keep[torch.arange(len(truth)), truth].all()),
        "candidates_mean": counts.mean().item(),
        "candidates_median": counts.median().item(),
        "candidates_p90": counts.quantile(0.9).item(),
        "candidates_max": counts.max().item(),
    }


def low_rank_screen(h: torch.Tensor, w: torch.Tensor, v: torch.Tensor, exact: torch.Tensor) -> dict:
    """h [N, d] and w [vocab, d] projected on the orthonormal columns of v [d, k]."""
    hk, wk = h @ v, w @ v
    h_perp = (h - hk @ v.t()).norm(dim=1, keepdim=True)
    w_perp = (w - wk @ v.t()).norm(dim=1)
    result = screen((hk @ wk.t()).float(), (h_perp * w_perp).float(), exact)
    return result | {"norm_outside_mean": (h_perp.squeeze(1) / h.norm(dim=1)).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256], help="rank-k screens' k")
    ap.add_argument("--out", default="benchmarks/results/head_screen.json")
    args = ap.parse_args()

    states, weight = capture_states(args.prompts, args.tokens, args.seed)
    h, w = states.float(), weight.float()
    exact = h.double() @ w.double().t()
    wq = Int8Weight.quantize(w)
    w8 = wq.dequantize()
    w_err = (w - w8).norm(dim=1)
    hq, hs = quantize_rows(h)
    h8 = hq.float() * hs[:, None]
    h_norm = h.norm(dim=1, keepdim=True)
    h_err = (h - h8).norm(dim=1, keepdim=True)
    results = {
        "w8a8": screen(h8 @ w8.t(), h_norm * w_err + h_err * w8.norm(dim=1), exact),
        "int8 weights": screen(h @ w8.t(), h_norm * w_err, exact),
    }
    # Rank-k screens: h and W projected on k orthonormal directions V, |err| <= ||h_perp|| ||W_i,perp||.
    # The embedding's own right singular directions (fixed by the weights), and the principal
    # directions of these very states (fitted to the test set: the most favourable case).
    svd_dirs = torch.linalg.svd(w.double(), full_matrices=False).Vh.t()
    pca_dirs = torch.linalg.eigh(h.double().t() @ h.double()).eigenvectors.flip(1)
    directions = {"embedding's singular directions": svd_dirs, "states' principal directions": pca_dirs}
    for name, dirs in directions.items():
        for k in args.ranks:
            results[f"rank {k}, {name}"] = low_rank_screen(h.double(), w.double(), dirs[:, :k], exact)
    largest = h.abs().amax(dim=1)
    print(f"{len(h)} hidden states; |h| {h_norm.mean():.1f} on average, its largest element "
          f"{largest.mean():.1f}")
    print("| screen | bound (mean) | error (mean) | error / bound (max) | argmax kept "
          f"| candidates mean / median / p90 / max (of {w.shape[0]}) |")
    print("|---|---:|---:|---:|---|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['bound_mean']:.2f} | {r['error_mean']:.3f} | {r['error_over_bound_max']:.2f} "
              f"| {r['argmax_kept']} | {r['candidates_mean']:.1f} / {r['candidates_median']:.0f} / "
              f"{r['candidates_p90']:.0f} / {r['candidates_max']:.0f} |")
    for name, r in results.items():
        if "norm_outside_mean" in r:
            print(f"{name}: {100 * r['norm_outside_mean']:.1f}% of a state's norm outside the k directions")
    write_json(args.out, {"args": vars(args), "states": len(h), "norm_mean": h_norm.mean().item(),
                          "largest_mean": largest.mean().item(), "screens": results})


if __name__ == "__main__":
    main()
