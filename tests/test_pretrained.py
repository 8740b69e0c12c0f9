"""Pretrained starts (issue 29, item 3): ``[model] pretrained`` and each ``[[references]]`` entry's.

- a torchvision and a timm network start from a local file made for another number of classes and input channels:
  the stem adapted as timm's ``in_chans`` adapts it (timm's ``adapt_input_conv`` is the oracle), the classifier
  freshly initialised, every other tensor equal to the file's;
- weights that cannot be had are refused before any work in one line naming the key, the model and how to give a
  local file (the network probe replaced: no test downloads or connects);
- a tiny run on Fashion-MNIST from a local file: ``base.epochs = 0`` keeps the start as it is (its BN statistics
  too) and evaluates it, ``base.epochs = 1`` fine-tunes it; a pretrained reference at its own resolution;
- the ``fbnetv3-imagenet`` preset: its ``--print-config``, and its targets are the references' FLOPs at their
  resolution over FBNetV3-G's at its own.
"""
from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from torch import nn

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.checks import check_config
from nps.pipeline.experiment.config import load_config, parse_config
from nps.pipeline.network import pretrained as pt
from nps.pipeline.network.models import build_model

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches a model hub or depends on this machine's caches: nothing is cached, nothing is reachable."""
    probes = []
    monkeypatch.setattr(pt, "reachable", lambda url, timeout=0: probes.append(url) or False)
    monkeypatch.setattr(pt, "cached_file", lambda name: "")
    return probes


def _source(name: str, seed: int = 1) -> dict:
    """A network's state_dict as its library ships it: ImageNet's 1000 classes, 3 input channels (random weights:
    what is compared is where each tensor goes, not what it learned)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=1000, in_channels=3)
    for m in model.modules():  # BN statistics as a trained network has them, not the 0/1 of a fresh one
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(1234)
    return model.state_dict()


def _check_start(name: str, path, stem: str, head: tuple[str, ...], num_classes: int, in_channels: int) -> None:
    source = _source(name)
    torch.manual_seed(0)
    fresh = build_model(name, num_classes=num_classes, in_channels=in_channels).state_dict()
    torch.manual_seed(0)
    state = pt.build_start(name, str(path), num_classes, in_channels).state_dict()
    assert set(state) == set(source)
    for key, tensor in state.items():
        if key == stem:
            assert tensor.shape[1] == in_channels and source[key].shape[1] == 3
        elif key in head:
            assert tensor.shape[0] == num_classes != source[key].shape[0]
            assert torch.equal(tensor, fresh[key]), key  # the model's own (seeded) initialisation
        else:
            assert torch.equal(tensor, source[key]), key
    from timm.models import adapt_input_conv

    assert torch.allclose(state[stem], adapt_input_conv(in_channels, source[stem]), rtol=0, atol=1e-6)


def test_a_torchvision_start_from_a_local_file_adapts_stem_and_head(tmp_path):
    path = tmp_path / "mobilenet_v3_small.pt"
    torch.save(_source("mobilenet_v3_small"), path)
    _check_start("mobilenet_v3_small", path, "features.0.0.weight", ("classifier.3.weight", "classifier.3.bias"),
                 num_classes=10, in_channels=1)


def test_a_timm_start_from_a_nested_checkpoint_and_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    nested = tmp_path / "resnet10t.pth"  # as timm's train.py nests it
    torch.save({"state_dict": {f"module.{k}": v for k, v in _source("timm:resnet10t").items()}, "epoch": 3}, nested)
    _check_start("timm:resnet10t", nested, "conv1.0.weight", ("fc.weight", "fc.bias"), num_classes=7, in_channels=1)
    hub = tmp_path / "model.safetensors"  # the Hugging Face hub's form
    save_file(_source("timm:resnet10t"), str(hub))
    _check_start("timm:resnet10t", hub, "conv1.0.weight", ("fc.weight", "fc.bias"), num_classes=7, in_channels=1)


@pytest.mark.parametrize("in_channels", [1, 2, 4, 6])
def test_the_stem_is_adapted_as_timm_adapts_it(in_channels):
    from timm.models import adapt_input_conv

    weight = torch.randn(16, 3, 3, 3)
    ours = pt.adapt_input_conv(weight, in_channels)
    assert ours.shape == (16, in_channels, 3, 3)
    assert torch.allclose(ours, adapt_input_conv(in_channels, weight.clone()), rtol=0, atol=1e-6)
    if in_channels % 3 == 0 or in_channels == 1:  # what the rule keeps there: a grey image's RGB response
        x = torch.rand(1, 1, 8, 8)
        rgb = nn.functional.conv2d(x.expand(1, 3, 8, 8), weight)
        assert torch.allclose(nn.functional.conv2d(x.expand(1, in_channels, 8, 8), ours), rgb, atol=1e-5)


def test_the_same_classes_keep_the_file_classifier(tmp_path):
    """ImageNet to ImageNet: a classifier that fits is the file's (evaluating a pretrained network as it is)."""
    source = _source("mobilenet_v3_small")
    path = tmp_path / "w.pt"
    torch.save(source, path)
    state = pt.build_start("mobilenet_v3_small", str(path), 1000, 3).state_dict()
    assert all(torch.equal(state[k], source[k]) for k in source)


