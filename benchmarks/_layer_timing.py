"""What the per-layer benchmark scripts share: their command line and the timing of one call."""

from __future__ import annotations

import argparse
import time

import torch


def elapsed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def layer_args(doc: str, rounds: int) -> argparse.Namespace:
    """``--threads``, ``--rounds`` and ``--batch``; sets the thread count and seeds the generator."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args
