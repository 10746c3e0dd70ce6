"""Exponential moving average of a model's stored tensors (Polyak averaging), as the KFLO paper's EMA baseline.

What is averaged: every floating-point tensor of the model's ``state_dict()``, i.e. the trainable parameters *as
stored* (for an expanded layer these are the recipe's factors, e.g. KFLO's W_1 and cascade, not the composed
kernel) and the floating-point buffers (BatchNorm running mean and variance). Integer buffers
(``num_batches_tracked``) are copied. The average of the factors is itself an expanded model, so it is evaluated,
saved and collapsed like the trained one.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..checkpoint import load_into


class ModelEma:
    """``ema = decay * ema + (1 - decay) * current`` after every optimizer step.

    >>> ema = ModelEma(nn.Linear(2, 2), decay=0.99)
    >>> ema.update(nn.Linear(2, 2))
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for key, avg in self.module.state_dict().items():
            value = current[key].detach()
            if avg.is_floating_point():
                avg.lerp_(value.to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into(self.module, tensors)


__all__ = ["ModelEma"]
