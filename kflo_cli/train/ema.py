"""Exponential moving average of a model's stored tensors (Polyak averaging), as the KFLO paper's EMA baseline.

What is averaged: every floating-point parameter and buffer of the model, i.e. the trainable parameters *as
stored* (for an expanded layer these are the recipe's factors, e.g. KFLO's W_1 and cascade, not the composed
kernel) and the floating-point buffers (BatchNorm running mean and variance). Integer buffers
(``num_batches_tracked``) are copied. The average of the factors is itself an expanded model, so it is evaluated,
saved and collapsed like the trained one.

The averaging is torch's own :class:`torch.optim.swa_utils.AveragedModel` (``use_buffers=True``) with
:func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`, with two adjustments that keep the behaviour (and exact
resume) of a plain ``ema = decay * ema + (1 - decay) * current`` after every optimizer step:

* ``AveragedModel`` *copies* the model at its first update (``n_averaged == 0``). Here the average starts at the
  model's initial weights and the first step is averaged like every other, so ``n_averaged`` starts at 1. It is
  never saved: the EMA functions ignore it, so a resumed run needs nothing but the averaged tensors.
* ``get_ema_multi_avg_fn`` rounds ``decay * ema + (1 - decay) * current`` into integer buffers, so
  ``num_batches_tracked`` would lag behind the model's; integer tensors are copied instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..checkpoint import load_into


def _ema_or_copy(decay: float):
    ema = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        # AveragedModel groups the tensors by device and dtype, so each call is all floating point or all integer
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            ema(averaged, current, n_averaged)
        else:
            for avg, value in zip(averaged, current):
                avg.copy_(value)

    return update


class ModelEma:
    """``ema = decay * ema + (1 - decay) * current`` after every optimizer step; ``module`` is the averaged model.

    >>> ema = ModelEma(nn.Linear(2, 2), decay=0.99)
    >>> ema.update(nn.Linear(2, 2))
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_or_copy(self.decay), use_buffers=True).eval()
        self.averaged.n_averaged.fill_(1)  # average from the first update on (see the module docstring)
        for p in self.averaged.parameters():
            p.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (an ordinary, expanded or plain, model of the trained architecture)."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged model's ``state_dict()`` (what the training state and ``ema.safetensors`` hold)."""
        return self.module.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into(self.module, tensors)


__all__ = ["ModelEma"]
