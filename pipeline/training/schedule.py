"""Retraining recipes (paper §2.2): the optimizer, the per-step learning-rate schedule, scratch re-initialisation.

- **finetune** (the paper's standard setting): SGD with momentum, cosine annealing from ``lr`` (0.01) to 0 over
  ``epochs``, no warm-up.
- **rewind** (learning-rate rewinding / restarting): the large training learning rate ``rewind_lr`` (0.1) with a
  linear warm-up over ``warmup_epochs`` (5), then cosine annealing to 0.
- **scratch**: the pruned architecture with re-initialised weights, trained with the same schedule as ``rewind``
  (the paper: "the original learning rate schedule is adopted").

The schedule is stepped once per optimisation step (not per epoch), so short runs anneal smoothly. Base and
reference training use the rewind recipe through :class:`LrPlan`, which can end early with a cool-down
(:mod:`nps.pipeline.training.plateau`).
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


def schedule_steps(config: RetrainSpec, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warm-up steps) of ``config`` at ``steps_per_epoch``."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return config.epochs * steps_per_epoch, int(round(config.warmup * steps_per_epoch))


def make_scheduler(optimizer: torch.optim.Optimizer, config: RetrainSpec, steps_per_epoch: int,
                   factor=None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over ``config.epochs × steps_per_epoch`` steps; call ``.step()`` after every batch.
    ``factor`` (step → multiplier of the peak rate) replaces :func:`lr_factor`'s warm-up and cosine (base training's
    :class:`LrPlan`, which can end early)."""
    total, warmup = schedule_steps(config, steps_per_epoch)
    if factor is None:
        def factor(step: int) -> float:
            return lr_factor(step, total, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LrPlan:
    """The per-step learning-rate factor of a network trained to a plateau (``LambdaLR``'s lambda; see
    :func:`make_scheduler` and :mod:`nps.pipeline.training.plateau`): the recipe's warm-up and cosine to 0 at
    ``total_steps``, until :meth:`cool_down` makes the rest a linear decay to 0. The factor at the cool-down's first
    step is the cosine's there (the optimizer already holds it when the rule fires), so the rate never jumps.
    ``LambdaLR.state_dict`` keeps a callable object's attributes: the cool-down is saved and restored with the
    schedule."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total, self.warmup = int(total_steps), int(warmup_steps)
        self.cool_from: int | None = None  # the first step of the cool-down
        self.cool_steps = 0

    def __call__(self, step: int) -> float:
        if self.cool_from is None or step < self.cool_from:
            return lr_factor(step, self.total, self.warmup)
        start = lr_factor(self.cool_from, self.total, self.warmup)
        return start * max(0.0, 1.0 - (step - self.cool_from) / self.cool_steps)

    def cool_down(self, from_step: int, steps: int) -> None:
        """From ``from_step`` on, decay linearly from the factor there to 0 over ``steps`` steps."""
        if steps < 1:
            raise ValueError(f"a cool-down needs at least one step, got {steps}")
        self.cool_from, self.cool_steps = int(from_step), int(steps)


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
