"""nps export: weights kept beside results.h5, export → load_subnetwork → evaluate gives the stored top-1, --best,
--verify (with an injected val loader, and through a real converted dataset with -m slow), and the errors."""
import json
import math

import numpy as np
import pytest
import torch

import nps.pipeline
from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.cli import main
from nps.pipeline.errors import NpsError
from nps.pipeline.network.layer_table import build_layer_table
from nps.pipeline.network.models import build_model
from nps.pipeline.network.prune import prune_model
from nps.pipeline.results.export import (
    FORMAT,
    export_subnetwork,
    load_subnetwork,
    read_subnetwork,
    save_subnetwork_weights,
    saved_weight_rows,
    weights_path,
)
from nps.pipeline.results.store import ResultsStore
from nps.pipeline.results.verify import verify_subnetwork
from nps.pipeline.training.evaluation import evaluate

torch.set_num_threads(1)

SPACE = "std-0.05@c_flops=0.5"
CONFIG = ('[model]\nname = "resnet20"\nmode = "all"\nresolution = 32\nin_channels = 3\nnum_classes = 10\n'
          '[dataset]\ndir = "data"\n')


def val_batches(seed=0, batches=3, batch=20):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]


def trained_like(model, seed):
    """Weights and BN statistics that a fresh build cannot reproduce by chance."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.train()
        model(torch.randn(16, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A results file with 5 rows: 0–1 done with kept weights, 2 done (best top-1) without, 3 pending, 4 failed."""
    root = tmp_path_factory.mktemp("run")
    (root / "data").mkdir()
    # what --verify reads of the dataset before it evaluates (the tests inject the val batches themselves)
    (root / "data" / "meta.json").write_text(json.dumps({
        "format": "nps-beton", "kind": "npz", "counts": {"train": 60, "val": 60}, "classes": list("0123456789"),
        "num_classes": 10, "label_histogram": {}, "fingerprint": "", "files": {"train": "train.beton",
                                                                               "val": "val.beton"},
        "mean": [0, 0, 0], "std": [1, 1, 1], "grayscale_replicated": False, "image_shape": [32, 32]}))
    table = build_layer_table("resnet20", "all", 32, 10)
    sample = sample_space(table, parse_space("std-0.05", "c_flops", 0.5), 5, seed=0)
    rows = {"recipe": sample.recipe, "keep": sample.keep, "flops": sample.flops, "params": sample.params,
            "c_flops": sample.c_flops, "c_params": sample.c_params, "mcb": sample.mcb, "std": sample.std,
            "seed": np.arange(5)}
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10)
    store = ResultsStore.create(root / "results.h5", table, CONFIG, {"base_top1": 92.0})
    store.add_space(SPACE, rows, epochs=1, attrs={"space": "std-0.05", "target": "c_flops", "value": 0.5})
    data = val_batches()
    for row in (0, 1):
        sub = trained_like(prune_model(base, table, sample.keep[row]), seed=row)
        top1, top5, loss = evaluate(sub, data, "cpu")
        store.mark_done(SPACE, row, top1=top1, top5=top5, loss=loss)
        save_subnetwork_weights(root / "results.h5", SPACE, row, sub)
    store.mark_done(SPACE, 2, top1=99.0, top5=99.0, loss=0.1)
    store.mark_failed(SPACE, 4, "loss became NaN")
    store.close()
    return root


def stored_top1(run_dir, row):
    import h5py

    with h5py.File(run_dir / "results.h5", "r") as f:
        return float(f["spaces"][SPACE]["top1"][row])


