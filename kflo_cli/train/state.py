"""The training state for exact resume, written atomically as one safetensors file (tensors + JSON metadata), and
the run's counters (:class:`Counters`).

``RUN_DIR/state.safetensors`` holds the model, optimizer, EMA and AMP-scaler state, the step counters, the
running sums of the epoch in progress, the metrics history and every rank's RNG states (torch CPU, CUDA,
numpy, Python ``random``). Tensors are stored as safetensors and everything else as JSON, so loading never
unpickles anything. The data order needs no state of its own: it is a function of the seed, the epoch and the
step (see :mod:`kflo_cli.train.loader`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._atomic import atomic_path
from ..errors import KfloError
from .summary import Best

STATE_FILE = "state.safetensors"
STATE_FORMAT = 1
_META = "kflo_train_state"


# -- counters ----------------------------------------------------------------------------------------------------
def _new_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "penalty": 0.0, "steps": 0}


@dataclass
class Counters:
    """Where a run is: its step counters, the running sums of the epoch in progress, the metrics history and the
    best epoch so far. Saved in the state's ``info`` block under these names."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the epoch in progress
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=_new_sums)  # loss*n, correct, count, penalty, steps
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per epoch
    best: Best | None = None
    finished: bool = False  # the end-of-run collapse is done

    def add_step(self, loss_sum: float, correct: float, count: float, penalty: float) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        self.sums["loss"] += loss_sum
        self.sums["correct"] += correct
        self.sums["count"] += count
        self.sums["penalty"] += penalty
        self.sums["steps"] += 1

    def end_epoch(self, row: dict[str, Any], by: str) -> bool:
        """Record an epoch's metrics row; return whether it is the new best by ``{by}_acc``."""
        self.history.append(row)
        improved = self.best is None or row[f"{by}_acc"] > self.best.value
        if improved:
            self.best = Best(by, row[f"{by}_acc"], row["epoch"])
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = _new_sums()
        return improved

    def to_info(self) -> dict[str, Any]:
        info = asdict(self)
        info["sums"] = dict(self.sums)
        return info

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> "Counters":
        best = info["best"]
        return cls(info["epoch"], info["step_in_epoch"], info["global_step"], dict(info["sums"]), info["history"],
                   Best(**best) if best else None, info["finished"])


# -- RNG ---------------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as plain data (lists, ints, bytes) that can cross processes."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "numpy": {"name": np_state[0], "keys": np.asarray(np_state[1]).tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned."""
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# -- the state file ----------------------------------------------------------------------------------------------
def _split_rng(ranks: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict[str, Any]] = []
    for r, state in enumerate(ranks):
        tensors[f"rng/{r}/torch"] = torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8).clone()
        for i, s in enumerate(state["cuda"]):
            tensors[f"rng/{r}/cuda/{i}"] = torch.frombuffer(bytearray(s), dtype=torch.uint8).clone()
        meta.append({"cuda": len(state["cuda"]), "numpy": state["numpy"], "python": state["python"]})
    return tensors, meta


def _join_rng(tensors: dict[str, torch.Tensor], meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ranks = []
    for r, m in enumerate(meta):
        ranks.append({
            "torch": tensors[f"rng/{r}/torch"].numpy().tobytes(),
            "cuda": [tensors[f"rng/{r}/cuda/{i}"].numpy().tobytes() for i in range(m["cuda"])],
            "numpy": m["numpy"],
            "python": m["python"],
        })
    return ranks


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(
    run_dir: str | Path,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    ema: dict[str, torch.Tensor] | None,
    scaler: dict[str, Any] | None,
    rng: list[dict[str, Any]],
    info: dict[str, Any],
) -> Path:
    """Write ``RUN_DIR/state.safetensors`` atomically.

    Args:
        model: the model's ``state_dict()``.
        optimizer: the optimizer's ``state_dict()``.
        ema: the EMA model's ``state_dict()`` or ``None``.
        scaler: the AMP GradScaler's ``state_dict()`` or ``None``.
        rng: one :func:`capture_rng` result per rank.
        info: JSON-serialisable counters, history, model metadata.
    """
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model.items()}
    if ema is not None:
        tensors.update({f"ema/{k}": v for k, v in ema.items()})
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    tensors.update(opt_tensors)
    rng_tensors, rng_meta = _split_rng(rng)
    tensors.update(rng_tensors)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": STATE_FORMAT, "info": info, "optimizer": opt_meta, "scaler": scaler, "rng": rng_meta, "has_ema": ema is not None}
    path = Path(run_dir) / STATE_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})
    return path


def load_state(run_dir: str | Path) -> dict[str, Any]:
    """Read a state file; returns ``model``, ``optimizer``, ``ema``, ``scaler``, ``rng`` and ``info``."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise KfloError(f"{run_dir} has no {STATE_FILE}: the run saved no state yet; start it again with -o DIR --overwrite")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError):
        raise KfloError(f"{path} is damaged; start the run again with -o DIR --overwrite") from None
    if meta.get("format") != STATE_FORMAT:
        raise KfloError(f"{path} has training-state format {meta.get('format')}, this kflo reads {STATE_FORMAT}; use the kflo that wrote it")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        groups[head][rest if head in ("model", "ema") else key] = value
    return {
        "model": groups["model"],
        "ema": groups["ema"] if meta["has_ema"] else None,
        "optimizer": _join_optimizer(groups["optim"], meta["optimizer"]),
        "scaler": meta["scaler"],
        "rng": _join_rng(groups["rng"], meta["rng"]),
        "info": meta["info"],
    }


__all__ = ["STATE_FILE", "Counters", "capture_rng", "load_state", "restore_rng", "save_state", "seed_everything"]
