"""Weight-pruned subnetworks: the base network with a magnitude mask on every prunable layer, held while it trains.

A weight-pruning recipe keeps ``keep[l]`` weights of layer ``l`` of the weight table
(:mod:`nps.pipeline.network.weight_table`): the ones of largest magnitude in the base network. :func:`masked_copy`
applies the masks with PyTorch's own pruning re-parametrisation (``torch.nn.utils.prune.custom_from_mask``): the
layer's parameter becomes ``weight_orig`` and a forward pre-hook computes ``weight = weight_orig * weight_mask``
before every forward. So a pruned weight is exactly 0.0 in every forward, its gradient (``grad * mask``) is exactly
0.0, and — because ``weight_orig`` itself is zeroed where the mask is 0 — SGD's weight decay and momentum add
exactly 0.0 to it at every step: it stays 0.0 for the whole fine-tuning, whatever the optimizer's settings.

The state_dict of a masked model holds ``<layer>.weight_orig`` and ``<layer>.weight_mask`` for every prunable
layer: the kept weights *and* the masks (what an export stores). :func:`masked_skeleton` rebuilds a model that such
a state_dict loads into (strict); :func:`masked_layers` lists the masked layers; :func:`mask_counts` the kept
weights per layer, as the table counts them.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Mask the named layers of ``model`` in place (``weight_orig`` zeroed where the mask is 0); returns it."""
    named = dict(model.named_modules())
    for name, mask in masks.items():
        module = named[name]
        mask = mask.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            module.weight.mul_(mask)
        prune.custom_from_mask(module, "weight", mask)
    return model


def masked_copy(base: nn.Module, table, keep) -> nn.Module:
    """A copy of ``base`` keeping, in each prunable layer ``l``, its ``keep[l]`` weights of largest magnitude."""
    from nps.pipeline.network.weight_table import masks_from_keep

    model = copy.deepcopy(base)
    return apply_masks(model, masks_from_keep(model, table, keep))


def masked_skeleton(base: nn.Module) -> nn.Module:
    """``base`` re-parametrised with all-ones masks on every prunable layer: the shape of a masked model, for
    ``load_state_dict``."""
    from nps.pipeline.network.weight_table import prunable_layers

    model = copy.deepcopy(base)
    return apply_masks(model, {name: torch.ones_like(m.weight) for name, m in prunable_layers(model)})


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` that carry a weight mask."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "weight_mask")]


def mask_counts(model: nn.Module, table) -> np.ndarray:
    """Kept weights per layer of ``table`` (the mask's nonzeros): the keep vector the model was made with."""
    from nps.pipeline.network.weight_table import table_layers

    return np.array([int(torch.count_nonzero(m.weight_mask)) for m in table_layers(model, table)], dtype=np.int64)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold the masks into plain weights (``prune.remove``): zeros stay zeros, no hook, no mask buffer."""
    for _, module in masked_layers(model):
        prune.remove(module, "weight")
    return model
