"""`kflo train` under torchrun with 2 CPU processes (gloo): the ranks stay identical and the result follows the
documented single-process semantics (global batch = --batch-size, split across ranks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import torch
from rich.console import Console
from safetensors.torch import load_file

from kflo_cli.train import resolve_config, start

OPTIONS = {"recipe": ["kflo:depth=2,width=2"], "data": "digits", "train_fraction": 0.25, "epochs": 2, "batch_size": 16,
           "threads": 1, "lr": 0.05, "ema": 0.9}
CLI = ["--recipe", "kflo:depth=2,width=2", "--data", "digits", "--train-fraction", "0.25", "--epochs", "2",
       "--batch-size", "16", "--threads", "1", "--lr", "0.05", "--ema", "0.9"]


def test_two_processes_match_one(tmp_path):
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kflo_cli", "train", "lenet5", *CLI, "-o", str(ddp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["collapsed"]["verification"]["passed"]
    assert proc.stdout.count("run summary") == 1  # only rank 0 prints and writes

    single = start(resolve_config({"source": "lenet5", **OPTIONS}), tmp_path / "single", console=Console(file=io.StringIO()), progress=False)
    assert single.summary["steps"] == summary["steps"]
    a, b = load_file(str(ddp / "last.safetensors")), load_file(str(tmp_path / "single" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # same batches and the same averaged gradients; only the order of float additions differs
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    hist_ddp = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    hist_one = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(hist_ddp, hist_one):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-4 and abs(r1["test_acc"] - r2["test_acc"]) < 1.0