def test_weights_live_beside_results_as_pruned_state_dicts(run_dir, tmp_path):
    path = weights_path(run_dir / "results.h5", SPACE, 1)
    assert path == run_dir / "weights" / SPACE / "1.pt" and path.is_file()
    assert saved_weight_rows(run_dir / "results.h5", SPACE) == [0, 1]
    state = torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    assert state["conv1.weight"].shape[0] < 16 or state["layer3.0.conv1.weight"].shape[0] < 64  # pruned shapes
    # a channels_last model is stored contiguous, and nothing but the file is left behind
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    written = save_subnetwork_weights(tmp_path / "r.h5", "s@c_flops=0.1", 7, model)
    assert torch.load(written, weights_only=True)["0.weight"].is_contiguous()
    assert [p.name for p in written.parent.iterdir()] == ["7.pt"]
    wrapped = {"_orig_mod.0.weight": torch.ones(2)}  # the state_dict of a torch.compile'd module
    assert list(torch.load(save_subnetwork_weights(tmp_path / "r.h5", "s", 8, wrapped), weights_only=True)) == \
        ["0.weight"]
    for bad in ("", "a/b", ".."):
        with pytest.raises(NpsError, match="not a valid space name"):
            weights_path(tmp_path / "r.h5", bad, 0)
    with pytest.raises(NpsError, match="non-negative"):
        weights_path(tmp_path / "r.h5", "s", -1)


def test_export_load_evaluate_gives_the_stored_top1(run_dir, tmp_path):
    out = tmp_path / "row0.pt"
    info = export_subnetwork(run_dir / "results.h5", SPACE, out, row=0)
    assert info["row"] == 0 and info["note"] == "" and info["model"] == "resnet20"
    ckpt = read_subnetwork(out)
    assert ckpt["format"] == FORMAT and ckpt["config"] == CONFIG and ckpt["space"] == SPACE
    assert ckpt["resolution"] == 32 and ckpt["mode"] == "all" and ckpt["num_classes"] == 10
    assert len(ckpt["keep"]) == len(ckpt["recipe"]) == len(ckpt["groups"]) and ckpt["acc_drop"] == \
        pytest.approx(92.0 - ckpt["top1"])
    model = nps.pipeline.load_subnetwork(out)  # the public entry point; no base checkpoint, no results file
    assert not model.training
    top1, _, _ = evaluate(model, val_batches(), "cpu")
    assert top1 == pytest.approx(stored_top1(run_dir, 0), abs=1e-4)
    assert ckpt["params"] == sum(p.numel() for p in model.parameters())
    result = verify_subnetwork(out, val_loader=val_batches())
    assert result["ok"] and result["images"] == 60 and result["diff_images"] == 0
    assert result["tolerance"] == pytest.approx(50 / 60 + 1e-4)


def test_best_is_the_best_row_with_kept_weights(run_dir, tmp_path):
    info = export_subnetwork(run_dir / "results.h5", "std-0.05", tmp_path / "best.pt", best=True)
    expect = max((0, 1), key=lambda r: (stored_top1(run_dir, r), -r))
    assert info["row"] == expect
    assert "row 2" in info["note"] and "no kept weights" in info["note"]
    empty = tmp_path / "copy"
    empty.mkdir()
    (empty / "results.h5").write_bytes((run_dir / "results.h5").read_bytes())
    with pytest.raises(NpsError, match="no fine-tuned weights kept .* weights/<space>/<row>.pt"):
        export_subnetwork(empty / "results.h5", SPACE, tmp_path / "x.pt", best=True)


def test_export_errors(run_dir, tmp_path):
    results = run_dir / "results.h5"
    cases = [({"row": 3}, "row 3 of .* is pending"), ({"row": 4}, "is failed"), ({"row": 9}, "has rows 0..4"),
             ({"row": 2}, "no weights for row 2"), ({}, "exactly one of --best and --row"),
             ({"row": 0, "best": True}, "exactly one")]
    for kwargs, message in cases:
        with pytest.raises(NpsError, match=message):
            export_subnetwork(results, SPACE, tmp_path / "x.pt", **kwargs)
    with pytest.raises(NpsError, match="no such space"):
        export_subnetwork(results, "std-0.3", tmp_path / "x.pt", row=0)
    assert not (tmp_path / "x.pt").exists()
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(NpsError, match="not an nps subnetwork export"):
        load_subnetwork(tmp_path / "other.pt")
    # weights that do not belong to the row's keep counts are refused before anything is written
    copy = tmp_path / "copy"
    (copy / "weights" / SPACE).mkdir(parents=True)
    (copy / "results.h5").write_bytes(results.read_bytes())
    (copy / "weights" / SPACE / "0.pt").write_bytes(weights_path(results, SPACE, 1).read_bytes())
    with pytest.raises(NpsError, match="does not fit row 0"):
        export_subnetwork(copy / "results.h5", SPACE, tmp_path / "bad.pt", row=0)
    assert not (tmp_path / "bad.pt").exists()


