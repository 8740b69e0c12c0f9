"""The experiment: one TOML file (or a preset shipped with nps), its schema, defaults and validation.

An experiment file has these tables (every key optional; ``dump(Config())`` prints all defaults with comments)::

    [experiment]  name, description, seed, out, devices, ray
    [dataset]     dir (written by `nps convert`), workers, on_device, val_batch_size, augment, train_images,
                  val_images
    [model]       name, checkpoint, pretrained, resolution, mode, in_channels, num_classes, criterion, pruning,
                  latency_model
    [base]        how nps trains the base network when model.checkpoint is empty
    [[spaces]]    name, c_flops, c_params or c_latency (a number or a list: one space per value), delta, R, sigma, n,
                  max_seconds; ratios (a ratio space); criterion, retrain.method, retrain.epochs (overrides:
                  a list expands into one space each; see nps.pipeline.experiment.space_plan)
    [[references]] model, epochs, pretrained, resolution, seeds: networks trained like the base and shown beside the
                  population (e.g. the smaller members of the base's family, to compare at equal FLOPs)
    [retrain]     method, epochs, lr, ..., batch_size, cohort_size, bn_images, eval_every_epoch, amp, compile
    [two_stage]   enabled, top_k, full_epochs
    [output]      keep_weights, top_k, latency

Relative paths (``experiment.out``, ``dataset.dir``, ``model.checkpoint``, ``pretrained``, ``model.latency_model``)
are relative to the current directory, like every other path given to ``nps``.

Resolution and complexity: ``model.resolution`` is the input size the loaders produce *and* the size FLOPs are
counted at (0: the stored size of small images, 224 otherwise); ``in_channels`` and ``num_classes`` default to the
dataset's. ``dataset.train_images`` / ``val_images`` shorten epochs and evaluation (the demo uses them to fit two
CPU cores); the base network and every subnetwork see the same validation images, so accuracy drops compare like
with like.

:func:`load_config` parses and type-checks (unknown keys are refused with a suggestion); :func:`check_config`
rejects impossible values without touching any file (``--print-config`` uses only that);
:func:`nps.pipeline.experiment.plan.validate` does everything else before any work starts (pycls' ``assert_cfg``). Every error
is one :class:`NpsError` line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment import space_plan
from nps.pipeline.experiment.checks import check_config
from nps.pipeline.training.spec import RetrainSpec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib


def _f(default=None, help: str = "", *, factory=None):  # noqa: A002 - the word the schema uses
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ExperimentConfig:
    name: str = _f("experiment", "a label, stored in results.h5")
    description: str = _f("", "one line for `nps presets`")
    seed: int = _f(0, "seeds recipe sampling, pruning ties, data order and base training")
    out: str = _f("runs/experiment", "output directory: results.h5, base.pt, log.jsonl, weights/ (--out overrides)")
    devices: str = _f("auto", "'auto' (every GPU, else the CPU), 'cpu', or GPU indices '0,1' (--devices overrides)")
    baseline: bool = _f(True, "train the uniform baseline of every regime (one row, paper section 3.1): "
                             "'baseline' for filter spaces, 'weights:uniform' for weight spaces")
    ray: str = _f("", "a Ray cluster: 'auto' (RAY_ADDRESS, else a local Ray) or HOST:PORT; empty: processes on this "
                      "machine (--ray overrides)")


@dataclass
class DatasetConfig:
    dir: str = _f("", "a directory written by `nps convert` (train.beton, val.beton, meta.json)")
    workers: int = _f(0, "loader threads per device worker (0: the CPUs available to it)")
    on_device: bool | str = _f("auto", "keep the whole dataset on the device: 'auto', true or false")
    val_batch_size: int = _f(256, "evaluation batch size")
    augment: bool = _f(True, "training augmentation: pad-and-crop + flip (small images), random-resized crop + flip")
    train_images: int = _f(0, "images per training epoch, drawn from the shuffled train split (0: all)")
    val_images: int = _f(0, "evaluate on the first N validation images (0: all)")


@dataclass
class ModelConfig:
    name: str = _f("resnet50", "base network: a torchvision classification model (resnet50, mobilenet_v2, "
                               "efficientnet_b0…), a CIFAR ResNet (resnet20…), timm:<name> or package.module:function")
    checkpoint: str = _f("", "trained base weights (a state_dict .pt); empty: nps trains the base network ([base])")
    pretrained: bool | str = _f(False, "start [base] training from pretrained weights: true (the library's: timm, "
                                       "torchvision; fetched if not cached) or a local weights file; the classifier "
                                       "and stem are adapted to the dataset; base.epochs = 0 evaluates it as it is")
    resolution: int = _f(0, "input px; FLOPs are counted at it (0: stored size for images <= 64 px, else 224)")
    mode: str = _f("all", "'all' (stem and residual channels too) or 'internal' (convs inside blocks only)")
    in_channels: int = _f(0, "input channels (0: from the dataset, 1 for grayscale, else 3)")
    num_classes: int = _f(0, "classifier outputs (0: from the dataset)")
    criterion: str = _f("l2", "filter importance: l2 (the paper), l1, fpgm, random")
    channel_multiple: int = _f(1, "keep channel counts in multiples of this where the width allows (8: tensor cores)")
    flops: str = _f("macs", "FLOPs convention: macs (conv+linear multiply-accumulates) or paper (ptflops' count)")
    pruning: str = _f("filters", "what a space prunes unless its name says (weights:<space>): filters (channels, "
                                 "the paper) or weights (unstructured, by magnitude, masks held while fine-tuning)")
    latency_model: str = _f("", "a latency model of this network (a file nps latency-model wrote): what c_latency "
                                "spaces are priced by, stored in results.h5 (empty: none)")


# What training/devices.py's resolve_amp makes of each value, "auto" above all (it is not "off" on every CPU).
AMP_HELP = ("autocast: auto (GPUs: bf16, else fp16; a CPU with AVX512-BF16 or AMX-BF16: bf16 unless the network has "
            "depthwise convs; other CPUs: off), bf16, fp16, off")


@dataclass
class BaseConfig:
    epochs: int = _f(30, "most base training epochs (only without model.checkpoint); fewer when the holdout top-1 "
                         "plateaus (patience)")
    batch_size: int = _f(128, "training batch size")
    lr: float = _f(0.1, "peak learning rate (linear warm-up, then cosine to 0 at base.epochs, or a cool-down)")
    warmup_epochs: float = _f(1.0, "linear warm-up epochs")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    label_smoothing: float = _f(0.0, "label smoothing")
    amp: str = _f("auto", AMP_HELP)
    bn_images: int = _f(2048, "precise BN: recompute BN statistics on this many training images after training, "
                              "before the final evaluation (0: off)")
    holdout_images: int | str = _f("auto", "training images held out (never trained on) and scored after every "
                                           "epoch for the plateau rule: the last N of a seeded permutation of the "
                                           "train split; auto: min(5000, a tenth of it); 0: none (no plateau rule)")
    patience: int = _f(5, "plateau rule: stop when the best holdout top-1 of the last `patience` epochs is not "
                          "above the best before them by more than min_delta (0: train every epoch)")
    min_delta: float = _f(0.1, "plateau rule: holdout top-1 percentage points that count as progress")
    holdout_bn_images: int = _f(0, "plateau rule: score the holdout after re-estimating BN statistics on this many "
                                   "training images (a copy of the network; 0: with its running statistics). For "
                                   "networks whose eval-mode accuracy swings between epochs (FBNetV3 at 28 px)")
    cooldown_epochs: int = _f(2, "after a plateau, epochs of learning rate decaying linearly to 0, then stop; the "
                                 "last weights are kept")


@dataclass
class SpaceRetrainConfig:
    method: list[str] = _f(help="this space's retrain.method: a method or a list (one space each)", factory=list)
    epochs: list[int] = _f(help="this space's retrain.epochs: a number or a list (one space each)", factory=list)
    distill: list[bool] = _f(help="this space's retrain.distill: true, false or [false, true] (one space each: the "
                                  "same recipes fine-tuned without and with distillation)", factory=list)


@dataclass
class SpaceConfig:
    name: str = _f("std-0.05", "uniform, std-<sigma>, mcb-<lo>-<hi>, or ratios (fixed uniform ratios, paper "
                               "section 2); weights:uniform, weights:global, weights:std-<sigma>, "
                               "weights:mcb-<lo>-<hi> prune weights (model.pruning sets the kind of the others)")
    c_flops: list[float] = _f(help="target FLOPs(sub)/FLOPs(base): a number or a list", factory=list)
    c_params: list[float] = _f(help="target Params(sub)/Params(base) (instead of c_flops)", factory=list)
    c_latency: list[float] = _f(help="target predicted latency(sub)/latency(base) by model.latency_model (instead of "
                                     "c_flops; filter spaces)", factory=list)
    ratios: list[float] = _f(help="a ratio space's uniform pruning ratios (n rows each)", factory=list)
    delta: float = _f(0.002, "tolerance: |c - target| <= delta on integer channel counts")
    R: float = _f(0.95, "largest pruning ratio of a group")
    sigma: float = _f(0.0, "noise std per group (0: from the name; 0.1 for mcb spaces)")
    n: int = _f(100, "subnetworks sampled, pruned and retrained (a ratio space: rows per ratio)")
    max_seconds: float = _f(600.0, "give up sampling a space that would take longer than this")
    criterion: list[str] = _f(help="this space's filter importance (default model.criterion): one or a list",
                              factory=list)
    retrain: SpaceRetrainConfig = _f(help="overrides of [retrain] for this space", factory=SpaceRetrainConfig)


@dataclass
class RetrainConfig(RetrainSpec):
    """``[retrain]``: the retraining recipe (:class:`~nps.pipeline.training.spec.RetrainSpec`, its fields and checks) plus
    how the run trains and scores every subnetwork."""

    batch_size: int = _f(128, "training batch size (shared by a cohort)")
    cohort_size: int | str = _f("auto", "subnetworks trained together on one device: 'auto' or a number")
    bn_images: int = _f(500, "adaptive-BN images before fine-tuning; bn_top1 ranks candidates (0: skip)")
    eval_every_epoch: bool = _f(False, "evaluate after every epoch (fills the curve column)")
    amp: str = _f("auto", AMP_HELP)
    compile: bool = _f(False, "torch.compile every subnetwork")
    train_images: int = _f(0, "images per retraining epoch, from the shuffled train split (0: dataset.train_images)")
    fuse: bool | str = _f("auto", "train a cohort as one fused module: auto (GPUs; the CPU where measured faster), "
                                  "true or false")
    fuse_max_waste: float = _f(0.5, "a fused cohort's padding may add at most this fraction of its members' FLOPs "
                                    "(cohorts of similar rows; a wider one is split)")


@dataclass
class TwoStageConfig:
    enabled: bool = _f(False, "after retrain.epochs of every subnetwork, retrain the top_k of each space longer")
    top_k: int = _f(5, "best subnetworks (by top-1 after stage 1) retrained per space")
    full_epochs: int = _f(100, "epochs of the full retraining; results go to the space '<space>#top'")


@dataclass
class OutputConfig:
    keep_weights: str = _f("topk", "fine-tuned weights kept as weights/<space>/<row>.pt: all, topk or none")
    top_k: int = _f(5, "with keep_weights = 'topk': rows kept per space")
    latency: bool = _f(False, "at the end of the run, time every finished row and the base network (nps latency)")


@dataclass
class ReferenceConfig:
    model: str = _f("", "a reference network trained like the base ([base]) and evaluated beside the population, "
                        "e.g. timm:fbnetv3_b (a smaller member of the base's family)")
    epochs: int = _f(0, "its most training epochs, with [base]'s plateau rule (0: base.epochs)")
    pretrained: bool | str = _f(False, "start it from pretrained weights, as model.pretrained")
    resolution: int = _f(0, "its input px, for its training, evaluation and FLOPs (0: model.resolution); e.g. the "
                            "resolution it was pretrained at")
    seeds: int = _f(1, "trainings of this reference, each from its own seed (experiment.seed + i: initial weights "
                       "and data order; the same holdout and validation images): the spread of the reference the "
                       "pruned networks are compared with (2 or more give the verdict an interval over seeds)")


@dataclass(frozen=True)
class ReferenceTraining:
    """One training of a ``[[references]]`` entry: ``name`` (``model``, then ``model#1``, ``model#2`` ... for the
    further seeds: the key of its results group and checkpoint), the architecture, and ``replica`` (its seed is
    ``experiment.seed + replica``)."""

    name: str
    model: str
    replica: int
    config: "ReferenceConfig"


def reference_trainings(cfg: "Config") -> list[ReferenceTraining]:
    """Every reference training the experiment asks for, in order (each entry's seeds in turn)."""
    return [ReferenceTraining(ref.model if i == 0 else f"{ref.model}#{i}", ref.model, i, ref)
            for ref in cfg.references for i in range(ref.seeds)]


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    spaces: list[SpaceConfig] = field(default_factory=list)
    references: list[ReferenceConfig] = field(default_factory=list)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
# Keys that do not change any result: a run may be resumed with other values of these.
RUNTIME_KEYS = frozenset({
    "experiment.out", "experiment.devices", "experiment.ray", "experiment.description", "dataset.dir",
    "dataset.workers",
    "dataset.on_device", "retrain.cohort_size", "retrain.compile", "retrain.fuse", "retrain.fuse_max_waste",
    "output.keep_weights", "output.top_k", "output.latency",
})

TARGET_KEYS = ("c_flops", "c_params", "c_latency")  # a space's target: exactly one of these
PRESETS_DIR = "presets"  # inside the nps.pipeline.experiment package (pyproject: package-data)


# --------------------------------------------------------------------------------------------------------------------
# Parsing: dict -> dataclasses, with the key named in every error.


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def _type_name(tp) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    return str(tp)


def _coerce(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, list[float] or a union of those), else NpsError."""
    if isinstance(tp, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except NpsError:
                continue
        names = " or ".join(_type_name(t) for t in typing.get_args(tp))
        raise NpsError(f"{key}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        values = value if isinstance(value, list) else [value]
        if not values:
            raise NpsError(f"{key}: an empty list")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(values)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise NpsError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise NpsError(f"{prefix}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise NpsError(f"{prefix}.{key}: unknown key{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """A :class:`Config` from parsed TOML; unknown tables or keys and wrong types raise NpsError naming the key."""
    kwargs: dict[str, Any] = {}
    for section, value in data.items():
        if section not in SECTIONS:
            raise NpsError(f"{section}: unknown table{_suggest(section, SECTIONS)}")
        if section in ("spaces", "references"):
            items = value if isinstance(value, list) else [value]
            cls = SpaceConfig if section == "spaces" else ReferenceConfig
            kwargs[section] = [_build(cls, item, f"{section}[{i}]") for i, item in enumerate(items)]
        else:
            kwargs[section] = _build(typing.get_type_hints(Config)[section], value, section)
    return Config(**kwargs)


def preset_names() -> list[str]:
    """Names of the experiments shipped inside the package (``pipeline/presets/<name>.toml``)."""
    root = resources.files("nps.pipeline.experiment").joinpath(PRESETS_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise NpsError(f"no preset {name!r} (presets: {', '.join(preset_names())})")
    return resources.files("nps.pipeline.experiment").joinpath(PRESETS_DIR, f"{name}.toml").read_text(encoding="utf-8")


def experiment_text(source: str) -> tuple[str, str]:
    """(TOML text, where it came from) of a TOML path or a preset name."""
    path = Path(source)
    if path.is_dir() and (source.endswith(".toml") or os.sep in source or source not in preset_names()):
        raise NpsError(f"EXPERIMENT: {source} is a directory; give an experiment file (TOML) or a preset name")
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError:
            raise NpsError(f"EXPERIMENT: {source} is not a text file (not UTF-8); give an experiment file (TOML), "
                           "e.g. from `nps run demo --print-config`") from None
        except OSError as exc:
            raise NpsError(f"EXPERIMENT: cannot read {source}: {exc.strerror}") from None
    if source.endswith(".toml") or os.sep in source:
        raise NpsError(f"EXPERIMENT: {source} does not exist")
    if source in preset_names():
        return preset_text(source), f"preset {source}"
    raise NpsError(f"EXPERIMENT: {source!r} is neither a TOML file nor a preset (presets: {', '.join(preset_names())})")


def parse_config(text: str, origin: str = "config") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NpsError(f"{origin}: not valid TOML ({exc})") from None
    return config_from_dict(data)


_OVERRIDE_RE = re.compile(r"^(?P<section>[a-z_]+)(?:\[(?P<index>\d+)\])?\.(?P<key>[A-Za-z_]+)=(?P<value>.*)$")


def apply_overrides(cfg: Config, overrides) -> Config:
    """``section.key=value`` (``spaces.key=value`` sets every space, ``spaces[i].key=value`` one); values are TOML
    (``3``, ``0.1``, ``true``, ``[0.1, 0.05]``), anything else a string."""
    for text in overrides or ():
        m = _OVERRIDE_RE.match(text.strip())
        if not m:
            raise NpsError(f"--set {text!r}: use section.key=value (e.g. retrain.epochs=5)")
        section, index, key, raw = m["section"], m["index"], m["key"], m["value"].strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if section not in SECTIONS:
            raise NpsError(f"--set {section}: unknown table{_suggest(section, SECTIONS)}")
        if section == "spaces":
            targets = cfg.spaces if index is None else cfg.spaces[int(index):int(index) + 1]
            if index is not None and not targets:
                raise NpsError(f"--set spaces[{index}]: the experiment has {len(cfg.spaces)} spaces")
            prefixes = [f"spaces[{i}]" for i in range(len(cfg.spaces))] if index is None else [f"spaces[{index}]"]
        elif index is not None:
            raise NpsError(f"--set {section}[{index}]: only spaces is a list")
        else:
            targets, prefixes = [getattr(cfg, section)], [section]
        for obj, prefix in zip(targets, prefixes):
            hints = typing.get_type_hints(type(obj))
            if key not in hints:
                raise NpsError(f"--set {prefix}.{key}: unknown key{_suggest(key, list(hints))}")
            setattr(obj, key, _coerce(value, hints[key], f"{prefix}.{key}"))
            if section == "spaces" and key in TARGET_KEYS:  # one target per space
                for other in TARGET_KEYS:
                    if other != key:
                        setattr(obj, other, [])
    return cfg


def load_config(source: str, overrides=(), out: str | None = None) -> Config:
    """Parse a TOML path or preset name, apply ``--set`` overrides and ``--out``; check the values (no files)."""
    text, origin = experiment_text(source)
    cfg = apply_overrides(parse_config(text, origin), overrides)
    if out:
        cfg.experiment.out = out
    return check_config(cfg)


def expand_spaces(cfg: Config):
    """Every space the experiment runs (:class:`nps.pipeline.experiment.space_plan.PlannedSpace`), in order."""
    return space_plan.expand(cfg)