def test_weights_that_do_not_fit_or_cannot_be_had_are_one_line(tmp_path, offline):
    path = tmp_path / "mobilenet.pt"
    torch.save(_source("mobilenet_v3_small"), path)
    problem = pt.weights_problem("timm:resnet10t", str(path), 10, 1, "references[0].pretrained")
    assert problem.startswith(f"references[0].pretrained: {path} does not fit timm:resnet10t with 10 classes and "
                              "1 input channel (") and "missing keys" in problem and "\n" not in problem
    with pytest.raises(NpsError, match=r"does not fit mobilenet_v3_large .*give weights of mobilenet_v3_large"):
        pt.build_start("mobilenet_v3_large", str(path), 10, 1)
    # a file of the same model at another width is refused, not half loaded (only the stem and head may differ)
    torch.save(build_model("mobilenet_v3_small", num_classes=1000, in_channels=3).state_dict() | {
        "features.1.block.0.0.weight": torch.zeros(8, 1, 3, 3)}, path)
    assert "shape mismatch: features.1.block.0.0.weight" in pt.weights_problem("mobilenet_v3_small", str(path), 10,
                                                                               1, "model.pretrained")
    assert pt.weights_problem("mobilenet_v3_small", str(tmp_path / "nowhere.pt"), 10, 1, "model.pretrained") == (
        f"model.pretrained: {tmp_path / 'nowhere.pt'} does not exist; give the path of mobilenet_v3_small's weights "
        "file")
    # library weights neither cached nor reachable: the model, the key and how to give a local file
    for name, host in (("timm:resnet10t", "huggingface.co"), ("mobilenet_v3_small", "download.pytorch.org")):
        line = pt.weights_problem(name, True, 10, 1, "model.pretrained")
        assert line.startswith(f"model.pretrained: {name}'s pretrained weights are not cached on this machine and "
                               f"{host} cannot be reached; give a local file instead: model.pretrained = "
                               '"path/to/weights.pt"'), line
        assert "\n" not in line
    assert len(offline) == 2  # the probe was asked, and answered "offline" without a connection
    assert pt.weights_problem("timm:mobilenetv2_035", True, 10, 1, "model.pretrained").startswith(
        "model.pretrained: timm:mobilenetv2_035: timm has no pretrained weights for it; give a local file instead")


EXPERIMENT = """
[experiment]
name = "pretrained"
out = "{out}"
devices = "cpu"
baseline = false
[dataset]
dir = "{data}"
train_images = 64
val_images = 64
[model]
name = "mobilenet_v3_small"
pretrained = {pretrained}
[base]
epochs = {epochs}
batch_size = 32
bn_images = 32
warmup_epochs = 0.5
[[spaces]]
name = "std-0.05"
c_flops = 0.5
delta = 0.02
n = 1
[retrain]
epochs = 1
batch_size = 32
bn_images = 32
train_images = 64
"""


