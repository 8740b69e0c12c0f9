"""Weight-pruning spaces: masks held through fine-tuning, the spaces in an experiment, references, export."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nps.kernels.spaces import parse_space, pruning_of
from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.config import parse_config
from nps.pipeline.experiment.space_plan import check as check_spaces
from nps.pipeline.network.masks import mask_counts, masked_copy, masked_layers
from nps.pipeline.network.models import build_model
from nps.pipeline.network.weight_table import build_weight_table
from nps.pipeline.training.cohort import train_cohort
from nps.pipeline.training.spec import RetrainSpec

torch.set_num_threads(1)


def _data(batches=6, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = torch.randn(batch, 1, 16, 16, generator=g)
        x[torch.arange(batch), 0, y, y] += 3.0
        out.append((x, y))
    return out


def _random_keep(table, rng, low=0.05, high=0.9):
    density = rng.uniform(low, high, len(table.channels))
    return np.maximum(1, np.floor(density * table.channels + 0.5)).astype(np.int64)


def test_masks_hold_exactly_through_the_cohort_engine():
    """Every pruned weight is exactly 0.0 after fine-tuning with momentum, weight decay and nesterov (the masks'
    zeros never receive a gradient, so the optimizer has nothing to move), and the kept counts are the recipe's."""
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10, in_channels=1)
    table = build_weight_table("resnet20", 16, 10, 1)
    rng = np.random.default_rng(0)
    keeps = [_random_keep(table, rng) for _ in range(2)]
    keeps[1][0] = 1  # a layer keeping a single weight
    models = [masked_copy(base, table, k) for k in keeps]
    before = [{n: m.weight_orig.detach().clone() for n, m in masked_layers(model)} for model in models]
    spec = RetrainSpec(epochs=2, lr=0.1, momentum=0.9, weight_decay=5e-3, nesterov=True)
    results = train_cohort(models, _data(), _data(2, seed=1), spec, "cpu", bn_images=32, amp="off",
                           keep_models=True)
    assert all(r.ok for r in results)
    for r, keep, start in zip(results, keeps, before):
        model = r.model
        assert np.array_equal(mask_counts(model, table), keep)
        moved = 0
        model.eval()(torch.zeros(1, 1, 16, 16))  # the forward pre-hooks recompute weight = weight_orig * mask
        for name, m in masked_layers(model):
            pruned = m.weight_mask == 0
            assert torch.all(m.weight_orig[pruned] == 0.0), name  # the stored weight itself
            assert torch.all(m.weight[pruned] == 0.0), name  # what the forward uses
            moved += int((m.weight_orig[~pruned] != start[name][~pruned]).sum())
        assert moved > 0  # the kept weights did train


def test_masked_copy_keeps_the_largest_weights_and_leaves_the_base_alone():
    torch.manual_seed(1)
    base = build_model("resnet20", num_classes=10, in_channels=1)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    table = build_weight_table("resnet20", 16, 10, 1)
    keep = _random_keep(table, np.random.default_rng(1))
    model = masked_copy(base, table, keep)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    named = dict(model.named_modules())
    for name, k in zip(table.names, keep):
        m = named[name]
        kept = m.weight_orig[m.weight_mask.bool()].abs()
        dropped = dict(base.named_modules())[name].weight[~m.weight_mask.bool()].abs()
        assert kept.numel() == k
        if dropped.numel():
            assert kept.min() >= dropped.max()


def test_weight_space_names_and_their_kinds():
    s = parse_space("weights:std-0.05", "c_flops", 0.5)
    assert s.pruning == "weights" and s.kind == "std" and s.sigma == 0.05 and not s.deterministic
    assert s.key == "weights:std-0.05@c_flops=0.5" and pruning_of(s.key) == "weights"
    g = parse_space("weights:global", "c_flops", 0.5)
    assert g.kind == "global" and g.deterministic and g.sigma == 0
    assert parse_space("std-0.05", "c_flops", 0.5).pruning == "filters"
    with pytest.raises(Exception, match="weights:global"):
        parse_space("weights:bogus", "c_flops", 0.5)
    with pytest.raises(Exception, match="weight space"):
        parse_space("global", "c_flops", 0.5)