def test_verify_detects_a_different_top1(run_dir, tmp_path):
    out = tmp_path / "row1.pt"
    export_subnetwork(run_dir / "results.h5", SPACE, out, row=1)
    ckpt = torch.load(out, weights_only=True)
    ckpt["top1"] += 100 / 60  # one image more than the model gets right
    torch.save(ckpt, out)
    result = verify_subnetwork(out, val_loader=val_batches())
    assert not result["ok"] and result["diff_images"] == -1
    assert verify_subnetwork(out, val_loader=val_batches(), tolerance=2.0)["ok"]


def test_cli_export_and_verify(run_dir, tmp_path, monkeypatch, capsys):
    import nps.datasets.loaders as loaders

    calls = []

    def fake_make_loaders(data_dir, **kwargs):
        calls.append((data_dir, kwargs))
        return None, val_batches(), None

    monkeypatch.setattr(loaders, "make_loaders", fake_make_loaders)
    monkeypatch.chdir(tmp_path)  # the config's relative [dataset] dir is found beside results.h5
    out = tmp_path / "w.pt"
    assert main(["export", str(run_dir / "results.h5"), "--space", SPACE, "--row", "0", "--out", str(out),
                 "--verify"]) == 0
    text = capsys.readouterr().out
    assert "verified" in text and "row 0" in text
    (data_dir, kwargs), = calls
    assert data_dir == run_dir / "data" and kwargs["resolution"] == 32 and kwargs["in_channels"] == 3
    assert kwargs["augment"] is False and kwargs["val_batch_size"] == 256 and kwargs["on_device"] == "auto"
    assert main(["export", str(run_dir / "results.h5"), "--space", SPACE, "--row", "1", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    # an existing export, checked on its own against a dataset given on the command line
    assert main(["export", "--verify", str(out), "--data", str(run_dir / "data")]) == 0
    assert calls[-1][0] == run_dir / "data"
    ckpt = torch.load(out, weights_only=True)
    ckpt["top1"] -= 5.0
    torch.save(ckpt, out)
    assert main(["export", "--verify", str(out), "--data", str(run_dir / "data")]) == 1
    assert "mismatch" in capsys.readouterr().out
    ckpt["config"] = "[model]\nname = 'resnet20'\n"
    torch.save(ckpt, out)
    assert main(["export", "--verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no [dataset] dir; pass --data DIR" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(run_dir / "results.h5"), "--space", SPACE, "--out", str(tmp_path / "n.pt")]) == 2
    assert "--best or --row" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_through_a_converted_dataset(tmp_path):
    """The real path: nps convert (npz) → make_loaders → evaluate, against the top-1 the run would store."""
    from nps.datasets.convert import convert_dataset
    from nps.datasets.loaders import make_loaders

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), "y_train": np.arange(40) % 10,
              "x_test": rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(37) % 10}
    np.savez(tmp_path / "d.npz", **arrays)
    convert_dataset("npz", tmp_path / "data", src=tmp_path / "d.npz", workers=1)
    table = build_layer_table("resnet20", "all", 32, 10)
    keep = sample_space(table, parse_space("std-0.05", "c_flops", 0.5), 1, seed=0).keep
    rows = {"recipe": np.zeros((1, len(table))), "keep": keep, "flops": [1], "params": [1], "c_flops": [0.5],
            "c_params": [0.5], "mcb": [1.0], "std": [0.0], "seed": [0]}
    torch.manual_seed(1)
    sub = trained_like(prune_model(build_model("resnet20", num_classes=10), table, keep[0]), seed=3)
    _, val, _ = make_loaders(tmp_path / "data", batch_size=16, resolution=32, augment=False, drop_last=False)
    top1, top5, loss = evaluate(sub, val, "cpu")
    config = CONFIG.replace('dir = "data"', f'dir = "{tmp_path / "data"}"')
    store = ResultsStore.create(tmp_path / "results.h5", table, config, {"base_top1": 50.0})
    store.add_space(SPACE, rows, epochs=1)
    store.mark_done(SPACE, 0, top1=top1, top5=top5, loss=loss)
    store.close()
    save_subnetwork_weights(tmp_path / "results.h5", SPACE, 0, sub)
    export_subnetwork(tmp_path / "results.h5", SPACE, tmp_path / "w.pt", best=True)
    result = verify_subnetwork(tmp_path / "w.pt", batch_size=500)
    assert result["ok"] and result["images"] == 37 and math.isclose(result["top1"], top1, abs_tol=1e-9)


