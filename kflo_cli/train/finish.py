"""The end of a run: collapse the trained model into the original architecture (``collapsed.safetensors``),
verify it, measure its own test accuracy, and write the run summary (``summary.json``)."""

from __future__ import annotations

import json
from typing import Any

import torch.nn as nn

from .. import checkpoint
from .._atomic import write_text_atomic
from ..record import record
from ..surgery import collapse, collapse_problem
from .loop import evaluate
from .parts import Parts, Run
from .state import Counters
from .summary import CollapseResult, RunSummary


def finish(run: Run, parts: Parts, counters: Counters) -> RunSummary:
    """Summarise the run; for an expanded one collapse, verify and measure the deployed model first.

    Writes ``summary.json`` (and ``collapsed.safetensors``, ``verification.json``) on rank 0.
    """
    last = counters.history[-1] if counters.history else {}
    summary = RunSummary(
        run_dir=str(run.run_dir),
        model_id=record(parts.model).model_id,
        kind="vanilla" if run.vanilla else "expanded",
        data=run.config.data,
        epochs=counters.epoch,
        steps=counters.global_step,
        final_test_acc=last.get("test_acc"),
        test_samples=len(run.data.test),
        ema_test_acc=last.get("ema_test_acc"),
        best=counters.best,
        params_trained=sum(p.numel() for p in parts.model.parameters()),
        world_size=run.dist.world_size,
        ranks_identical=run.dist.ranks_identical(parts.model),
        seconds=sum(r.get("seconds", 0.0) for r in counters.history),
    )
    if not run.vanilla:
        problem = collapse_problem(parts.model)
        if problem is None:
            summary.collapsed = collapse_and_verify(run, parts)
        else:  # e.g. ExpandNets' nonlinear counterpart: trained on purpose, collapsed by its linear successor
            summary.not_collapsed = problem
    if run.dist.is_main:
        write_text_atomic(run.run_dir / "summary.json", summary.to_json())
    return summary


def _weights_to_collapse(run: Run, parts: Parts) -> nn.Module:
    """The trained model ``--collapse-from`` names: the last weights, the best epoch's or the EMA."""
    source = run.config.collapse_from
    if source == "ema":
        return parts.ema.module
    if source == "best":  # rank 0 wrote best.safetensors before the barrier that ends every save
        from .run_dir import check_checkpoint

        check_checkpoint(run, run.run_dir / "best.safetensors")
        return checkpoint.load(run.run_dir / "best.safetensors").to(run.dist.device)
    return parts.model


def collapse_and_verify(run: Run, parts: Parts) -> CollapseResult:
    """Collapse into ``collapsed.safetensors``, measure the collapsed model on the test set and prove (float64)
    that it computes what the trained model does; every rank returns rank 0's result."""
    from ..pipeline import collapse_to_file
    from ..verify import verify_equivalence

    config, dist = run.config, run.dist
    trained = _weights_to_collapse(run, parts)
    path = run.run_dir / "collapsed.safetensors"
    if dist.is_main:  # checks the original architecture's keys and shapes, writes atomically
        plain = collapse_to_file(trained, path, extra={"data": config.data, "collapsed_from": config.collapse_from,
                                                           **({"run_id": run.run_id} if run.run_id else {})})
    else:  # the other ranks only help evaluate it
        plain = collapse(trained)
    plain = plain.to(dist.device)
    _, acc = evaluate(run, plain, run.data.test)
    result: Any = None
    if dist.is_main:
        proof = verify_equivalence(trained, plain, input_size=run.input_size, rtol=config.verify_rtol)
        result = CollapseResult(config.collapse_from, acc, sum(p.numel() for p in plain.parameters()), proof)
        text = json.dumps({**result.to_dict(), "checkpoint": str(path)}, indent=2, sort_keys=True) + "\n"
        write_text_atomic(run.run_dir / "verification.json", text)
    return dist.gather_objects(result)[0]


__all__ = ["collapse_and_verify", "finish"]