EXPERIMENT = """
[experiment]
name = "w"
[dataset]
dir = "data"
[model]
name = "resnet20"
pruning = "{pruning}"
[[references]]
model = "resnet32"
[[spaces]]
name = "{space}"
c_flops = 0.3
n = {n}
"""


def test_model_pruning_weights_makes_every_space_a_weight_space():
    cfg = parse_config(EXPERIMENT.format(pruning="weights", space="std-0.05", n=4))
    planned = check_spaces(cfg)
    # no filter baseline for weight spaces: their own, weights:uniform
    assert [p.key for p in planned] == ["weights:std-0.05@c_flops=0.3", "weights:uniform@c_flops=0.3"]
    assert cfg.references[0].model == "resnet32" and cfg.references[0].epochs == 0


def test_a_one_recipe_weight_space_refuses_identical_rows():
    cfg = parse_config(EXPERIMENT.format(pruning="filters", space="weights:global", n=4))
    with pytest.raises(NpsError, match=r"spaces\[0\]\.n: weights:global is one recipe"):
        check_spaces(cfg)
    check_spaces(parse_config(EXPERIMENT.format(pruning="filters", space="weights:global", n=1)))


def test_bad_pruning_and_references_are_one_line_errors():
    from nps.pipeline.experiment.checks import check_config

    with pytest.raises(NpsError, match="model.pruning"):
        check_config(parse_config(EXPERIMENT.format(pruning="channels", space="std-0.05", n=4)))
    text = EXPERIMENT.format(pruning="filters", space="std-0.05", n=4).replace('"resnet32"', '"resnet3x"')
    with pytest.raises(NpsError, match=r"references\[0\]\.model"):
        check_config(parse_config(text))
    ratio = EXPERIMENT.format(pruning="weights", space="ratios", n=1).replace("c_flops = 0.3", "ratios = [0.5]")
    with pytest.raises(NpsError, match="ratio space prunes filters"):
        check_spaces(parse_config(ratio))


@pytest.mark.e2e
def test_a_run_with_weight_spaces_and_a_reference(tmp_path, fmnist_dir, base_checkpoint):
    """Filter and weight spaces in one run: the global space is made once the base network exists, every row is
    done once, the reference is trained and compared in the report, and an exported weight-pruned winner verifies
    to the image."""
    import contextlib
    import io

    from nps.pipeline.cli import main
    from nps.pipeline.results.reader import open_readonly

    exp = tmp_path / "w.toml"
    exp.write_text(f"""
[experiment]
name = "w"
out = "{tmp_path / 'run'}"
devices = "cpu"
[dataset]
dir = "{fmnist_dir(256)}"
[model]
name = "resnet20"
checkpoint = "{base_checkpoint}"
[[references]]
model = "resnet20"
epochs = 1
[[spaces]]
name = "std-0.05"
c_flops = 0.4
delta = 0.01
n = 2
[[spaces]]
name = "weights:global"
c_flops = 0.4
delta = 0.01
n = 1
[[spaces]]
name = "weights:std-0.05"
c_flops = 0.4
delta = 0.01
n = 2
[retrain]
epochs = 1
batch_size = 32
bn_images = 32
[base]
batch_size = 32
bn_images = 0
[output]
keep_weights = "all"
""")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(exp), "--plain"]) == 0
    results = tmp_path / "run" / "results.h5"
    with open_readonly(results) as r:
        assert sorted(r.spaces()) == ["baseline@c_flops=0.4", "std-0.05@c_flops=0.4", "weights:global@c_flops=0.4",
                                      "weights:std-0.05@c_flops=0.4", "weights:uniform@c_flops=0.4"]
        for space in r.spaces():
            cols = r.read(space, ["status", "c_flops", "keep"])
            assert np.all(cols["status"] == 2), space
            assert np.all(np.abs(cols["c_flops"] - 0.4) <= 0.01 + 1e-6), space
        wide = r.read("weights:global@c_flops=0.4", ["keep"])["keep"]
        assert wide.shape[1] == len(build_weight_table("resnet20", 28, 10, 1).names)
        ref = r.references()["resnet20"]
        assert math.isfinite(ref["top1"]) and ref["c_flops"] == 1.0 and ref["train_s"] > 0
    out = tmp_path / "report"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(results), "--out", str(out)]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert (out / "references.png").is_file()
    (entry,) = summary["references"]
    assert entry["model"] == "resnet20" and set(entry["spaces"]) >= {"weights:global", "weights:std-0.05"}
    spent = summary["cost"]["spaces"]["weights:std-0.05@c_flops=0.4"]
    assert spent["rows"] > 0 and 0 < spent["row_train_s_median"] <= spent["row_train_s_max"]
    assert "population_train_s" not in summary["cost"]  # a sum of rows' cohort times would overstate it K-fold
    winner = tmp_path / "winner.pt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", str(results), "--space", "weights:std-0.05@c_flops=0.4", "--best", "--out",
                     str(winner), "--verify", "--data", str(fmnist_dir(256))])
    assert code == 0 and "(+0 images)" in stdout.getvalue().replace("\n", " ")
    from nps.pipeline import load_subnetwork

    model = load_subnetwork(winner)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sum(int((m.weight == 0).sum()) for m in layers) > 0.3 * sum(m.weight.numel() for m in layers)

    # a run killed between the base network and the global space: the resume makes it from the stored base
    import h5py

    with open_readonly(results) as r:
        before = r.read("weights:global@c_flops=0.4", ["keep", "top1"])
    with h5py.File(results, "r+") as f:
        del f["spaces/weights:global@c_flops=0.4"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(exp), "--plain"]) == 0
    with open_readonly(results) as r:
        after = r.read("weights:global@c_flops=0.4", ["keep", "top1", "status"])
        assert "resnet20" in r.references()  # not trained again
    assert np.array_equal(after["keep"], before["keep"]) and np.array_equal(after["top1"], before["top1"])