def test_verify_follows_the_run_config(run_dir, tmp_path):
    out = tmp_path / "row0.pt"
    export_subnetwork(run_dir / "results.h5", SPACE, out, row=0)
    ckpt = torch.load(out, weights_only=True)
    model = load_subnetwork(out)
    # [dataset] val_images: the run scored the first 40 images only; 0 means "from the dataset" for the counts
    ckpt["config"] = ('[model]\nname = "resnet20"\nin_channels = 0\nnum_classes = 0\nresolution = 0\n'
                      '[dataset]\ndir = "data"\nval_images = 40\n[retrain]\namp = "auto"\n')
    first40 = [(x[:20], y[:20]) for x, y in val_batches()][:2]
    ckpt["top1"] = evaluate(model, first40, "cpu")[0]
    torch.save(ckpt, out)
    result = verify_subnetwork(out, val_loader=val_batches())
    assert result["ok"] and result["images"] == 40 and result["amp"] == "auto"
    ckpt["config"] = '[model]\nname = "resnet56"\n'
    torch.save(ckpt, out)
    with pytest.raises(NpsError, match=r"\[model\] name = 'resnet56' but its layer table says 'resnet20'"):
        verify_subnetwork(out, val_loader=val_batches())
    ckpt["config"] = "[model\n"
    torch.save(ckpt, out)
    with pytest.raises(NpsError, match="not valid TOML"):
        verify_subnetwork(out, val_loader=val_batches())


@pytest.mark.parametrize("name, kw", [("mobilenet_v3_small", {"channel_multiple": 8}), ("efficientnet_b0", {}),
                                      ("regnet_y_400mf", {"flops": "paper"}), ("convnext_tiny", {}),
                                      ("densenet121", {})])
@pytest.mark.zoo
def test_export_load_gives_the_same_outputs_for_compact_convnets(tmp_path, name, kw):
    """Export → load_subnetwork rebuilds the architecture from the registry name, the table options (granularity,
    convention) and the keep counts alone, and computes what the trained subnetwork computed."""
    from nps.pipeline.results.export import load_subnetwork

    table = build_layer_table(name, "all", 32, 10, **kw)
    sample = sample_space(table, parse_space("std-0.05", "c_flops", 0.5), 2, seed=0)
    rows = {"recipe": sample.recipe, "keep": sample.keep, "flops": sample.flops, "params": sample.params,
            "c_flops": sample.c_flops, "c_params": sample.c_params, "mcb": sample.mcb, "std": sample.std,
            "seed": np.arange(2)}
    config = CONFIG.replace('"resnet20"', f'"{name}"')
    store = ResultsStore.create(tmp_path / "results.h5", table, config, {"base_top1": 90.0})
    store.add_space(SPACE, rows, epochs=1, attrs={"space": "std-0.05", "target": "c_flops", "value": 0.5})
    torch.manual_seed(0)
    sub = trained_like(prune_model(build_model(name, num_classes=10), table, sample.keep[1]), seed=1)
    store.mark_done(SPACE, 1, top1=50.0, top5=90.0, loss=1.0)
    save_subnetwork_weights(tmp_path / "results.h5", SPACE, 1, sub)
    store.close()
    info = export_subnetwork(tmp_path / "results.h5", "std-0.05", tmp_path / "sub.pt", row=1)
    assert info["channel_multiple"] == kw.get("channel_multiple", 1)
    assert info["flops_convention"] == kw.get("flops", "macs")
    loaded = load_subnetwork(tmp_path / "sub.pt")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), sub.eval()(x))
    assert sum(p.numel() for p in loaded.parameters()) == int(table.params_of(sample.keep[1]))
