"""nps export: weights kept beside results.h5, export → load_subnetwork → evaluate gives the stored top-1, --best,
--verify (with an injected val loader, and through a real converted dataset with -m slow), the preprocessing an
export carries (and applies: the loaders' batches to the bit), every check before the first write, and the
errors."""
import json
import math
import shutil

import h5py
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
from nps.pipeline.deploy.export import (
    FORMAT,
    export_subnetwork,
    load_subnetwork,
    read_subnetwork,
    save_subnetwork_weights,
    saved_weight_rows,
    subnetwork_preprocessing,
    weights_path,
)
from nps.pipeline.deploy.preprocessing import Preprocess, PreprocessedSubnetwork, make_preprocessing
from nps.pipeline.results.store import ResultsStore
from nps.pipeline.deploy.verify import verify_subnetwork
from nps.pipeline.row_status import Result
from nps.pipeline.training.evaluation import evaluate

torch.set_num_threads(1)

SPACE = "std-0.05@c_flops=0.5"
CONFIG = ('[model]\nname = "resnet20"\nmode = "all"\nresolution = 32\nin_channels = 3\nnum_classes = 10\n'
          '[dataset]\ndir = "data"\n')


MEAN, STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]  # the fixture dataset's, 0-255 (CIFAR-10's)


def fake_dataset(path):
    """What --verify and the export read of a converted dataset before it evaluates (the tests inject the val
    batches themselves): meta.json and the two .beton files, empty."""
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({
        "format": "nps-beton", "kind": "npz", "counts": {"train": 60, "val": 60}, "classes": list("0123456789"),
        "num_classes": 10, "label_histogram": {}, "fingerprint": "", "files": {"train": "train.beton",
                                                                               "val": "val.beton"},
        "mean": MEAN, "std": STD, "grayscale_replicated": False, "image_shape": [32, 32]}))
    for name in ("train.beton", "val.beton"):
        (path / name).write_bytes(b"")
    return path


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
    fake_dataset(root / "data")
    table = build_layer_table("resnet20", "all", 32, 10)
    sample = sample_space(table, parse_space("std-0.05", "c_flops", 0.5), 5, seed=0)
    rows = {"recipe": sample.recipe, "keep": sample.keep, "flops": sample.flops, "params": sample.params,
            "c_flops": sample.c_flops, "c_params": sample.c_params, "mcb": sample.mcb, "std": sample.std,
            "seed": np.arange(5)}
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10)
    store = ResultsStore.create(root / "results.h5", table, CONFIG, {  # the dataset as nps run records it
        "base_top1": 92.0, "dataset_mean": MEAN, "dataset_std": STD, "dataset_image_shape": [32, 32]})
    store.add_space(SPACE, rows, epochs=1, attrs={"space": "std-0.05", "target": "c_flops", "value": 0.5})
    data = val_batches()
    for row in (0, 1):
        sub = trained_like(prune_model(base, table, sample.keep[row]), seed=row)
        top1, top5, loss = evaluate(sub, data, "cpu")
        store.record(SPACE, [row], [Result.done(top1=top1, top5=top5, loss=loss)])
        save_subnetwork_weights(root / "results.h5", SPACE, row, sub)
    store.record(SPACE, [2], [Result.done(top1=99.0, top5=99.0, loss=0.1)])
    store.record(SPACE, [4], [Result.failed(error="loss became NaN")])
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
    store.record(SPACE, [0], [Result.done(top1=top1, top5=top5, loss=loss)])
    store.close()
    save_subnetwork_weights(tmp_path / "results.h5", SPACE, 0, sub)
    export_subnetwork(tmp_path / "results.h5", SPACE, tmp_path / "w.pt", best=True)
    result = verify_subnetwork(tmp_path / "w.pt", batch_size=500)
    assert result["ok"] and result["images"] == 37 and math.isclose(result["top1"], top1, abs_tol=1e-9)
    # the preprocessing (here from the dataset: the file does not record its mean and std), applied to the source
    # images, gives the loader's logits
    raw = torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2)
    model = load_subnetwork(tmp_path / "w.pt", with_preprocessing=True)
    with torch.no_grad():
        logits = torch.cat([sub(x) for x, _ in val])
        assert torch.equal(torch.cat([model(raw[i:i + 16]) for i in range(0, 37, 16)]), logits)


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
    from nps.pipeline.deploy.export import load_subnetwork

    table = build_layer_table(name, "all", 32, 10, **kw)
    sample = sample_space(table, parse_space("std-0.05", "c_flops", 0.5), 2, seed=0)
    rows = {"recipe": sample.recipe, "keep": sample.keep, "flops": sample.flops, "params": sample.params,
            "c_flops": sample.c_flops, "c_params": sample.c_params, "mcb": sample.mcb, "std": sample.std,
            "seed": np.arange(2)}
    config = CONFIG.replace('"resnet20"', f'"{name}"')
    store = ResultsStore.create(tmp_path / "results.h5", table, config, {"base_top1": 90.0, "dataset_mean": MEAN,
                                                                         "dataset_std": STD})
    store.add_space(SPACE, rows, epochs=1, attrs={"space": "std-0.05", "target": "c_flops", "value": 0.5})
    torch.manual_seed(0)
    sub = trained_like(prune_model(build_model(name, num_classes=10), table, sample.keep[1]), seed=1)
    store.record(SPACE, [1], [Result.done(top1=50.0, top5=90.0, loss=1.0)])
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