def test_nps_sample_draws_weight_spaces_on_the_weight_table(tmp_path):
    import contextlib
    import io

    from nps.pipeline.cli import main
    from nps.pipeline.network.layer_table import LayerTable
    from nps.pipeline.results.reader import open_readonly

    out = tmp_path / "w.h5"
    argv = ["sample", "--model", "resnet20", "--resolution", "16", "--classes", "10", "--space", "weights:std-0.05",
            "--space", "std-0.05", "--c-flops", "0.3", "-n", "20", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    with open_readonly(out) as r:
        wtable = LayerTable.from_hdf5(r.weight_layers)
        ftable = LayerTable.from_hdf5(r.layers)
        w = r.read("weights:std-0.05@c_flops=0.3", ["keep", "flops"])
        f = r.read("std-0.05@c_flops=0.3", ["keep", "flops"])
    assert wtable.mode == "weights" and w["keep"].shape == (20, len(wtable.names))
    assert np.array_equal(wtable.flops_of(w["keep"]), w["flops"])
    assert f["keep"].shape == (20, len(ftable.names)) and np.array_equal(ftable.flops_of(f["keep"]), f["flops"])
    from nps.pipeline.results.table import columns

    table = columns(out)  # filter and weight spaces in one table: vectors of two widths
    assert sorted(set(table["pruning"])) == ["filters", "weights"]
    widths = {p: {len(k) for k, q in zip(table["keep"], table["pruning"]) if q == p} for p in ("filters", "weights")}
    assert widths == {"filters": {len(ftable.names)}, "weights": {len(wtable.names)}}
    wide = columns(out, wide=True)
    assert f"keep.w:{wtable.names[0]}" in wide and f"keep.{ftable.names[0]}" in wide
    is_w = wide["pruning"] == "weights"
    assert np.isnan(wide[f"keep.{ftable.names[0]}"][is_w]).all()
    assert np.array_equal(wide[f"keep.w:{wtable.names[0]}"][is_w], w["keep"][:, 0])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(argv[:7] + ["--space", "weights:global", "--c-flops", "0.3", "-n", "1", "--out",
                                str(tmp_path / "g.h5")]) == 2
    assert "one recipe" in stderr.getvalue() and not (tmp_path / "g.h5").exists()
