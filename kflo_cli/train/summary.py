"""The typed end-of-run summary: what :func:`kflo_cli.train.start` / :func:`~kflo_cli.train.resume` return in
``TrainResult.summary`` and what ``RUN_DIR/summary.json`` holds.

``summary.json`` is :meth:`RunSummary.to_dict`, i.e. :func:`dataclasses.asdict` with the keys of the untyped
summary of earlier versions (``collapsed.from``; ``collapsed`` / ``not_collapsed`` only when they apply), so old
run directories and scripts that read the file keep working.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..verify import EquivalenceReport

#: Field names whose JSON key differs (``from`` is a Python keyword).
_JSON_KEYS = {"collapsed_from": "from"}


def _json_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {_JSON_KEYS.get(key, key): value for key, value in pairs}


@dataclass
class Best:
    """The epoch with the highest validation accuracy (test accuracy without a validation set)."""

    by: str  # "val" or "test"
    value: float
    epoch: int


@dataclass
class CollapseResult:
    """The deployed model of an expanded run: collapsed, measured, verified (also ``verification.json``)."""

    collapsed_from: str  # "last", "best" or "ema"; JSON key "from"
    test_acc: float  # the collapsed model's own test accuracy (%)
    params: int
    verification: EquivalenceReport  # float64 equivalence of the trained and the collapsed model
    #: ``collapsed.safetensors`` loads strictly into a fresh model of the original architecture (always true:
    #: :func:`kflo_cli.pipeline.collapse_to_file` refuses to write anything else).
    strict_load: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self, dict_factory=_json_dict)


@dataclass
class RunSummary:
    """The end of a run, as printed in the summary table and written to ``summary.json``."""

    run_dir: str
    model_id: str
    kind: str  # "vanilla" or "expanded"
    data: str
    epochs: int
    steps: int
    final_test_acc: float | None  # the trained model's, last epoch
    test_samples: int
    ema_test_acc: float | None
    best: Best | None
    params_trained: int
    world_size: int
    ranks_identical: bool
    seconds: float  # training time, summed over epochs
    collapsed: CollapseResult | None = None  # expanded runs that could be collapsed
    not_collapsed: str | None = None  # why an expanded run was not collapsed (e.g. ExpandNet's nonlinear form)
    seconds_final: float | None = None  # time of the end-of-run work; not in summary.json

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` object."""
        out = dataclasses.asdict(self, dict_factory=_json_dict)
        out.pop("seconds_final")
        for key in ("collapsed", "not_collapsed"):
            if out[key] is None:
                del out[key]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


__all__ = ["Best", "CollapseResult", "RunSummary"]
