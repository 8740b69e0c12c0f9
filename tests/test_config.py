"""Experiment files: parsing, defaults, TOML round trips, presets, overrides, and one test per invalid case (each
error is one line naming the key)."""
from __future__ import annotations

import sys

import pytest
import torch

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.config import (
    Config,
    apply_overrides,
    expand_spaces,
    load_config,
    parse_config,
    preset_names,
)
from nps.pipeline.experiment.plan import validate
from nps.pipeline.experiment.toml_text import differing_keys, dump

needs_fmnist = pytest.mark.fmnist  # conftest: skipped without the Debian files, failed under CI


@pytest.fixture(scope="module")
def data_dir(fmnist_dir):
    """Fashion-MNIST, first 64 images of each split."""
    return fmnist_dir(64)


def tiny_toml(data_dir, out, extra: str = "", spaces: str | None = None) -> str:
    spaces = spaces if spaces is not None else '[[spaces]]\nname = "std-0.05"\nc_flops = 0.25\nn = 4\n'
    return f"""
[experiment]
name = "tiny"
out = "{out}"
devices = "cpu"

[dataset]
dir = "{data_dir}"

[model]
name = "resnet20"

[base]
epochs = 1

{spaces}
[retrain]
epochs = 1
{extra}
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(NpsError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------------- schema


def test_defaults_dump_and_parse_back():
    cfg = Config()
    text = dump(cfg, comments=True)
    assert "[retrain]" in text and "# " in text
    assert parse_config(text) == cfg
    assert parse_config(dump(cfg)) == cfg


@pytest.mark.parametrize("name", ["demo", "paper-cifar10-resnet50", "paper-imagenet-resnet50"])
def test_presets_load_check_and_round_trip(name):
    assert name in preset_names()
    cfg = load_config(name)
    assert parse_config(dump(cfg)) == cfg
    assert cfg.experiment.description


def test_paper_presets_follow_the_paper():
    cifar = load_config("paper-cifar10-resnet50")
    spaces = [p.space for p in expand_spaces(cifar) if p.kind == "sampled"]
    assert sorted({s.name for s in spaces}) == ["std-0.01", "std-0.05", "std-0.1"]
    assert sorted({s.value for s in spaces}) == [0.02, 0.05, 0.1, 0.25]
    assert all(s.delta == 0.002 for s in spaces) and {c.n for c in cifar.spaces} == {100}
    assert [p.key for p in expand_spaces(cifar) if p.kind == "baseline"] == [
        f"baseline@c_flops={v:g}" for v in (0.25, 0.1, 0.05, 0.02)]
    assert (cifar.model.name, cifar.model.resolution, cifar.retrain.epochs, cifar.retrain.lr) == \
        ("resnet50", 224, 50, 0.01)
    imagenet = load_config("paper-imagenet-resnet50")
    (space_cfg,) = imagenet.spaces
    assert space_cfg.name == "mcb-0.9-1.1" and space_cfg.n == 300 and imagenet.retrain.epochs == 5
    assert imagenet.two_stage.enabled and imagenet.two_stage.top_k == 5 and imagenet.two_stage.full_epochs == 100


def test_a_list_of_targets_is_one_space_per_value():
    cfg = parse_config('[dataset]\ndir = "x"\n[[spaces]]\nname = "std-0.1"\nc_flops = [0.25, 0.1]\n')
    assert [p.key for p in expand_spaces(cfg)] == ["std-0.1@c_flops=0.25", "std-0.1@c_flops=0.1",
                                                   "baseline@c_flops=0.25", "baseline@c_flops=0.1"]
    assert parse_config(dump(cfg)) == cfg


def test_overrides_and_out(tmp_path):
    path = write(tmp_path, tiny_toml("data", "runs/x"))
    cfg = load_config(path, ["retrain.epochs=3", "spaces.n=7", "dataset.on_device=false", "spaces[0].c_params=0.5"],
                      out="elsewhere")
    assert cfg.retrain.epochs == 3 and cfg.spaces[0].n == 7 and cfg.dataset.on_device is False
    assert cfg.spaces[0].c_params == [0.5] and cfg.spaces[0].c_flops == []
    assert cfg.experiment.out == "elsewhere"
    assert "retrain.epoch: unknown key (did you mean 'epochs'?)" in error_of(apply_overrides, cfg, ["retrain.epoch=2"])


def test_differing_keys_ignores_runtime_settings():
    a, b = Config(), Config()
    b.experiment.out, b.retrain.cohort_size, b.experiment.devices = "other", 3, "0,1"
    assert differing_keys(a, b) == []
    b.retrain.epochs = 7
    assert differing_keys(a, b) == [("retrain.epochs", 50, 7)]


def test_print_config_cli(capsys):
    from nps.pipeline.cli import main

    assert main(["run", "demo", "--print-config"]) == 0
    out = capsys.readouterr()
    assert parse_config(out.out) == load_config("demo"), out.err


# -------------------------------------------------------------------------------- invalid experiments: one each


@pytest.mark.parametrize("text, message", [
    ("[retrain]\nepoch = 3\n", "retrain.epoch: unknown key (did you mean 'epochs'?)"),
    ("[retrian]\nepochs = 3\n", "retrian: unknown table (did you mean 'retrain'?)"),
    ("[retrain]\nepochs = 'ten'\n", "retrain.epochs: expected an integer, got 'ten'"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\nsigmaa = 0.1\n", "spaces[0].sigmaa: unknown key (did you mean "
                                                                     "'sigma'?)"),
    ("[experiment\nname = 1\n", "not valid TOML"),
])
def test_unknown_keys_and_wrong_types(tmp_path, text, message):
    assert message in error_of(load_config, write(tmp_path, text))


@pytest.mark.parametrize("extra, message", [
    ("[retrain]\nepochs = 0\n", "retrain.epochs: must be >= 1"),
    ("[retrain]\nmethod = 'prune-harder'\n", "retrain.method: 'prune-harder' is not one of finetune, rewind, scratch"),
    ("[retrain]\ncohort_size = 0\n", "retrain.cohort_size: use 'auto' or a number >= 1"),
    ("[model]\nname = 'resnet21'\n", "model.name: unknown model 'resnet21' (did you mean"),
    ("[model]\nmode = 'some'\n", "model.mode: 'some' is not one of all, internal"),
    ("[base]\nepochs = 0\n", "base.epochs: must be >= 1 to train the base network"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 1.5\n", "spaces[0].c_flops: 1.5 is not a relative complexity"),
    ("[[spaces]]\nname = 'std-0.05'\n", "spaces[0].c_flops: give c_flops, c_params or c_latency"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\nc_latency = 0.5\n",
     "spaces[0].c_flops: give exactly one of c_flops, c_params and c_latency (got c_flops and c_latency)"),
    ("[[references]]\nmodel = 'resnet20'\nseeds = 0\n", "references[0].seeds: must be >= 1"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\nc_params = 0.25\n", "spaces[0].c_flops: give exactly one"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\ndelta = 0.7\n", "spaces[0].delta: must be in (0, 0.5)"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\nn = 0\n", "spaces[0].n: must be >= 1"),
    ("[[spaces]]\nname = 'gauss-0.05'\nc_flops = 0.25\n", "spaces[0].name: space 'gauss-0.05'"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\n[[spaces]]\nname = 'std-0.05'\nc_flops = [0.1, 0.25]\n",
     "spaces[1]: std-0.05@c_flops=0.25 is already given by spaces[0]"),
    ("[[spaces]]\nname = 'std-0.05'\nc_flops = 0.25\nn = 3\n[two_stage]\nenabled = true\ntop_k = 5\n",
     "two_stage.top_k: 5 is more than the smallest space's n (3)"),
    ("[output]\nkeep_weights = 'some'\n", "output.keep_weights: 'some' is not one of all, topk, none"),
    ("[experiment]\ndevices = 'tpu'\n", "experiment.devices: 'tpu' is not a device"),
])
def test_impossible_values(tmp_path, extra, message):
    base = '[dataset]\ndir = "d"\n'
    if "[[spaces]]" not in extra:
        base += '[[spaces]]\nname = "std-0.05"\nc_flops = 0.25\n'
    assert message in error_of(load_config, write(tmp_path, base + extra))


def test_missing_dataset_dir(tmp_path):
    cfg = parse_config(tiny_toml(tmp_path / "nowhere", tmp_path / "run"))
    message = error_of(validate, cfg)
    assert message.startswith("dataset.dir: ") and "does not exist" in message and "nps convert" in message


def test_dataset_dir_not_converted(tmp_path):
    (tmp_path / "raw").mkdir()
    cfg = parse_config(tiny_toml(tmp_path / "raw", tmp_path / "run"))
    message = error_of(validate, cfg)
    assert message.startswith("dataset.dir: ") and "not a converted dataset (no meta.json)" in message
    assert "nps convert" in message


@needs_fmnist
def test_valid_experiment_resolves_from_the_dataset(data_dir, tmp_path):
    plan = validate(parse_config(tiny_toml(data_dir, tmp_path / "run")))
    assert (plan.in_channels, plan.num_classes, plan.resolution) == (1, 10, 28)
    assert plan.table.in_channels == 1 and plan.table.resolution == 28
    assert [p.key for p in plan.spaces] == ["std-0.05@c_flops=0.25", "baseline@c_flops=0.25"]


@needs_fmnist
def test_checkpoint_that_does_not_match_the_model(data_dir, tmp_path):
    from nps.pipeline.network.models import build_model

    wrong = tmp_path / "resnet20-rgb.pt"
    torch.save(build_model("resnet20", num_classes=10, in_channels=3).state_dict(), wrong)  # the data is grayscale
    cfg = parse_config(tiny_toml(data_dir, tmp_path / "run"))
    cfg.model.checkpoint = str(wrong)
    message = error_of(validate, cfg)
    assert message.startswith("model.checkpoint: ") and "does not match resnet20" in message
    assert "conv1.weight" in message
    cfg.model.checkpoint = str(tmp_path / "absent.pt")
    assert error_of(validate, cfg).startswith("model.checkpoint: ")
    right = tmp_path / "resnet20-grey.pt"
    torch.save({"model": build_model("resnet20", num_classes=10, in_channels=1).state_dict()}, right)
    cfg.model.checkpoint = str(right)
    assert validate(cfg).checkpoint == str(right)


@needs_fmnist
def test_unsatisfiable_constraint_names_the_space_and_the_reachable_range(data_dir, tmp_path):
    spaces = ('[[spaces]]\nname = "std-0.05"\nc_flops = 0.25\n'
              '[[spaces]]\nname = "std-0.01"\nc_flops = [0.1, 0.001]\n')
    cfg = parse_config(tiny_toml(data_dir, tmp_path / "run", spaces=spaces))
    message = error_of(validate, cfg)
    assert message.startswith("spaces[1].c_flops: c_flops=0.001 is out of reach for resnet20")
    assert "reachable c_flops is [" in message


def test_cli_reports_a_bad_experiment_in_one_line(tmp_path, capsys):
    from nps.pipeline.cli import main

    path = write(tmp_path, "[retrain]\nepoch = 3\n")
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "nps run: error: retrain.epoch: unknown key (did you mean 'epochs'?)"


def test_debug_shows_the_traceback_of_bad_input(tmp_path, capsys):
    import logging

    from nps.pipeline.cli import main

    path = write(tmp_path, "[retrain]\nepoch = 3\n")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        assert main(["--debug", "run", str(path)]) == 2
    finally:  # --debug configures logging for the process; leave the test session's as it was
        root.setLevel(level)
        root.handlers[:] = handlers
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().endswith("nps run: error: retrain.epoch: unknown key (did you mean 'epochs'?)")


def test_a_broken_invariant_is_a_bug_not_bad_input(monkeypatch):
    """Only bad input becomes a one-line error (exit 2); anything else propagates with its traceback."""
    import nps.pipeline.commands.presets as presets
    from nps.pipeline.cli import main

    def broken(args):
        raise RuntimeError("rows were queued but are not all pending")

    monkeypatch.setattr(presets, "run", broken)
    with pytest.raises(RuntimeError, match="not all pending"):
        main(["presets"])


def test_ray_without_ray_installed_says_how_to_install_it(monkeypatch, capsys):
    from nps.pipeline.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without Ray installed
    assert main(["run", "demo", "--ray"]) == 2
    assert capsys.readouterr().err.strip() == ("nps run: error: --ray: Ray is not installed; install Ray: pip install "
                                               "'nps[ray]' (or pip install 'ray[default]')")
    assert main(["run", "demo", "--set", "experiment.ray=auto"]) == 2
    assert capsys.readouterr().err.startswith("nps run: error: experiment.ray: Ray is not installed")
    monkeypatch.delitem(sys.modules, "ray")
    assert main(["run", "demo", "--ray", "headnode"]) == 2
    assert "--ray: 'headnode' is not a Ray address: use auto or HOST:PORT" in capsys.readouterr().err


def test_dump_writes_strings_and_numbers_that_load_back_exactly():
    """TOML written by tomli-w: quotes, backslashes, newlines and unicode in strings, and floats, survive."""
    from nps.pipeline.experiment.toml_text import toml_lines

    cfg = parse_config('[experiment]\ndescription = "a \\"quoted\\" C:\\\\data\\\\fmnist, tab\\tand é"\n'
                       '[[spaces]]\nname = "std-0.05"\nc_flops = [0.1, 0.3333333333333333]\n')
    again = parse_config(dump(cfg))
    assert again == cfg and again.experiment.description == 'a "quoted" C:\\data\\fmnist, tab\tand é'
    import tomllib

    text = toml_lines({"model": 'x"y\\z', "c_flops": [0.1, 0.25], "n": 3, "seed": None})
    assert tomllib.loads(text) == {"model": 'x"y\\z', "c_flops": [0.1, 0.25], "n": 3}


@needs_fmnist
def test_a_latency_space_needs_the_latency_model_of_its_network(data_dir, tmp_path):
    """[[spaces]] c_latency without model.latency_model, or with a model of another resolution, is one line naming
    the key; with a model of this network the plan's table carries its form and the plan its model."""
    from test_latency_regime import fake_model, latency_model_of

    from nps.pipeline.network.layer_table import build_layer_table

    space = '[[spaces]]\nname = "std-0.05"\nc_latency = 0.8\nn = 4\n'
    message = error_of(validate, parse_config(tiny_toml(data_dir, tmp_path / "run", spaces=space)))
    assert message.startswith("spaces[0].c_latency: needs model.latency_model: measure one with nps latency-model")
    for resolution, ok in ((32, False), (28, True)):
        fake = fake_model("resnet20", resolution)
        path = tmp_path / f"model{resolution}.h5"
        latency_model_of(fake, build_layer_table("resnet20", "all", 28, 10, 1)).save(path)
        text = tiny_toml(data_dir, tmp_path / f"run{resolution}", spaces=space).replace(
            'name = "resnet20"\n', f'name = "resnet20"\nlatency_model = "{path}"\n')
        if not ok:
            message = error_of(validate, parse_config(text))
            assert message.startswith("model.latency_model: the latency model is of resolution 32")
            continue
        plan = validate(parse_config(text))
        assert plan.table.latency is not None and plan.latency_model.batch == 8
        assert [(p.target, p.value) for p in plan.spaces if p.kind == "sampled"] == [("c_latency", 0.8)]
