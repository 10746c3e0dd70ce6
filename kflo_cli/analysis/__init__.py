"""Analyses of trained and untrained models: the filter-normalised loss landscape (:mod:`.landscape`) and the
"contracted initialisation" baseline of ExpandNets section 5.3 (:mod:`.init`). docs/analysis.md has the details."""

from .init import contracted_init
from .landscape import Landscape, checkpoint_landscape, loss_landscape, write_landscape

__all__ = ["Landscape", "checkpoint_landscape", "contracted_init", "loss_landscape", "write_landscape"]
