"""Evaluation (top-1, top-5, loss of several models in one pass) and adaptive BN.

Adaptive BN (EagleEye, Li et al. 2020): recompute the BatchNorm statistics of a freshly pruned network on a few
hundred training images, then evaluate; that accuracy (``bn_top1``) ranks candidates before any fine-tuning.
Accuracies are percentages (0–100), losses mean cross-entropy per image.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.training.schedule import autocast_context

log = logging.getLogger(__name__)


Runner = Callable[[Callable[[Any], None], Sequence[Any]], None]
"""``runner(fn, items)`` calls ``fn(item)`` for every item, in any order or concurrently (the engine's CPU threads)."""


def run_each(fn: Callable[[Any], None], items: Sequence[Any]) -> None:
    for item in items:
        fn(item)


def _batches(loader: Iterable, device: torch.device, channels_last: bool):
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_many(models: Sequence[nn.Module], loader: Iterable, device: torch.device | str, *,
                  amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                  runner: Runner = run_each) -> list[tuple[float, float, float]]:
    """Top-1 %, top-5 % and mean loss of several models in ONE pass over ``loader`` (each batch moved once).

    With fewer than 5 classes, top-5 counts the top ``num_classes`` (so it is 100 %).
    """
    device = torch.device(device)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    n = 0
    correct1 = [torch.zeros((), device=device, dtype=torch.float64) for _ in models]
    correct5 = [torch.zeros((), device=device, dtype=torch.float64) for _ in models]
    loss_sum = [torch.zeros((), device=device, dtype=torch.float64) for _ in models]
    for x, y in _batches(loader, device, channels_last):
        n += y.shape[0]

        def score(i: int, x=x, y=y) -> None:
            with torch.no_grad():  # also in the runner's threads (grad mode is per thread)
                with autocast_context(device, amp_dtype):
                    logits = models[i](x)
                logits = logits.float()
                loss_sum[i] += nn.functional.cross_entropy(logits, y, reduction="sum").double()
                k = min(5, logits.shape[1])
                hit = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))
                correct1[i] += hit[:, 0].sum().double()
                correct5[i] += hit.any(dim=1).sum().double()

        runner(score, range(len(models)))
    for m, mode in zip(models, was_training):
        m.train(mode)
    if n == 0:
        raise NpsError("the evaluation loader yielded no batches")
    return [(100.0 * c1.item() / n, 100.0 * c5.item() / n, ls.item() / n)
            for c1, c5, ls in zip(correct1, correct5, loss_sum)]


def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str, **kwargs) -> tuple[float, float, float]:
    """Top-1 %, top-5 % and mean cross-entropy of one model on ``loader`` (see :func:`evaluate_many`)."""
    return evaluate_many([model], loader, device, **kwargs)[0]


@torch.no_grad()
def adaptive_bn_many(models: Sequence[nn.Module], loader: Iterable, device: torch.device | str, *,
                     num_images: int = 500, amp_dtype: torch.dtype | None = None,
                     channels_last: bool = False, runner: Runner = run_each) -> int:
    """Recompute every BatchNorm's running statistics from ``num_images`` training images (one pass, all models).

    Running stats are reset and re-estimated as an exact cumulative average (``momentum=None``) with the models in
    train mode and no gradients; each BN's momentum is restored afterwards and the models are left in eval mode,
    ready to be evaluated (that accuracy is ``bn_top1``). Returns the number of images used.
    """
    if num_images < 1:
        raise ValueError(f"adaptive BN needs num_images >= 1, got {num_images}")
    device = torch.device(device)
    saved = []
    for m in models:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                saved.append((bn, bn.momentum))
                bn.reset_running_stats()
                bn.momentum = None
        m.train()
    seen = 0
    try:
        for x, _ in _batches(loader, device, channels_last):
            take = min(x.shape[0], num_images - seen)
            if take < 2 and seen > 0:  # a 1-image batch gives BN no variance; the estimate is complete enough
                break
            def forward(m: nn.Module, batch=x[:take]) -> None:
                with torch.no_grad(), autocast_context(device, amp_dtype):
                    m(batch)

            runner(forward, models)
            seen += take
            if seen >= num_images:
                break
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        for m in models:
            m.eval()
    if seen == 0:
        raise NpsError("the training loader yielded no batches for adaptive BN")
    if seen < num_images:
        log.info("adaptive BN used %d images (the loader ran out before %d)", seen, num_images)
    return seen


def adaptive_bn(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", *,
                num_images: int = 500, **kwargs) -> int:
    """Adaptive BN for one model (see :func:`adaptive_bn_many`)."""
    return adaptive_bn_many([model], loader, device, num_images=num_images, **kwargs)


def precise_bn_evaluate(model: nn.Module, train: Iterable, loader: Iterable, device: torch.device | str, *,
                        num_images: int, amp_dtype: torch.dtype | None = None,
                        channels_last: bool = False) -> tuple[float, float, float]:
    """Precise BN, then an evaluation: ``model``'s BN statistics recomputed on the first ``num_images`` images of
    ``train``'s epoch 0 (:func:`adaptive_bn_many`), then its (top-1, top-5, loss) on ``loader``. The end of a base
    or reference training, and the plateau rule's holdout score with ``base.holdout_bn_images`` (on a copy)."""
    if hasattr(train, "set_epoch"):
        train.set_epoch(0)
    adaptive_bn_many([model], train, device, num_images=num_images, amp_dtype=amp_dtype, channels_last=channels_last)
    return evaluate(model, loader, device, amp_dtype=amp_dtype, channels_last=channels_last)
