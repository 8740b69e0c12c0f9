"""Retraining recipes (paper §2.2): the optimizer, the per-step learning-rate schedule, scratch re-initialisation.

- **finetune** (the paper's standard setting): SGD with momentum, cosine annealing from ``lr`` (0.01) to 0 over
  ``epochs``, no warm-up.
- **rewind** (learning-rate rewinding / restarting): the large training learning rate ``rewind_lr`` (0.1) with a
  linear warm-up over ``warmup_epochs`` (5), then cosine annealing to 0.
- **scratch**: the pruned architecture with re-initialised weights, trained with the same schedule as ``rewind``
  (the paper: "the original learning rate schedule is adopted").

The schedule is stepped once per optimisation step (not per epoch), so short runs anneal smoothly.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from nps.pipeline.training.spec import RetrainSpec


def make_optimizer(model: nn.Module, config: RetrainSpec) -> torch.optim.SGD:
    """SGD over the trainable parameters at the method's peak learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.peak_lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.nesterov)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up, then cosine from 1 to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: RetrainSpec,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over ``config.epochs × steps_per_epoch`` steps; call ``.step()`` after every batch."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def reinitialize(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Fresh weights for ``scratch`` retraining: every submodule's own ``reset_parameters``, BN stats reset.

    ResNets then get the torchvision convention (Kaiming-normal fan-out convs, BN weight 1, bias 0).
    """
    gen_ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with gen_ctx, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()  # running stats and affine weights
            elif hasattr(module, "reset_parameters") and not list(module.children()):
                module.reset_parameters()
    return model


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
