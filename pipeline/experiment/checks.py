"""Checking an experiment's values without touching any file: one NpsError line naming the key (pycls'
``assert_cfg``). What needs the disk and the model (the dataset, the checkpoint, reachable targets, room for the
outputs) is :func:`nps.pipeline.experiment.plan.validate`."""
from __future__ import annotations

import re

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment import space_plan

AMP = ("auto", "bf16", "fp16", "off")
KEEP_WEIGHTS = ("all", "topk", "none")


def _need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise NpsError(f"{key}: {problem}")


def _choice(value, key: str, choices) -> None:
    _need(value in choices, key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def check_config(cfg):
    """Reject impossible values (raises NpsError naming the key); touches no file. Returns ``cfg``."""
    _check_experiment_and_dataset(cfg.experiment, cfg.dataset)
    _check_model(cfg)
    _check_base(cfg.model, cfg.base)
    _check_retrain(cfg.retrain, cfg.two_stage)
    o = cfg.output
    space_plan.check(cfg)
    _choice(o.keep_weights, "output.keep_weights", KEEP_WEIGHTS)
    _need(o.top_k >= 1, "output.top_k", f"must be >= 1, got {o.top_k}")
    return cfg




def _check_experiment_and_dataset(e, d) -> None:
    _need(bool(e.name.strip()), "experiment.name", "must not be empty")
    _need(e.seed >= 0, "experiment.seed", f"must be >= 0, got {e.seed}")
    _need(bool(e.out.strip()), "experiment.out", "must not be empty")
    parse_devices(e.devices, key="experiment.devices")
    check_ray_address(e.ray, key="experiment.ray")

    _need(bool(d.dir.strip()), "dataset.dir", "set it to a directory written by `nps convert`")
    _need(d.workers >= 0, "dataset.workers", f"must be >= 0, got {d.workers}")
    _need(d.on_device in (True, False, "auto"), "dataset.on_device", f"use 'auto', true or false, got {d.on_device!r}")
    _need(d.val_batch_size >= 1, "dataset.val_batch_size", f"must be >= 1, got {d.val_batch_size}")
    _need(d.train_images >= 0, "dataset.train_images", f"must be >= 0, got {d.train_images}")
    _need(d.val_images >= 0, "dataset.val_images", f"must be >= 0, got {d.val_images}")


def _check_model(cfg) -> None:
    from nps.pipeline.catalog import CRITERIA, FLOPS_CONVENTIONS
    from nps.pipeline.network.models import model_kind
    from nps.pipeline.network.pretrained import is_set

    m = cfg.model
    try:
        model_kind(m.name)
    except NpsError as exc:
        raise NpsError(f"model.name: {exc}") from None
    _need(m.resolution >= 0, "model.resolution", f"must be >= 0 (0: default), got {m.resolution}")
    _choice(m.mode, "model.mode", ("all", "internal"))
    _need(m.in_channels in (0, 1, 3), "model.in_channels", f"must be 1 or 3 (0: from the dataset), got {m.in_channels}")
    _need(m.num_classes >= 0, "model.num_classes", f"must be >= 0 (0: from the dataset), got {m.num_classes}")
    _choice(m.criterion, "model.criterion", tuple(CRITERIA))
    _need(m.channel_multiple >= 1, "model.channel_multiple", f"must be >= 1, got {m.channel_multiple}")
    _choice(m.flops, "model.flops", FLOPS_CONVENTIONS)
    _choice(m.pruning, "model.pruning", ("filters", "weights"))
    check_pretrained(m.pretrained, m.name, "model.pretrained")
    _need(not (m.checkpoint and is_set(m.pretrained)), "model.pretrained",
          "model.checkpoint is set too: a checkpoint is the trained base network (evaluated), pretrained weights a "
          "start that [base] fine-tunes; set one of them")
    check_references(cfg)


def _check_base(m, b) -> None:
    from nps.pipeline.network.pretrained import is_set

    if not m.checkpoint and not is_set(m.pretrained):
        _need(b.epochs >= 1, "base.epochs", f"must be >= 1 to train the base network (or set model.checkpoint, or "
                                             f"model.pretrained and 0 to evaluate it as it is), got {b.epochs}")
    _need(b.epochs >= 0, "base.epochs", f"must be >= 0, got {b.epochs}")
    _need(b.batch_size >= 1, "base.batch_size", f"must be >= 1, got {b.batch_size}")
    _need(b.lr > 0, "base.lr", f"must be > 0, got {b.lr}")
    _need(0 <= b.warmup_epochs and (b.epochs == 0 or b.warmup_epochs <= b.epochs), "base.warmup_epochs",
          f"must be in [0, base.epochs={b.epochs}], got {b.warmup_epochs}")
    _need(0 <= b.momentum < 1, "base.momentum", f"must be in [0, 1), got {b.momentum}")
    _need(b.weight_decay >= 0, "base.weight_decay", f"must be >= 0, got {b.weight_decay}")
    _need(0 <= b.label_smoothing < 1, "base.label_smoothing", f"must be in [0, 1), got {b.label_smoothing}")
    _need(b.holdout_images == "auto" or (isinstance(b.holdout_images, int) and b.holdout_images >= 0),
          "base.holdout_images", f"use 'auto' or a number >= 0, got {b.holdout_images!r}")
    _need(b.patience >= 0, "base.patience", f"must be >= 0 (0: no plateau rule), got {b.patience}")
    _need(b.holdout_bn_images >= 0, "base.holdout_bn_images", f"use 0 (off) or a number of images, got "
          f"{b.holdout_bn_images}")
    _need(not (b.patience and b.holdout_images == 0), "base.patience",
          "the plateau rule scores a holdout of the training set: set base.holdout_images (or patience = 0)")
    _need(b.min_delta >= 0, "base.min_delta", f"must be >= 0, got {b.min_delta}")
    _need(b.cooldown_epochs >= 1, "base.cooldown_epochs", f"must be >= 1 (the cool-down ends the learning rate at 0),"
                                                          f" got {b.cooldown_epochs}")
    _choice(b.amp, "base.amp", AMP)

    _need(b.bn_images >= 0, "base.bn_images", f"must be >= 0, got {b.bn_images}")


def _check_retrain(r, t) -> None:
    _need(r.train_images >= 0, "retrain.train_images", f"must be >= 0, got {r.train_images}")
    _need(r.epochs >= 1, "retrain.epochs", f"must be >= 1, got {r.epochs}")
    r.check("retrain")
    if t.enabled and r.method != "finetune":
        _need(r.warmup_epochs <= t.full_epochs, "retrain.warmup_epochs",
              f"{r.warmup_epochs} exceeds two_stage.full_epochs ({t.full_epochs})")
    _need(r.batch_size >= 1, "retrain.batch_size", f"must be >= 1, got {r.batch_size}")
    _need(r.cohort_size == "auto" or (isinstance(r.cohort_size, int) and r.cohort_size >= 1), "retrain.cohort_size",
          f"use 'auto' or a number >= 1, got {r.cohort_size!r}")
    _need(r.bn_images >= 0, "retrain.bn_images", f"must be >= 0, got {r.bn_images}")
    _need(r.fuse in (True, False, "auto"), "retrain.fuse", f"use 'auto', true or false, got {r.fuse!r}")
    _need(r.fuse_max_waste >= 0, "retrain.fuse_max_waste", f"must be >= 0, got {r.fuse_max_waste}")
    _choice(r.amp, "retrain.amp", AMP)

    if t.enabled:
        _need(t.top_k >= 1, "two_stage.top_k", f"must be >= 1, got {t.top_k}")
        _need(t.full_epochs >= 1, "two_stage.full_epochs", f"must be >= 1, got {t.full_epochs}")


def check_references(cfg) -> None:
    """``[[references]]``: known models, each once, epochs, pretrained and resolution that mean something."""
    from nps.pipeline.network.models import model_kind
    from nps.pipeline.network.pretrained import is_set

    m, b = cfg.model, cfg.base
    seen_refs = set()
    for i, ref in enumerate(cfg.references):
        _need(bool(ref.model), f"references[{i}].model", "name the reference network, e.g. timm:fbnetv3_b")
        try:
            model_kind(ref.model)
        except NpsError as exc:
            raise NpsError(f"references[{i}].model: {exc}") from None
        _need(ref.model not in seen_refs, f"references[{i}].model", f"{ref.model} is already a reference")
        if ref.model == m.name:  # the worker knows a network by its name: a reference of the base's model starts alike
            _need(_start(ref.pretrained) == _start(m.pretrained), f"references[{i}].pretrained",
                  f"{ref.model} is also model.name, and a reference of the base's model starts from the base's "
                  "start: give it model.pretrained's value, or use another model")
            _need(ref.resolution in (0, m.resolution), f"references[{i}].resolution",
                  f"{ref.model} is also model.name, and a reference of the base's model runs at model.resolution")
        _need(ref.seeds >= 1, f"references[{i}].seeds", f"must be >= 1 (trainings of it), got {ref.seeds}")
        _need(ref.epochs >= 0, f"references[{i}].epochs", f"must be >= 0 (0: base.epochs), got {ref.epochs}")
        check_pretrained(ref.pretrained, ref.model, f"references[{i}].pretrained")
        _need(ref.epochs or b.epochs or is_set(ref.pretrained), f"references[{i}].epochs",
              "base.epochs is 0 and this reference is not pretrained: it would be evaluated untrained; give it "
              "epochs or pretrained weights")
        _need(ref.resolution >= 0, f"references[{i}].resolution",
              f"must be >= 0 (0: model.resolution), got {ref.resolution}")
        seen_refs.add(ref.model)


def _start(pretrained):
    """A ``pretrained`` value with every way of saying "from scratch" as False."""
    from nps.pipeline.network.pretrained import is_set

    return pretrained if is_set(pretrained) else False


def check_pretrained(pretrained, name: str, key: str) -> None:
    """A ``pretrained`` value that can mean something for ``name`` (whether the weights can be had on this machine
    is the preflight's check: it needs the library and maybe the network)."""
    from nps.pipeline.network.models import model_kind

    if pretrained is True:
        _need(model_kind(name) in ("torchvision", "timm"), key,
              f"{name} has no library pretrained weights (torchvision and timm have them); give a local file: "
              f"{key.rpartition('.')[2]} = \"path/to/weights.pt\" (its state_dict)")


def check_ray_address(text: str, *, key: str = "--ray") -> str:
    """``""`` (no Ray), ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (Ray Client); returns it stripped."""
    text = str(text).strip()
    _need(text in ("", "auto") or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}", text) is not None, key,
          f"{text!r} is not a Ray address: use auto or HOST:PORT of the head node (e.g. 10.0.0.1:6379)")
    return text


def parse_devices(text: str, *, key: str = "--devices") -> list[str]:
    """``auto`` → every CUDA device, else ``["cpu"]``; ``cpu`` (repeatable: ``cpu,cpu`` = two CPU workers);
    GPU indices ``0,1`` or ``cuda:0``. Returns torch device strings, one per worker."""
    text = str(text).strip()
    if text == "auto":
        import torch

        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "cpu":
            out.append("cpu")
        elif item.isdigit():
            out.append(f"cuda:{int(item)}")
        elif re.fullmatch(r"cuda:\d+", item):
            out.append(item)
        else:
            raise NpsError(f"{key}: {item!r} is not a device (use auto, cpu, or GPU indices like 0,1)")
    _need(bool(out), key, "no device given")
    cuda = [d for d in out if d != "cpu"]
    _need(len(set(cuda)) == len(cuda), key, "a GPU is listed twice (one worker per GPU)")
    return out
