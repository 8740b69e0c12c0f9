"""ONNX export (``nps export --onnx``): the winner verified with onnxruntime on the val split (the same correct
images as the stored top-1), on a run-shaped file whose row was evaluated the way a run evaluates (fast); and, with
``-m slow``, on the README's demo run (``demo_run``): export and verify, the run's file as a DataFrame equal to its
HDF5, and ``[output] latency`` timing every finished row at the end of a real run. The preprocessing an export
carries, applied to the stored images (the loader's batches to the bit), and the README's onnxruntime example."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from nps.pipeline.row_status import Result

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch's default exporter; without it nps uses the TorchScript one
SPACE = "std-0.05"


@pytest.fixture(scope="module")
def scored_file(tmp_path_factory, fmnist_dir):
    """results.h5 of the demo's network on Fashion-MNIST's first 256 images: one row pruned to c_flops 0.1 (weights
    as initialised, kept beside the file) and scored as a run scores it (float32 on the CPU, channels_last, the
    first 128 val images in batches of 64)."""
    from nps.datasets.loaders import make_loaders
    from nps.datasets.meta import load_meta
    from nps.kernels.spaces import parse_space
    from nps.pipeline.experiment.sampling import sample_rows
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.network.models import build_model
    from nps.pipeline.network.prune import prune_model
    from nps.pipeline.deploy.export import save_subnetwork_weights
    from nps.pipeline.results.store import ResultsStore
    from nps.pipeline.deploy.verify import _EvalLoader
    from nps.pipeline.training.evaluation import evaluate

    data = fmnist_dir(256)
    meta = load_meta(data)
    path = tmp_path_factory.mktemp("scored") / "results.h5"
    table = build_layer_table("resnet20", "all", 28, 10, 1)
    rows, attrs, _ = sample_rows(table, parse_space(SPACE, "c_flops", 0.1), 2, 0)
    torch.manual_seed(0)
    model = prune_model(build_model("resnet20", num_classes=10, in_channels=1), table, rows["keep"][0])
    _, val, _ = make_loaders(data, batch_size=64, resolution=28, in_channels=1, augment=False, order="sequential",
                             drop_last=False, val_batch_size=64)
    loader = _EvalLoader(val, 128, contiguous=True)
    top1, top5, loss = evaluate(model.to(memory_format=torch.channels_last), loader, "cpu", channels_last=True)
    config = (f'[dataset]\ndir = "{data}"\nval_images = 128\nval_batch_size = 64\n'
              '[model]\nname = "resnet20"\n[retrain]\namp = "off"\n')
    store = ResultsStore.create(path, table, config, {
        "base_top1": 90.0, "base_flops": table.base_flops, "base_params": table.base_params,
        "dataset_fingerprint": meta["fingerprint"], "dataset_num_classes": 10, "dataset_image_shape": [28, 28],
        "dataset_mean": meta["mean"], "dataset_std": meta["std"]})  # as nps run records them
    try:
        store.add_space(f"{SPACE}@c_flops=0.1", rows, epochs=1, attrs=attrs)
        store.record(f"{SPACE}@c_flops=0.1", [0], [Result.done(top1=top1, top5=top5, loss=loss)])
    finally:
        store.close()
    save_subnetwork_weights(path, f"{SPACE}@c_flops=0.1", 0, model)
    return path


def export_and_compare(results, tmp_path, capsys, *, atol: float):
    """``nps export --best --onnx --verify`` of SPACE's winner: both checks pass to the image, the ONNX file has
    the stated opset and a dynamic batch axis, and onnxruntime's logits equal the PyTorch module's. Returns the
    .onnx path."""
    import onnx
    import onnxruntime as ort

    from nps.pipeline import load_subnetwork
    from nps.pipeline.cli import main
    from nps.pipeline.deploy.onnx_export import OPSET

    onnx_path, pt = tmp_path / "winner.onnx", tmp_path / "winner.pt"
    assert main(["export", str(results), "--space", SPACE, "--best", "--out", str(pt), "--onnx", str(onnx_path),
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "difference +0 images" in out and "opset 18" in out and out.count("verified:") == 2
    proto = onnx.load(str(onnx_path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    (inp,) = proto.graph.input
    assert inp.name == "input" and inp.type.tensor_type.shape.dim[0].dim_param  # a dynamic batch axis
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    model = load_subnetwork(pt)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=atol)
    return onnx_path


def test_onnx_export_and_verify(scored_file, tmp_path, capsys):
    from nps.pipeline.cli import main
    from nps.pipeline.deploy.onnx_export import verify_onnx

    onnx_path = export_and_compare(scored_file, tmp_path, capsys, atol=1e-5)
    # The file alone (its metadata carries the run's config and scores): the stored top-1 is the reference.
    result = verify_onnx(onnx_path)
    assert result["ok"] and result["diff_images"] == 0 and result["images"] == 128 and result["run_amp"] == "off"
    assert result["reference"].startswith("stored top-1")
    assert main(["export", "--verify", str(onnx_path)]) == 0
    (tmp_path / "other.onnx").write_bytes(b"not a model")
    assert main(["export", "--verify", str(tmp_path / "other.onnx")]) == 2
    assert "not an ONNX model" in capsys.readouterr().err


def test_exports_carry_and_apply_the_datasets_preprocessing(scored_file, fmnist_dir, tmp_path, capsys):
    """The .pt and the ONNX file carry the dataset's normalisation (a one-channel network: the luma of its RGB mean
    and std); applied to the stored uint8 val images it gives the loader's batches to the bit, so the same logits,
    and the run's own count of correct images on its 128 val images."""
    import json

    import onnx
    import onnxruntime as ort

    from nps.datasets.device_loader import load_split
    from nps.datasets.loaders import make_loaders
    from nps.datasets.meta import load_meta
    from nps.pipeline import load_subnetwork
    from nps.pipeline.cli import main
    from nps.pipeline.deploy.export import read_subnetwork
    from nps.pipeline.deploy.preprocessing import LUMA

    data = fmnist_dir(256)
    meta = load_meta(data)
    pt, onnx_path = tmp_path / "w.pt", tmp_path / "w.onnx"
    assert main(["export", str(scored_file), "--space", SPACE, "--best", "--out", str(pt), "--onnx",
                 str(onnx_path)]) == 0
    assert "1x28x28 gray NCHW float32" in capsys.readouterr().out
    ckpt = read_subnetwork(pt)
    pre = ckpt["preprocessing"]
    assert pre["dataset_mean"] == meta["mean"] and pre["dataset_std"] == meta["std"]
    assert pre["mean"] == pytest.approx([sum(m * w for m, w in zip(meta["mean"], LUMA))], rel=1e-12)
    assert pre["std"] == pytest.approx([sum(s * w for s, w in zip(meta["std"], LUMA))], rel=1e-12)
    assert pre["mean"][0] == pytest.approx(meta["mean"][0], rel=1e-6)  # grayscale: the luma is the gray value
    assert (pre["input_size"], pre["channel_order"], pre["scale"], pre["layout"]) == ([1, 28, 28], "gray", "0-255",
                                                                                       "NCHW")
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["nps_preprocessing"]) == pre and json.loads(props["nps"])["preprocessing"] == pre
    assert [json.loads(props[k]) for k in ("mean", "std", "input_size")] == [pre["mean"], pre["std"], [1, 28, 28]]
    assert (props["scale"], props["channel_order"], props["layout"]) == ("0-255", "gray", "NCHW")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["nps_preprocessing"] == props["nps_preprocessing"]

    images, labels = load_split(str(data / "val.beton"), device=torch.device("cpu"), num_workers=1)
    _, val, _ = make_loaders(data, batch_size=64, resolution=28, in_channels=1, augment=False, order="sequential",
                             drop_last=False, val_batch_size=64)
    model, plain = load_subnetwork(pt, with_preprocessing=True), load_subnetwork(pt)
    correct = 0
    for i, (x, y) in zip(range(2), val):  # the run scored the first 128 images in batches of 64
        raw = images[64 * i:64 * (i + 1)].permute(0, 3, 1, 2)  # the stored uint8 RGB images, NCHW
        assert torch.equal(labels[64 * i:64 * (i + 1)], y) and torch.equal(model.preprocess(raw), x)
        with torch.no_grad():
            logits = model(raw)
            assert torch.equal(logits, plain(x))
        correct += int((logits.argmax(1) == y).sum())
    assert correct == round(ckpt["top1"] * 128 / 100)