def _experiment(tmp_path, data="data", pretrained="true", epochs=0, extra="") -> str:
    out = tmp_path / f"run-{epochs}"
    return EXPERIMENT.format(out=out, data=data, pretrained=pretrained, epochs=epochs) + extra


@pytest.mark.parametrize("change, key", [
    (("pretrained = true", 'pretrained = true\ncheckpoint = "base.pt"'), "model.pretrained: model.checkpoint is set"),
    (("pretrained = true", "pretrained = false"), "base.epochs: must be >= 1 to train the base network"),
    (('"mobilenet_v3_small"', '"resnet20"'), "model.pretrained: resnet20 has no library pretrained weights"),
    (("[[spaces]]", '[[references]]\nmodel = "mobilenet_v3_small"\n[[spaces]]'),
     "references[0].pretrained: mobilenet_v3_small is also model.name"),
    (("[[spaces]]", '[[references]]\nmodel = "resnet20"\n[[spaces]]'),
     "references[0].epochs: base.epochs is 0 and this reference is not pretrained"),
    (("[[spaces]]", '[[references]]\nmodel = "resnet20"\npretrained = true\n[[spaces]]'),
     "references[0].pretrained: resnet20 has no library pretrained weights"),
])
def test_impossible_starts_are_refused_before_any_file(tmp_path, change, key):
    text = _experiment(tmp_path).replace(*change)
    with pytest.raises(NpsError) as info:
        check_config(parse_config(text))
    assert str(info.value).startswith(key) and "\n" not in str(info.value)


def test_epochs_0_is_valid_with_a_pretrained_start(tmp_path):
    cfg = check_config(parse_config(_experiment(tmp_path)))
    assert cfg.model.pretrained is True and cfg.base.epochs == 0
    cfg = check_config(parse_config(_experiment(tmp_path, pretrained='"w.pt"', extra="""
[[references]]
model = "timm:resnet10t"
pretrained = "r.pt"
resolution = 32
""")))
    assert cfg.model.pretrained == "w.pt" and cfg.references[0].pretrained == "r.pt"
    assert cfg.references[0].resolution == 32


def _run(argv) -> tuple[int, str]:
    from nps.pipeline.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


@pytest.mark.fmnist
def test_weights_that_cannot_be_had_stop_the_run_before_any_work(tmp_path, fmnist_dir, offline):
    exp = tmp_path / "e.toml"
    exp.write_text(_experiment(tmp_path, data=fmnist_dir(256)))
    code, err = _run(["run", str(exp), "--plain"])
    assert code == 2 and len(offline) == 1 and offline[0].startswith("https://download.pytorch.org/")
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.pretrained: mobilenet_v3_small's pretrained weights are not cached" in lines[0]
    assert not (tmp_path / "run-0").exists()


def _base_state(out) -> dict:
    from nps.pipeline.network.checkpoints import load_state_dict

    return load_state_dict(str(out / "base.pt"))


@pytest.mark.fmnist
def test_a_run_evaluates_a_local_pretrained_start_as_it_is(tmp_path, fmnist_dir):
    """base.epochs = 0: base.pt is the adapted start exactly (BN statistics too: no precise BN), its top-1 is that
    network's; a pretrained reference runs at its own resolution, its FLOPs counted there."""
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.results.reader import open_readonly

    weights, ref_weights = tmp_path / "mnv3.pt", tmp_path / "mnv3_050.pt"
    torch.save(_source("mobilenet_v3_small"), weights)
    torch.save(_source("timm:mobilenetv3_small_050"), ref_weights)
    exp = tmp_path / "e.toml"
    exp.write_text(_experiment(tmp_path, data=fmnist_dir(256), pretrained=f'"{weights}"', extra=f"""
[[references]]
model = "timm:mobilenetv3_small_050"
pretrained = "{ref_weights}"
resolution = 32
"""))
    code, err = _run(["run", str(exp), "--plain"])
    assert code == 0, err
    out = tmp_path / "run-0"
    torch.manual_seed(0)  # experiment.seed: the head's initialisation
    start = pt.build_start("mobilenet_v3_small", str(weights), 10, 1).state_dict()
    stored = _base_state(out)
    assert set(stored) == set(start) and all(torch.equal(stored[k], start[k]) for k in start)
    with open_readonly(out / "results.h5") as r:
        base_top1 = float(r.attrs["base_top1"])
        ref = r.references()["timm:mobilenetv3_small_050"]
    assert base_top1 == _top1("mobilenet_v3_small", start, fmnist_dir(256), 28)
    assert math.isfinite(ref["top1"]) and ref["resolution"] == 32
    assert ref["flops"] == build_layer_table("timm:mobilenetv3_small_050", "all", 32, 10, 1).base_flops
    assert ref["c_flops"] == ref["flops"] / build_layer_table("mobilenet_v3_small", "all", 28, 10, 1).base_flops


