"""`nps sample` end to end: the HDF5 file it writes, its summary, and its one-line errors."""
import h5py
import numpy as np
import pytest

from nps.kernels.samplers import sample_space
from nps.kernels.spaces import parse_space
from nps.pipeline.cli import main
from nps.pipeline.experiment.sampling import space_seed
from nps.pipeline.network.layer_table import LayerTable, build_layer_table


def test_sample_writes_layers_and_rows(tmp_path, capsys):
    out = tmp_path / "recipes.h5"
    rc = main(["sample", "--model", "resnet56", "--mode", "all", "--resolution", "32", "--classes", "10",
               "--space", "std-0.05", "--space", "mcb-0.9-1.1", "--c-flops", "0.25", "-n", "200", "--seed", "0",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "std-0.05@c_flops=0.25" in text and "recipes/s" in text
    table = build_layer_table("resnet56", "all", 32, 10)
    with h5py.File(out, "r") as f:
        stored = LayerTable.from_hdf5(f["layers"])
        assert stored == table
        assert f["layers"].attrs["mode"] == "all" and f["layers"].attrs["model"] == "resnet56"
        members = [m.decode() if isinstance(m, bytes) else m for m in f["layers/members"][()]]
        assert members[0].split(",")[0] == "conv1"
        assert set(f["spaces"]) == {"std-0.05@c_flops=0.25", "mcb-0.9-1.1@c_flops=0.25"}
        for name, g in f["spaces"].items():
            recipe, keep = g["recipe"][()], g["keep"][()]
            assert recipe.shape == (200, len(table.channels)) and keep.dtype == np.int32
            # keep is authoritative; recipe is stored as f4 (docs/results-format.md), so compare with the sampler's
            # own draw
            space = parse_space(name.split("@")[0], "c_flops", 0.25)
            drawn = sample_space(table, space, 200, seed=space_seed(0, name))
            assert np.array_equal(drawn.keep, keep)
            assert np.array_equal(drawn.recipe.astype(np.float32), recipe)
            c = table.flops_of(keep.astype(np.int64)) / table.base_flops
            assert np.all(np.abs(c - 0.25) <= 0.002)
            assert np.allclose(g["c_flops"][()], c, atol=1e-6)
            assert np.all(g["status"][()] == 0)
            assert len(np.unique(g["seed"][()])) == 200
            assert g.attrs["space"] == name.split("@")[0] and g.attrs["target"] == "c_flops"
    # a second seed-identical run reproduces the rows
    out2 = tmp_path / "again.h5"
    main(["sample", "--model", "resnet56", "--resolution", "32", "--space", "std-0.05", "--c-flops", "0.25",
          "-n", "200", "--seed", "0", "--out", str(out2)])
    with h5py.File(out, "r") as a, h5py.File(out2, "r") as b:
        assert np.array_equal(a["spaces/std-0.05@c_flops=0.25/keep"][()], b["spaces/std-0.05@c_flops=0.25/keep"][()])


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet50", "--mode", "internal", "--resolution", "64", "--space", "std-0.01", "--c-flops", "0.05"],
     "c_flops=0.05 is out of reach for resnet50 in mode 'internal' with R=0.95: reachable c_flops is [0.1"),
    (["--model", "resnet9", "--resolution", "32", "--space", "std-0.01", "--c-flops", "0.5"], "resnet9"),
    (["--model", "resnet56", "--resolution", "32", "--space", "gauss", "--c-flops", "0.5"], "space 'gauss'"),
    (["--model", "resnet56", "--resolution", "32", "--space", "std-0.05", "--c-flops", "1.5"], "c_flops=1.5"),
    (["--model", "resnet56", "--resolution", "32", "--space", "mcb-3-4", "--c-flops", "0.25"],
     "mCB band [3, 4] is out of reach"),
    (["--model", "shufflenet_v2_x0_5", "--resolution", "32", "--space", "std-0.05", "--c-flops", "0.5"],
     "a reshape that splits or mixes the channel axis (a channel shuffle?)"),
    (["--model", "convnext_tiny", "--resolution", "28", "--space", "std-0.05", "--c-flops", "0.5"],
     "resolution 28 is too small"),
    (["--model", "mobilenet_v2", "--resolution", "32", "--channel-multiple", "0", "--space", "std-0.05",
      "--c-flops", "0.5"], "channel multiple must be a positive integer"),
    (["--model", "nopkg_xyz:net", "--resolution", "32", "--space", "std-0.05", "--c-flops", "0.5"],
     "cannot import nopkg_xyz"),
])
def test_bad_requests_fail_with_one_line_and_no_file(tmp_path, capsys, args, message):
    out = tmp_path / "x.h5"
    rc = main(["sample", *args, "-n", "10", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "x.h5"
    out.write_bytes(b"keep me")
    rc = main(["sample", "--model", "resnet20", "--resolution", "32", "--space", "std-0.05", "--c-flops", "0.5",
               "-n", "5", "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_compact_convnet_with_channel_multiple_and_paper_flops(tmp_path, capsys):
    out = tmp_path / "mb.h5"
    rc = main(["sample", "--model", "mobilenet_v2", "--resolution", "32", "--channel-multiple", "8", "--flops",
               "paper", "--space", "std-0.05", "--c-flops", "0.25", "-n", "50", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "ptflops" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        table = LayerTable.from_hdf5(f["layers"])
        assert table.flops_convention == "paper" and table.channel_multiple == 8
        assert table == build_layer_table("mobilenet_v2", "all", 32, 10, flops="paper", channel_multiple=8)
        keep = f["spaces/std-0.05@c_flops=0.25/keep"][()]
        assert np.all(keep % table.granularity == 0)
        assert np.all(np.abs(table.c_flops(keep) - 0.25) <= 0.002)


def test_a_count_whose_recipes_cannot_fit_in_memory_is_refused_before_anything_is_drawn(tmp_path, capsys):
    """-n 10^12 would need hundreds of TiB: one line naming -n, the size and the memory, not numpy's MemoryError."""
    import time

    out = tmp_path / "x.h5"
    started = time.monotonic()
    rc = main(["sample", "--model", "resnet20", "--resolution", "32", "--space", "std-0.05", "--c-flops", "0.5",
               "-n", str(10**12), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "-n 1000000000000: the recipes of 1 space need " in err and " TiB, this machine has " in err
    assert err.rstrip().endswith("available; lower -n")
    assert time.monotonic() - started < 30
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_counts_each_space_on_the_table_it_is_drawn_on(tmp_path, capsys, monkeypatch):
    """A filter space on resnet20's 12 groups and a weight space on its 22 layers: refused with one byte less than
    the estimate for both tables, drawn with exactly the estimate; the summary's title names both tables."""
    from nps.pipeline.experiment import sampling

    need = sampling.recipes_bytes([(50, 12, 0), (50, 22, 0)])
    argv = ["sample", "--model", "resnet20", "--resolution", "32", "--space", "std-0.05", "--space",
            "weights:std-0.05", "--c-flops", "0.5", "-n", "50", "--out", str(tmp_path / "x.h5")]
    monkeypatch.setattr(sampling, "available_memory", lambda: need - 1)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "-n 50: the recipes of 2 spaces need" in err and "lower -n" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sampling, "available_memory", lambda: need)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "resnet20 (weight pruning, 32 px, 22 layers" in out and "resnet20 (all, 32 px, 12 groups" in out


def test_a_weight_space_is_summarised_under_the_weight_table(tmp_path, capsys):
    rc = main(["sample", "--model", "resnet20", "--resolution", "32", "--space", "weights:std-0.05", "--c-flops",
               "0.5", "-n", "20", "--out", str(tmp_path / "w.h5")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "(weight pruning, 32 px, 22 layers" in out and "12 groups" not in out


@pytest.mark.parametrize("model,mode", [("resnet20", "all"), ("resnet20", "weights")])
def test_the_memory_estimate_holds_what_drawing_and_writing_a_space_allocate(tmp_path, model, mode):
    """tracemalloc's peak (numpy's buffers are traced) of drawing 50,000 recipes and writing them as nps sample
    does stays within the estimate the check uses, and is most of it (an estimate ten times too big would refuse
    counts that fit)."""
    import tracemalloc

    from nps.pipeline.experiment.sampling import recipes_bytes, sample_rows
    from nps.pipeline.network.weight_table import build_weight_table
    from nps.pipeline.results.store import ResultsStore

    table = build_weight_table(model, 32, 10, 3) if mode == "weights" else build_layer_table(model, mode, 32, 10)
    space = parse_space("weights:std-0.05" if mode == "weights" else "std-0.05", "c_flops", 0.5)
    sample_rows(table, space, 10, 0)  # numba compiles first, outside the measurement
    n = 50_000
    tracemalloc.start()
    try:
        rows, attrs, sample = sample_rows(table, space, n, 1)
        store = ResultsStore.create(tmp_path / "r.h5", table, "", {"base_flops": table.base_flops,
                                                                   "base_params": table.base_params})
        try:
            store.add_space(space.key, rows, epochs=0, attrs=attrs)
        finally:
            store.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = recipes_bytes([(n, len(table.channels), 0)])
    assert 0.7 * estimate < peak <= estimate, (peak, estimate)
