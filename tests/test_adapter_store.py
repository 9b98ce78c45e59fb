"""The disk tier and the host-RAM LRU tier of adapters."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save
from transformers import LlamaConfig, LlamaForCausalLM

from slserve.adapters.peft_format import AdapterError, LoRAAdapter, parse_peft_adapter
from slserve.config import ModelConfig
from slserve.memory import adapter_store
from slserve.memory.adapter_store import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStore,
    validate_name,
)

# peft calls a transformers method that transformers 5 deprecates; not this project's concern.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def model_config() -> ModelConfig:
    """The ModelConfig of the tiny Llama below, written out by hand."""
    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        qkv_bias=False,
        eos_token_ids=(0,),
        bos_token_id=None,
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a real peft adapter: rank 2 on q_proj and v_proj of both layers."""
    path = tmp_path_factory.mktemp("template")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    peft_model = get_peft_model(llama, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_()
    peft_model.save_pretrained(str(path))
    return json.loads((path / CONFIG_FILE).read_text()), load_file(path / WEIGHTS_FILE)


def variant(
    template, i: int, rank: int | None = None, alpha: int = 4
) -> tuple[bytes, bytes, dict[str, torch.Tensor]]:
    """Adapter number i: the template's tensors shifted by i / 64 (or fresh ones of another rank)."""
    config, tensors = dict(template[0], lora_alpha=alpha), template[1]
    if rank is None:
        new = {k: v + i / 64 for k, v in tensors.items()}  # distinct, and within the gain bound
    else:
        config["r"] = rank
        g = torch.Generator().manual_seed(i)
        new = {
            k: torch.randn((rank, v.shape[1]) if ".lora_A." in k else (v.shape[0], rank), generator=g)
            for k, v in tensors.items()
        }
    return json.dumps(config).encode(), save(new), new


def assert_is(adapter: LoRAAdapter, tensors: dict[str, torch.Tensor]) -> None:
    """The parsed adapter holds exactly these PEFT tensors."""
    for key, t in tensors.items():
        layer = int(key.split("layers.")[1].split(".")[0])
        module = "q_proj" if ".q_proj." in key else "v_proj"
        w = adapter.modules[(layer, module)]
        assert torch.equal(w.a if ".lora_A." in key else w.b, t), key


def parsed(v: tuple[bytes, bytes, dict]) -> LoRAAdapter:
    return parse_peft_adapter(v[0], v[1], model_config(), 16, "probe")


def make_store(root: Path, host_cache_bytes: int = 1 << 20, max_rank: int = 16) -> AdapterStore:
    return AdapterStore(root, model_config(), max_rank=max_rank, host_cache_bytes=host_cache_bytes)


def write_dir(path: Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_bytes(config_bytes)
    (path / WEIGHTS_FILE).write_bytes(weights_bytes)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def test_startup_registers_without_parsing(tmp_path: Path, template, monkeypatch) -> None:
    expected = {}
    for i in range(3):
        config_bytes, weights_bytes, expected[f"a{i}"] = variant(template, i)
        write_dir(tmp_path / f"a{i}", config_bytes, weights_bytes)
    write_dir(tmp_path / "broken", b"{not json", b"")
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "bad name").mkdir()
    (tmp_path / "stray.txt").write_text("x")

    def no_parsing(*args, **kwargs):
        raise AssertionError("the store parsed an adapter at start-up")

    monkeypatch.setattr(adapter_store, "load_peft_adapter", no_parsing)
    monkeypatch.setattr(adapter_store, "parse_peft_adapter", no_parsing)
    store = make_store(tmp_path)
    monkeypatch.undo()

    assert store.names() == ["a0", "a1", "a2", "broken"]
    assert "a1" in store and "not-an-adapter" not in store and len(store) == 4
    stats = store.stats()
    assert stats["disk_count"] == 4
    assert stats["disk_bytes"] == sum(dir_size(tmp_path / n) for n in store.names())
    assert (stats["host_count"], stats["disk_loads"], stats["host_misses"]) == (0, 0, 0)
    info = store.info("a1")
    assert info.size_bytes == dir_size(tmp_path / "a1")
    assert info.ranks is None and info.target_modules is None

    assert_is(store.get("a1"), expected["a1"])
    info = store.info("a1")
    assert info.ranks == {"q_proj": 2, "v_proj": 2} and info.target_modules == ("q_proj", "v_proj")
    assert store.info("a2", parse=True).ranks == {"q_proj": 2, "v_proj": 2}
    # A broken directory is registered lazily and reported when first used.
    with pytest.raises(AdapterError, match="not valid JSON"):
        store.get("broken")
    assert store.stats()["disk_loads"] == 2


def test_add_replace_remove(tmp_path: Path, template) -> None:
    store = make_store(tmp_path)
    c1, w1, t1 = variant(template, 1)
    c2, w2, t2 = variant(template, 2, rank=3)
    info = store.add_from_bytes("x", c1, w1)
    assert info.ranks == {"q_proj": 2, "v_proj": 2} and info.size_bytes == len(c1) + len(w1)
    assert (tmp_path / "x" / WEIGHTS_FILE).read_bytes() == w1
    assert_is(store.get("x"), t1)

    with pytest.raises(AdapterExistsError, match="already exists") as exists:
        store.add_from_bytes("x", c2, w2)
    assert isinstance(exists.value, AdapterError)
    assert_is(store.get("x"), t1)

    info = store.add_from_bytes("x", c2, w2, replace=True)
    assert info.ranks == {"q_proj": 3, "v_proj": 3}
    assert (tmp_path / "x" / WEIGHTS_FILE).read_bytes() == w2
    assert_is(store.get("x"), t2)
    assert store.get("x").max_rank == 3

    store.remove("x")
    assert "x" not in store and store.names() == []
    assert list(tmp_path.iterdir()) == []  # no working directories left behind either
    assert store.stats()["host_count"] == store.stats()["host_bytes"] == 0
    with pytest.raises(AdapterNotFoundError, match="'x' not found") as missing:
        store.get("x")
    assert isinstance(missing.value, KeyError) and isinstance(missing.value, AdapterError)
    assert str(missing.value) == "adapter 'x' not found"
    with pytest.raises(AdapterNotFoundError):
        store.remove("x")
    with pytest.raises(AdapterNotFoundError):
        store.info("x")


def test_add_from_path_copies_only_adapter_files(tmp_path: Path, template) -> None:
    config_bytes, weights_bytes, tensors = variant(template, 5)
    src = tmp_path / "src"
    write_dir(src, config_bytes, weights_bytes)
    (src / "README.md").write_text("model card")
    store = make_store(tmp_path / "store")
    store.add_from_path("from-path", src)
    assert sorted(p.name for p in (tmp_path / "store" / "from-path").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert_is(store.get("from-path"), tensors)
    with pytest.raises(AdapterExistsError):
        store.add_from_path("from-path", src)


def test_survives_restart(tmp_path: Path, template) -> None:
    store = make_store(tmp_path)
    expected = {}
    for i in range(3):
        config_bytes, weights_bytes, expected[f"r{i}"] = variant(template, i)
        store.add_from_bytes(f"r{i}", config_bytes, weights_bytes)
    store.remove("r1")
    infos = {n: store.info(n) for n in store.names()}

    again = make_store(tmp_path)
    assert again.names() == ["r0", "r2"]
    for name in again.names():
        assert again.info(name).created == infos[name].created
        assert again.info(name).size_bytes == infos[name].size_bytes
        assert_is(again.get(name), expected[name])


BAD_NAMES = ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "a b", "x" * 65, "é", "a\x00b", "~tmp", "a:b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_refused(tmp_path: Path, template, name: str) -> None:
    store = make_store(tmp_path / "store")
    config_bytes, weights_bytes, _ = variant(template, 0)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        validate_name(name)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        store.add_from_bytes(name, config_bytes, weights_bytes)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        store.remove(name)
    with pytest.raises(AdapterNotFoundError):
        store.get(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list((tmp_path / "store").iterdir()) == []


@pytest.mark.parametrize("name", ["x" * 64, "a", "Llama-3.1_sql.v2", ".hidden", "..."])
def test_valid_names_accepted(tmp_path: Path, template, name: str) -> None:
    store = make_store(tmp_path)
    config_bytes, weights_bytes, _ = variant(template, 0)
    store.add_from_bytes(name, config_bytes, weights_bytes)
    assert make_store(tmp_path).names() == [name]


def test_leftovers_of_a_crash_are_cleaned(tmp_path: Path, template) -> None:
    config_bytes, weights_bytes, tensors = variant(template, 3)
    write_dir(tmp_path / ".slserve-tmp~new~0123", config_bytes, b"half written")
    write_dir(tmp_path / ".slserve-trash~gone~0123", config_bytes, weights_bytes)
    # A replace interrupted between its two renames: the old copy comes back.
    write_dir(tmp_path / ".slserve-old~rolled~0123", config_bytes, weights_bytes)
    # A replace interrupted after both renames: the new copy stays, the old one goes.
    write_dir(tmp_path / "done", config_bytes, weights_bytes)
    write_dir(tmp_path / ".slserve-old~done~0123", b"old", b"old")

    store = make_store(tmp_path)
    assert store.names() == ["done", "rolled"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "rolled"]
    assert_is(store.get("rolled"), tensors)
    assert_is(store.get("done"), tensors)


def test_host_lru_byte_bound(tmp_path: Path, template) -> None:
    n, fit = 200, 20
    one = variant(template, 0)
    nbytes = parsed(one).nbytes
    bound = fit * nbytes + nbytes // 2
    store = make_store(tmp_path, host_cache_bytes=bound)
    expected = {}
    for i in range(n):
        config_bytes, weights_bytes, expected[f"a{i:03d}"] = variant(template, i)
        store.add_from_bytes(f"a{i:03d}", config_bytes, weights_bytes)
        assert store.stats()["host_bytes"] <= bound
    stats = store.stats()
    assert stats["disk_count"] == n and stats["host_count"] == fit
    assert stats["host_bytes"] == fit * nbytes and stats["host_capacity_bytes"] == bound
    assert stats["host_evictions"] == n - fit
    assert (stats["host_hits"], stats["host_misses"], stats["disk_loads"]) == (0, 0, 0)

    # The 20 most recent uploads are cached; the first one was evicted long ago and reloads.
    assert_is(store.get("a199"), expected["a199"])
    assert_is(store.get("a000"), expected["a000"])
    stats = store.stats()
    assert (stats["host_hits"], stats["host_misses"], stats["disk_loads"]) == (1, 1, 1)
    assert stats["host_evictions"] == n - fit + 1
    # a000 went in at the most-recent end, a180 (least recently used) went out.
    store.get("a000")
    store.get("a180")
    assert store.stats()["host_hits"] == 2 and store.stats()["disk_loads"] == 2

    rng = random.Random(0)
    for _ in range(300):
        name = f"a{rng.randrange(n):03d}"
        adapter = store.get(name)
        assert adapter.name == name
        stats = store.stats()
        assert stats["host_bytes"] <= bound and stats["host_count"] <= fit
    assert_is(store.get("a123"), expected["a123"])
    stats = store.stats()
    assert stats["host_hits"] + stats["host_misses"] == 305
    assert stats["disk_loads"] == stats["host_misses"]


def test_preload_fills_the_host_tier_without_evicting(tmp_path: Path, template) -> None:
    """Start-up preload parses adapters in name order until the next would push one out; a
    broken adapter on disk is skipped there and still reported to whoever asks for it."""
    one = variant(template, 0)
    nbytes = parsed(one).nbytes
    expected = {}
    for i in range(6):
        config_bytes, weights_bytes, expected[f"a{i}"] = variant(template, i)
        write_dir(tmp_path / f"a{i}", b"{not json" if i == 2 else config_bytes, weights_bytes)
    store = make_store(tmp_path, host_cache_bytes=3 * nbytes + nbytes // 2)
    assert store.preload() == 3
    stats = store.stats()
    # a0, a1, a3 parsed and kept; a4 pushed a0 out, so preloading stopped there.
    assert stats["host_count"] == 3 and stats["host_evictions"] == 1 and stats["disk_loads"] == 4
    assert [n for n in ("a0", "a1", "a3", "a4", "a5") if store.is_cached(n)] == ["a1", "a3", "a4"]
    assert_is(store.get("a3"), expected["a3"])
    assert store.stats()["host_hits"] == 1
    with pytest.raises(AdapterError):
        store.get("a2")

    roomy = make_store(tmp_path, host_cache_bytes=100 * nbytes)
    assert roomy.preload() == 5 and roomy.stats()["host_evictions"] == 0


def test_host_lru_mixed_sizes(tmp_path: Path, template) -> None:
    """The bound is in bytes, not in adapters: ranks 1..16 give sizes that differ 16-fold."""
    bound = 40_000
    store = make_store(tmp_path, host_cache_bytes=bound)
    rng = random.Random(1)
    for i in range(60):
        config_bytes, weights_bytes, _ = variant(template, i, rank=rng.randint(1, 16))
        store.add_from_bytes(f"m{i}", config_bytes, weights_bytes)
    for _ in range(200):
        store.get(f"m{rng.randrange(60)}")
        stats = store.stats()
        assert stats["host_bytes"] <= bound
        cached = list(store._host.values())
        assert stats["host_bytes"] == sum(a.nbytes for a in cached)
    assert store.stats()["host_evictions"] > 0


def test_adapter_larger_than_cache_is_served_not_kept(tmp_path: Path, template) -> None:
    config_bytes, weights_bytes, tensors = variant(template, 7)
    store = make_store(tmp_path, host_cache_bytes=100)
    store.add_from_bytes("big", config_bytes, weights_bytes)
    assert_is(store.get("big"), tensors)
    stats = store.stats()
    assert stats["host_count"] == 0 and stats["host_bytes"] == 0 and stats["disk_loads"] == 1


def test_concurrent_gets_and_replaces(tmp_path: Path, template) -> None:
    """Readers racing a writer always see one whole version of an adapter, and the bound holds."""
    nbytes = parsed(variant(template, 0)).nbytes
    bound = 8 * nbytes
    store = make_store(tmp_path, host_cache_bytes=bound)
    expected = {}
    for i in range(30):
        config_bytes, weights_bytes, expected[f"c{i}"] = variant(template, i)
        store.add_from_bytes(f"c{i}", config_bytes, weights_bytes)
    # The versions differ in both files, so a config read from one and weights from the other shows.
    versions = [variant(template, 1000, alpha=4), variant(template, 2000, alpha=6)]
    store.add_from_bytes("hot", *versions[0][:2])
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                if rng.random() < 0.3:
                    # Every tensor of the result must come from the same version.
                    a = store.get("hot")
                    q = a.modules[(0, "q_proj")].a
                    same = [v for v in versions if torch.equal(q, v[2][Q0_A])]
                    assert len(same) == 1
                    assert_is(a, same[0][2])
                    assert a.modules[(1, "v_proj")].scale == (2.0 if same[0] is versions[0] else 3.0)
                else:
                    name = f"c{rng.randrange(30)}"
                    assert_is(store.get(name), expected[name])
                assert store.stats()["host_bytes"] <= bound
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def writer() -> None:
        try:
            for k in range(20):
                store.add_from_bytes("hot", *versions[k % 2][:2], replace=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)] + [
        threading.Thread(target=writer)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert store.names() == sorted([*expected, "hot"])
    assert not [p for p in os.listdir(tmp_path) if "~" in p]


def test_replace_during_a_load_is_not_cached_stale(tmp_path: Path, template, monkeypatch) -> None:
    """A load that raced with a replace reads again, so the cache never holds the old version."""
    old, new = variant(template, 1, alpha=4), variant(template, 2, alpha=6)
    make_store(tmp_path).add_from_bytes("x", *old[:2])
    store = make_store(tmp_path)  # a restart: nothing cached, so get reads the disk
    real_load = adapter_store.load_peft_adapter
    calls = []

    def load_then_replace(*args, **kwargs):
        adapter = real_load(*args, **kwargs)
        if not calls:
            store.add_from_bytes("x", *new[:2], replace=True)
        calls.append(adapter)
        return adapter

    monkeypatch.setattr(adapter_store, "load_peft_adapter", load_then_replace)
    got = store.get("x")
    assert len(calls) == 2
    assert_is(calls[0], old[2])
    assert_is(got, new[2]) and got.modules[(0, "q_proj")].scale == 3.0
    # Had the first, stale read been cached it would now shadow the upload.
    assert_is(store.get("x"), new[2])
    assert store.stats()["host_hits"] == 1


def test_directory_missing_mid_replace_is_retried(tmp_path: Path, template, monkeypatch) -> None:
    old, new = variant(template, 1), variant(template, 2)
    make_store(tmp_path).add_from_bytes("x", *old[:2])
    store = make_store(tmp_path)
    real_load = adapter_store.load_peft_adapter
    calls = []

    def vanish_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            # What a reader sees between the two renames of a replace.
            store.add_from_bytes("x", *new[:2], replace=True)
            raise AdapterError("adapter 'x': adapter directory does not exist")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapter_store, "load_peft_adapter", vanish_once)
    assert_is(store.get("x"), new[2])
    assert len(calls) == 2


def test_remove_during_a_load_reports_not_found(tmp_path: Path, template, monkeypatch) -> None:
    make_store(tmp_path).add_from_bytes("x", *variant(template, 1)[:2])
    store = make_store(tmp_path)
    real_load = adapter_store.load_peft_adapter

    def load_then_remove(*args, **kwargs):
        adapter = real_load(*args, **kwargs)
        store.remove("x")
        return adapter

    monkeypatch.setattr(adapter_store, "load_peft_adapter", load_then_remove)
    with pytest.raises(AdapterNotFoundError):
        store.get("x")
    assert store.stats()["host_count"] == 0


def test_concurrent_misses_share_one_disk_load(tmp_path: Path, template, monkeypatch) -> None:
    make_store(tmp_path).add_from_bytes("x", *variant(template, 1)[:2])
    store = make_store(tmp_path)
    real_load = adapter_store.load_peft_adapter
    started, release = threading.Event(), threading.Event()

    def slow_load(*args, **kwargs):
        started.set()
        release.wait(10)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(adapter_store, "load_peft_adapter", slow_load)
    results: list[LoRAAdapter] = []
    first = threading.Thread(target=lambda: results.append(store.get("x")))
    first.start()
    started.wait(10)
    second = threading.Thread(target=lambda: results.append(store.get("x")))
    second.start()
    while store.stats()["host_misses"] < 2:
        threading.Event().wait(0.001)
    release.set()
    first.join()
    second.join()
    assert len(results) == 2 and results[0] is results[1]
    assert store.stats()["disk_loads"] == 1
