"""`kflo train` under torchrun with 2 CPU processes (gloo): the ranks stay identical and the result follows the
documented single-process semantics (global batch = --batch-size, split across ranks)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from kflo_cli.train import resolve_config, start

from conftest import scaled_timeout

# two torchrun jobs of about half a minute each on 2 cores
pytestmark = pytest.mark.slow

OPTIONS = {"recipe": ["kflo:depth=2,width=2"], "data": "digits", "train_fraction": 0.25, "epochs": 2, "batch_size": 16,
           "threads": 1, "lr": 0.05, "ema": 0.9}
CLI = ["--recipe", "kflo:depth=2,width=2", "--data", "digits", "--train-fraction", "0.25", "--epochs", "2",
       "--batch-size", "16", "--threads", "1", "--lr", "0.05", "--ema", "0.9"]


def test_two_processes_match_one(tmp_path):
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kflo_cli", "train", "lenet5", *CLI, "-o", str(ddp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled_timeout(300), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["collapsed"]["verification"]["passed"]
    assert proc.stdout.count("run summary") == 1  # only rank 0 prints and writes

    single = start(resolve_config({"source": "lenet5", **OPTIONS}), tmp_path / "single", console=Console(file=io.StringIO()), progress=False)
    assert single.summary.steps == summary["steps"]
    a, b = load_file(str(ddp / "last.safetensors")), load_file(str(tmp_path / "single" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # same batches and the same averaged gradients; only the order of float additions differs
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    hist_ddp = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    hist_one = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for r1, r2 in zip(hist_ddp, hist_one):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-4 and abs(r1["test_acc"] - r2["test_acc"]) < 1.0


def test_ema_numbers_under_ddp_are_those_of_the_saved_ema(tmp_path):
    """Each rank's EMA averages its own BatchNorm statistics; rank 0's are saved, so they must be the ones evaluated."""
    import torch.nn.functional as F

    import kflo_cli as kflo
    from kflo_cli.train.config import load_config
    from kflo_cli.train.source import load_data
    from kflo_cli.train.state import load_state

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kflo_cli",
           "train", "smallnet_k3", "--recipe", "kflo", "--data", "synthetic", "--epochs", "1", "--batch-size", "32",
           "--threads", "1", "--ema", "0.5", "--collapse-from", "ema", "-o", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled_timeout(300), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    in_chans, img_size = load_state(run)["info"]["data_args"]
    data = load_data(load_config(run), in_chans=in_chans, img_size=img_size)
    x, y = (torch.stack([data.test[i][k] if k == 0 else torch.tensor(data.test[i][k]) for i in range(len(data.test))])
            for k in (0, 1))
    with torch.no_grad():
        ema_loss = F.cross_entropy(kflo.load(run / "ema.safetensors").eval()(x), y).item()
        plain_acc = (kflo.load(run / "collapsed.safetensors").eval()(x).argmax(1) == y).float().mean().item() * 100
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(row["ema_test_loss"] - ema_loss) < 1e-4 * max(1.0, ema_loss)
    assert abs(json.loads((run / "summary.json").read_text())["collapsed"]["test_acc"] - plain_acc) < 1e-6


def test_compile_and_amp_under_ddp_with_ema(tmp_path):
    """torch.compile and bfloat16 autocast on both ranks of a parametrized (KFLO) model under DDP, with an EMA: the
    ranks stay identical and the collapse is exact."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kflo_cli",
           "train", "lenet5", "--recipe", "kflo", "--data", "digits", "--train-fraction", "0.25", "--epochs", "1",
           "--batch-size", "16", "--threads", "1", "--ema", "0.9", "--compile", "--amp", "-o", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled_timeout(600), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["collapsed"]["verification"]["passed"]
    config = json.loads((run / "config.json").read_text())
    assert config["compile"] and config["amp"] and config["ema"] == 0.9


def test_accumulate_under_ddp_matches_one_process(tmp_path):
    """--accumulate under torchrun: the model is not wrapped in DDP (the micro-batches reach composed kernels held as
    leaves, not the parameters DDP watches); kflo broadcasts buffers and averages gradients itself. LeNet-5 has no
    BatchNorm, so 2 ranks x 2 micro-batches of a 16-image batch must end where one process without accumulation
    does, up to the order of float additions."""
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kflo_cli", "train", "lenet5", *CLI, "--accumulate", "2", "-o", str(ddp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled_timeout(300),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["collapsed"]["verification"]["passed"]
    single = start(resolve_config({"source": "lenet5", **OPTIONS}), tmp_path / "single",
                   console=Console(file=io.StringIO()), progress=False)
    assert single.summary.steps == summary["steps"]
    a, b = load_file(str(ddp / "last.safetensors")), load_file(str(tmp_path / "single" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def _broadcast_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    import kflo_cli as kflo
    from kflo_cli.train.distributed import DistContext

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # a grouped convolution: there the paper-layout copy in state_dict() is not a view of the parameter
        model = kflo.expand(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Conv2d(8, 4, 3)), "doconv")
        with torch.no_grad():  # different weights on each rank before the broadcast
            for p in model.parameters():
                p.add_(float(rank))
        DistContext(rank=rank, world_size=2).broadcast_state(model)
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_broadcast_state_reaches_parameters_that_save_a_converted_copy(tmp_path):
    """DO-Conv's state_dict() holds a converted copy of W (the paper's layout); the broadcast that stands in for
    DistributedDataParallel's (--accumulate under torchrun) must reach the stored parameter itself."""
    import torch.multiprocessing as mp

    mp.spawn(_broadcast_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    zero = torch.load(tmp_path / "rank0.pt", weights_only=True)
    one = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert any(k.endswith("channel_kernels") for k in zero)
    for key in zero:
        assert torch.equal(zero[key], one[key]), key