def _top1(name: str, state: dict, data, resolution: int) -> float:
    """Top-1 of a network with ``state`` on the run's 64 validation images, evaluated here (not by the run)."""
    from nps.datasets.loaders import make_loaders
    from nps.pipeline.run.worker import _Limited
    from nps.pipeline.training.evaluation import evaluate

    model = build_model(name, num_classes=10, in_channels=1)
    model.load_state_dict(state)
    _, val, _ = make_loaders(data, batch_size=32, resolution=resolution, in_channels=1, num_workers=1,
                             val_batch_size=256)
    return float(evaluate(model, _Limited(val, 64, whole_batches=False, contiguous=True), "cpu")[0])


@pytest.mark.fmnist
@pytest.mark.slow  # the default tier runs the evaluated start end to end; this adds one fine-tuning epoch
def test_a_run_fine_tunes_a_local_pretrained_start(tmp_path, fmnist_dir):
    weights = tmp_path / "mnv3.pt"
    torch.save(_source("mobilenet_v3_small"), weights)
    exp = tmp_path / "e.toml"
    exp.write_text(_experiment(tmp_path, data=fmnist_dir(256), pretrained=f'"{weights}"', epochs=1))
    code, err = _run(["run", str(exp), "--plain"])
    assert code == 0, err
    torch.manual_seed(0)
    start = pt.build_start("mobilenet_v3_small", str(weights), 10, 1).state_dict()
    stored = _base_state(tmp_path / "run-1")
    assert not torch.equal(stored["features.1.block.0.0.weight"], start["features.1.block.0.0.weight"])


def test_the_fbnetv3_imagenet_preset(capsys):
    """--print-config prints it (it cannot run here), and its targets are FBNetV3-D's and -B's FLOPs at 224 px over
    FBNetV3-G's at 240 px, as its comments compute them."""
    from nps.pipeline.cli import main
    from nps.pipeline.experiment.config import expand_spaces
    from nps.pipeline.network.layer_table import build_layer_table

    assert main(["run", "fbnetv3-imagenet", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert 'name = "timm:fbnetv3_g"' in printed and printed.count("pretrained = true") == 3
    cfg = load_config("fbnetv3-imagenet")
    assert (cfg.model.resolution, cfg.base.epochs, cfg.base.bn_images) == (240, 0, 0)
    refs = {r.model: r for r in cfg.references}
    assert set(refs) == {"timm:fbnetv3_d", "timm:fbnetv3_b"}
    assert all(r.pretrained is True and r.resolution == 224 and r.epochs == 0 for r in refs.values())
    base = build_layer_table("timm:fbnetv3_g", "all", 240, 1000, 3).base_flops
    targets = sorted({p.value for p in expand_spaces(cfg)})
    expected = sorted(build_layer_table(name, "all", 224, 1000, 3).base_flops / base for name in refs)
    assert len(targets) == 2 and all(abs(t - e) < 1e-4 for t, e in zip(targets, expected))
    assert {p.space.name for p in expand_spaces(cfg) if p.kind == "sampled"} >= {"std-0.05", "weights:std-0.05"}