# --------------------------------------------------------------------------------------------------------------------
# The preprocessing an export carries (issue 27).


def test_export_carries_the_datasets_preprocessing(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "row0.pt"
    info = export_subnetwork(run_dir / "results.h5", SPACE, out, row=0)
    pre = read_subnetwork(out)["preprocessing"]
    assert info["preprocessing"] == pre
    assert pre["mean"] == MEAN and pre["std"] == STD and pre["scale"] == "0-255"  # the dataset's, 0-255
    assert pre["input_size"] == [3, 32, 32] and pre["channel_order"] == "RGB" and pre["layout"] == "NCHW"
    assert pre["resize"] == "none" and "as stored" in pre["val_transform"]
    # an older results file, without dataset_mean/std: the run's dataset (config [dataset] dir) gives the same
    monkeypatch.chdir(tmp_path)  # where the relative dir "data" is looked up first
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    with h5py.File(old / "results.h5", "a") as f:
        del f.attrs["dataset_mean"], f.attrs["dataset_std"]
    assert export_subnetwork(old / "results.h5", SPACE, tmp_path / "o.pt", row=0)["preprocessing"] == pre
    shutil.rmtree(old / "data")  # ... and without it the export is refused, before anything is written
    with pytest.raises(NpsError, match="does not record its dataset's mean and std .* is not here .* pass --data"):
        export_subnetwork(old / "results.h5", SPACE, tmp_path / "x.pt", row=0)
    assert not (tmp_path / "x.pt").exists()
    assert export_subnetwork(old / "results.h5", SPACE, tmp_path / "d.pt", row=0,
                             data_dir=run_dir / "data")["preprocessing"] == pre
    # an export written before the key existed still loads; its preprocessing comes from its run's dataset
    ckpt = torch.load(out, weights_only=True)
    del ckpt["preprocessing"]
    ckpt["results"] = str(old / "results.h5")
    torch.save(ckpt, tmp_path / "older.pt")
    assert not isinstance(load_subnetwork(tmp_path / "older.pt"), PreprocessedSubnetwork)
    with pytest.raises(NpsError, match="older.pt predates the preprocessing metadata .* is not here"):
        load_subnetwork(tmp_path / "older.pt", with_preprocessing=True)
    assert subnetwork_preprocessing(tmp_path / "older.pt", data_dir=run_dir / "data") == pre
    model = load_subnetwork(tmp_path / "older.pt", with_preprocessing=True, data_dir=run_dir / "data")
    assert isinstance(model, PreprocessedSubnetwork) and model.preprocessing == pre


@pytest.mark.parametrize("in_channels, resolution", [(3, 32), (1, 32), (3, 40), (1, 24)])
def test_preprocessing_gives_the_loaders_batches(in_channels, resolution):
    """Both loaders end in BatchFinisher: Preprocess on the stored uint8 images gives its batches to the bit, for
    RGB and luma networks, at the stored size and resized (up, and down with antialiasing)."""
    from nps.datasets.batch_ops import BatchFinisher

    raw = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    finisher = BatchFinisher(MEAN, STD, device=torch.device("cpu"), resolution=resolution, in_channels=in_channels)
    expected = finisher(raw.contiguous(memory_format=torch.channels_last))
    preprocess = Preprocess(make_preprocessing(MEAN, STD, [32, 32], resolution=resolution, in_channels=in_channels))
    for images in (raw, raw.float(), raw.numpy()):  # uint8 or 0-255 floats, tensor or array, NCHW
        got = preprocess(images)
        assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)
    gray = raw[:, :1]  # a grayscale image: nps stores it as three equal channels
    stored = finisher(gray.expand(5, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    if in_channels == 3:  # replicated, as stored
        assert torch.equal(preprocess(gray), stored)
    else:  # the gray value itself, where nps takes the float32 luma of three equal values: one rounding apart
        torch.testing.assert_close(preprocess(gray), stored, rtol=0, atol=1e-6)
        assert torch.equal(preprocess(gray.expand(5, 3, 32, 32)), stored)
    with pytest.raises(NpsError, match="expected a batch N x C x H x W"):
        preprocess(raw[0])


def test_large_images_must_be_cropped_as_nps_did():
    pre = make_preprocessing(MEAN, STD, None, resolution=224, in_channels=3)
    assert pre["resize"] == "center_crop" and "center square of int(0.875 x the shorter side)" in pre["val_transform"]
    with pytest.raises(NpsError, match="images of 256x256; the network takes 224x224: prepare them as nps did"):
        Preprocess(pre)(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))


def test_an_export_with_its_preprocessing_computes_the_loader_paths_logits(run_dir, tmp_path):
    from nps.datasets.batch_ops import BatchFinisher

    out = tmp_path / "row1.pt"
    export_subnetwork(run_dir / "results.h5", SPACE, out, row=1)
    raw = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = BatchFinisher(MEAN, STD, device=torch.device("cpu"), resolution=32)(
        raw.contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        assert torch.equal(load_subnetwork(out, with_preprocessing=True)(raw), load_subnetwork(out)(batch))


@pytest.mark.parametrize("outputs", [pytest.param(["--out"], marks=pytest.mark.slow),
                                     pytest.param(["--onnx"], marks=pytest.mark.slow), ["--out", "--onnx"]])
def test_cli_checks_everything_before_the_first_write(run_dir, tmp_path, monkeypatch, capsys, outputs):
    """`nps export ... --verify` without the run's dataset fails in one line and writes nothing; the same command
    with --data then succeeds without --force."""
    import nps.datasets.loaders as loaders

    if "--onnx" in outputs:
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("data"))
    monkeypatch.chdir(tmp_path)
    files = {"--out": tmp_path / "w.pt", "--onnx": tmp_path / "w.onnx"}
    argv = ["export", str(copy / "results.h5"), "--space", SPACE, "--row", "0", "--verify"]
    argv += [word for flag in outputs for word in (flag, str(files[flag]))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dataset dir 'data' is not here" in err and "--data DIR" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no export, no temporary file
    monkeypatch.setattr(loaders, "make_loaders", lambda data_dir, **kwargs: (None, val_batches(), None))
    assert main(argv + ["--data", str(run_dir / "data")]) == 0
    out = capsys.readouterr().out
    assert out.count("verified:") == len(outputs) and all(files[flag].is_file() for flag in outputs)
    assert "mean [125.3, 123, 113.9], std [63, 62.1, 66.7]" in out and "3x32x32 RGB NCHW" in out
    # a dataset without its .beton files is refused before writing too
    broken = fake_dataset(tmp_path / "broken")
    (broken / "val.beton").unlink()
    argv[argv.index("--row") + 1] = "1"
    assert main(argv + ["--data", str(broken), "--force"]) == 2
    assert "val.beton missing" in capsys.readouterr().err
    assert all(files[flag].is_file() for flag in outputs)  # the earlier export, untouched


def test_export_help_says_what_amp_auto_resolves_to(capsys, monkeypatch):
    import nps.pipeline.training.devices as devices

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = "".join(capsys.readouterr().out.split())
    assert "autoisoffontheCPU" not in text
    assert "".join("auto resolves as the run did on the device: bf16 on a CPU with native bf16 instructions "
                   "(AVX512-BF16, AMX) unless the network has depthwise convs, else off; bf16, or fp16 without bf16 "
                   "support, on a GPU".split()) in text
    cpu = torch.device("cpu")
    resnet, mobilenet = build_model("resnet20", num_classes=10), build_model("mobilenet_v2", num_classes=10)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_amp("auto", cpu, [resnet]) == torch.bfloat16
    assert devices.resolve_amp("auto", cpu, [mobilenet]) is None
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_amp("auto", cpu, [resnet]) is None
