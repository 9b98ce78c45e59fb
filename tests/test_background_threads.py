"""The adapter loader and pool-copy threads run their torch ops on one thread without changing
how many threads any other thread's ops get (the engine's above all).

The check runs in a fresh interpreter and watches a thread that first asks torch for its thread
count after the worker has started, as the offline engine's thread did once adapters were
preloaded (it then ran every op on one core).
"""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, threading, torch
from slserve.memory.pool import background_executor

torch.set_num_threads({threads})
worker = background_executor("check")
in_worker = worker.submit(torch.get_num_threads).result()
fresh = []
thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
thread.start()
thread.join()
print(json.dumps({{"worker": in_worker, "main": torch.get_num_threads(), "fresh_thread": fresh[0]}}))
"""


def test_background_worker_runs_on_one_thread_and_leaves_the_others_alone() -> None:
    threads = 3  # any count other than the worker's 1 (a count, not the cores the machine has)
    script = CHECK.format(threads=threads)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts == {"worker": 1, "main": threads, "fresh_thread": threads}