def test_readme_onnx_snippet_runs_as_written(scored_file, tmp_path, monkeypatch):
    """The README's onnxruntime + numpy example, run as written next to a winner.onnx: its logits are the
    network's on those images, preprocessed by nps."""
    import re

    from test_readme import TEXT

    from nps.pipeline import load_subnetwork
    from nps.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", str(scored_file), "--space", SPACE, "--best", "--out", "winner.pt", "--onnx",
                 "winner.onnx"]) == 0
    section = TEXT[TEXT.index("**What an exported network takes.**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "onnxruntime" in code and "import torch" not in code and "nps" not in code.replace("nps export", "")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images = torch.from_numpy(namespace["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = load_subnetwork("winner.pt", with_preprocessing=True)(images).numpy()
    np.testing.assert_allclose(namespace["logits"], expected, rtol=1e-4, atol=1e-4)


def test_readme_latency_table_onnx_examples_run_as_written(scored_file, tmp_path, monkeypatch, capsys):
    """The shell block of the README's "Latency, tables and ONNX", command by command, in a directory whose
    runs/demo holds a run-shaped file (the tiny data's: the README's run would only be slower)."""
    import re

    from test_readme import TEXT, commands_in, table_commands

    from nps.pipeline.cli import main
    from nps.pipeline.deploy import latency

    shutil.copytree(scored_file.parent, tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    # the same command, timed once and in short runs (one forward each instead of 20 ms of them): 3 passes of 2
    # batches of every network took 25 s of this test's 33 s on a slow day
    monkeypatch.setattr(latency, "DEFAULT_MIN_RUN_S", 0.0)
    monkeypatch.setattr(latency, "DEFAULT_PASSES", 1)
    section = TEXT[TEXT.index("## Latency, tables and ONNX"):]
    commands = commands_in(re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1))
    assert [c[1] for c in commands] == ["latency", "report", "table", "export"]
    assert table_commands()["latency"].startswith("nps latency RESULTS.h5")
    assert table_commands()["table"] == "nps table RESULTS.h5 --out rows.parquet"
    for command in commands:
        assert command[0] == "nps"
        assert main(command[1:]) == 0, command
    out = capsys.readouterr().out
    assert "stored in runs/demo/results.h5 under /latency/cpu" in out and "1 thread," in out
    assert (tmp_path / "runs/demo/report/latency_cpu.png").is_file() and (tmp_path / "rows.parquet").is_file()
    assert "winner.onnx (onnxruntime, CPU float32)" in out and "difference +0 images" in out


@pytest.fixture(scope="module")
def run_dir(demo_run):
    out, code, stdout, _ = demo_run
    assert code == 0, stdout
    return out


@pytest.mark.slow
def test_the_winner_as_onnx_counts_the_same_correct_images(run_dir, tmp_path, capsys):
    from nps.pipeline.cli import main
    from nps.pipeline.deploy.onnx_export import verify_onnx

    onnx_path = export_and_compare(run_dir / "results.h5", tmp_path, capsys, atol=1e-4)
    # The file alone: its metadata carries the run's config and scores.
    result = verify_onnx(onnx_path)
    assert result["images"] == 128 and result["correct"] == round(result["top1"] * 128 / 100)
    if result["run_amp"] == "off":  # the run evaluated in float32 on the CPU: the stored top-1 is the reference
        assert result["ok"] and result["diff_images"] == 0
    else:  # bf16 autocast (CPUs with bf16 instructions): stored top-1 is not a float32 number; it says so
        assert "autocast" in result["reference"]
    assert main(["export", "--verify", str(tmp_path / "missing.onnx")]) == 2


@pytest.mark.slow
def test_load_a_real_run(run_dir):
    from test_table import assert_equals_hdf5

    from nps.pipeline.results import load
    from nps.pipeline.deploy.export import saved_weight_rows

    df = load(run_dir / "results.h5")
    assert len(df) == 3 + 1 and set(df["status"]) == {"done"}  # spaces.n = 1: three spaces and the baseline
    assert_equals_hdf5(df, run_dir / "results.h5")
    for space, part in df.groupby("space"):
        assert part["weights"].tolist() == [r in saved_weight_rows(run_dir / "results.h5", space)
                                            for r in part["row"]]


@pytest.mark.slow
def test_output_latency_at_the_end_of_a_run(demo_run, run_dir, tmp_path, monkeypatch):
    """The same run again with ``--set output.latency=true`` (a runtime key): nothing left to train, so it ends at
    once and times the base network and every finished row."""
    from nps.pipeline.cli import main
    from nps.pipeline.deploy import latency
    from nps.pipeline.results.reader import open_readonly

    monkeypatch.setattr(latency, "DEFAULT_RUNS", 3)
    monkeypatch.setattr(latency, "DEFAULT_BATCHES", (1, 2))
    copy = tmp_path / "demo"
    shutil.copytree(run_dir, copy)
    argv = list(demo_run[3])
    argv[argv.index("--out") + 1] = str(copy)
    assert main(argv + ["--set", "output.latency=true"]) == 0
    with open_readonly(copy / "results.h5") as reader:
        cpu = latency.read_latency(reader)["cpu"]
        spaces = reader.spaces()
    assert sorted(set(zip(cpu["space"], cpu["row"].tolist()))) == sorted([("base", -1)] + [(s, 0) for s in spaces])
    assert sorted(set(cpu["batch"].tolist())) == [1, 2] and np.all(cpu["median_s"] > 0)
    assert set(cpu["weights"][cpu["row"] >= 0].tolist()) == {1}  # the demo keeps every row's weights
