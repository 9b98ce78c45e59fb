"""The slots an adapter puts before a request's prompt, laid out when the request is admitted.

A prompt-tuning or P-tuning adapter's n virtual tokens are n slots computed with the prompt: the
step plan replaces their embeddings by the adapter's rows (plan.py), positions 0..n-1, the
prompt's tokens at n.. as PEFT places them. A prefix-tuning adapter's n keys and values already
sit in the adapter's own KV pages: the request's sequence starts with those pages, read-only and
shared by every running request of the adapter, and its own pages follow. When n is not a whole
number of pages, the adapter's last, partial page is not shared: its n % page_tokens slots are
copied into the request's first own page by the first plan that runs the request (a
copy-on-write block copy done eagerly, since the request writes its next slot into that page).
Either way the slots count as sequence slots: `num_computed`, the KV pages and context lengths
include them; the request's tokens, usage, echo and logprobs do not.
"""

from __future__ import annotations

from slserve.memory.adapter_pages import DeviceAdapter
from slserve.request import Request


def seat(req: Request, dev: DeviceAdapter, page_tokens: int) -> None:
    """Lay the request's sequence out behind its adapter's slots (at admission, num_computed 0)."""
    req.num_virtual = dev.adapter.num_virtual
    pages = dev.prefix_pages
    if not pages:
        return
    n = req.num_virtual
    full = n // page_tokens
    req.shared_pages = list(pages[:full])
    req.num_shared = full * page_tokens
    req.num_computed = n  # the prefix is in the cache once the copy below is done
    req.prefix_copy = (pages[full], n - req.num_shared) if n > req.num_shared else None


def unseat(req: Request) -> None:
    """The request gave its pages back (finished, preempted): it no longer reads the adapter's."""
    req.shared_pages = []
    req.num_shared = 0
    req.prefix_copy = None
