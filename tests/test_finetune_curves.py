"""The fine-tuning curves of a report (retrain.eval_every_epoch): per space the median and quartiles of the rows'
val top-1 at every epoch, epoch 0 being the adaptive-BN top-1, and whether its last epoch still gained."""
from __future__ import annotations

import pytest

from nps.pipeline.row_status import Result


def _file(path, curves: dict[str, list[list[float]]], bn: float = 40.0, stored: bool = True):
    from nps.kernels.spaces import parse_space
    from nps.pipeline.experiment.sampling import sample_rows
    from nps.pipeline.network.layer_table import build_layer_table
    from nps.pipeline.results.store import ResultsStore

    table = build_layer_table("resnet20", "all", 28, 10, 1)
    store = ResultsStore.create(path, table, '[experiment]\nname = "curves"\n[model]\nname = "resnet20"\n',
                                {"base_top1": 92.0, "base_flops": table.base_flops, "base_params": table.base_params})
    try:
        for name, lines in curves.items():
            rows, attrs, _ = sample_rows(table, parse_space(name, "c_flops", 0.5), len(lines), 0)
            store.add_space(f"{name}@c_flops=0.5", rows, epochs=len(lines[0]), attrs=attrs)
            store.record(f"{name}@c_flops=0.5", range(len(lines)),
                         [Result.done(top1=c[-1], top5=99.0, loss=0.3, bn_top1=bn, train_s=1.0,
                                      curve=c if stored else None)
                          for c in lines])
    finally:
        store.close()
    return path


def test_the_curves_are_summarised_per_space_and_a_still_rising_space_is_named(tmp_path):
    from nps.pipeline.results.report import write_report

    rising = [[80.0 + i, 84.0 + i, 86.0 + i] for i in range(5)]  # +2 pp in the last epoch
    flat = [[85.0, 86.0 + 0.01 * i, 86.05 + 0.01 * i] for i in range(4)]  # +0.05 pp
    summary = write_report(_file(tmp_path / "r.h5", {"std-0.05": rising, "std-0.1": flat}), tmp_path / "out",
                           n_boot=20)
    by = {c["space"]: c for c in summary["finetune_curves"]}
    assert by["std-0.05"]["median"] == [40.0, 82.0, 86.0, 88.0] and by["std-0.05"]["epochs"] == 3
    assert by["std-0.05"]["q25"][1] == 81.0 and by["std-0.05"]["q75"][1] == 83.0
    assert by["std-0.05"]["last_gain"] == pytest.approx(2.0) and by["std-0.05"]["rising"]
    assert by["std-0.1"]["last_gain"] == pytest.approx(0.05, abs=1e-4) and not by["std-0.1"]["rising"]  # f4
    figure = summary["figures"]["finetune_curves"]
    assert (tmp_path / "out" / figure["file"]).is_file()
    assert "still learning in the last epoch" in figure["caption"] and "std-0.05 at c_flops=0.5" in figure["caption"]
    assert "std-0.1 at" not in figure["caption"]


def test_without_eval_every_epoch_there_is_no_figure(tmp_path):
    from nps.pipeline.results.report import write_report

    summary = write_report(_file(tmp_path / "r.h5", {"std-0.05": [[85.0]] * 3}, stored=False), tmp_path / "out",
                           n_boot=20)
    assert summary["finetune_curves"] == [] and "finetune_curves" not in summary["figures"]
