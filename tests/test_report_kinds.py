"""What a researcher reads must be right: filter and weight spaces kept apart in the analysis, one uniform reference
per regime (the trained baseline's own values), the best network of a regime whichever space it came from,
intervals only where n supports them, fits drawn only where they explain something, figures that count what they
draw (issue 27)."""
import numpy as np
import pytest

from nps.pipeline.experiment.config import parse_config
from nps.pipeline.experiment.space_plan import check as check_spaces
from nps.pipeline.network.pruning_kind import FILTERS, WEIGHTS, kind_of
from nps.pipeline.results.analysis import Population, beats_baseline, summarize
from nps.pipeline.results.figures import beats_text, best_k_title
from nps.pipeline.results.stats import MIN_FIT_R2, Fit


def _pop(space, drops, *, mcb=None, c_flops=None, value=0.1, G=4, recipe=None, seed=0):
    rng = np.random.default_rng(seed)
    n = len(drops)
    recipe = rng.uniform(0, 0.9, (n, G)) if recipe is None else np.asarray(recipe, float).reshape(n, G)
    counts = {"total": n, "pending": 0, "running": 0, "done": n, "failed": 0, "nan": 0}
    return Population(group=f"{space}@c_flops={value:g}", space=space, target="c_flops", value=value, counts=counts,
                      row=np.arange(n), acc_drop=np.asarray(drops, float), top1=90 - np.asarray(drops, float),
                      c_flops=np.full(n, value) if c_flops is None else np.asarray(c_flops, float),
                      c_params=rng.uniform(0.08, 0.12, n),
                      mcb=rng.uniform(0.9, 1.1, n) if mcb is None else np.asarray(mcb, float),
                      std=recipe.std(axis=1), flops=rng.integers(1e6, 2e6, n), params=rng.integers(1e4, 2e4, n),
                      recipe=recipe, keep=np.ones((n, G), int), delta=0.002)


def _mixed():
    return [_pop("std-0.05", [5.0, 5.5, 6.0, 7.0], seed=1),
            _pop("baseline", [4.25], recipe=[0.676] * 4, mcb=[0.951], c_flops=[0.1015], seed=2),
            _pop("weights:std-0.05", [1.0, 1.2, 1.4], G=22, mcb=[2.4, 2.5, 2.6], seed=3),
            _pop("weights:global", [0.8], G=22, mcb=[2.466], seed=4),
            _pop("weights:uniform", [2.0], G=22, recipe=[0.9] * 22, mcb=[2.3], seed=5)]


def test_the_kind_object_is_resolved_from_the_space_and_answers_for_it():
    assert kind_of("weights:std-0.05@c_flops=0.1") is WEIGHTS and kind_of("std-0.05@c_flops=0.1") is FILTERS
    assert WEIGHTS.space_name("std-0.05") == "weights:std-0.05" and WEIGHTS.space_name("weights:global") == \
        "weights:global"
    assert not WEIGHTS.fusable and FILTERS.fusable and not WEIGHTS.timed and FILTERS.timed
    assert WEIGHTS.is_baseline("weights:uniform") and FILTERS.is_baseline("baseline")
    assert not FILTERS.is_baseline("weights:uniform")
    assert FILTERS.table("filter table", "weight table") == "filter table"
    assert WEIGHTS.table("filter table", "weight table") == "weight table"


def test_filter_and_weight_spaces_are_separate_regimes_with_their_own_baselines_and_fits():
    s = summarize(_mixed(), k=40, n_boot=50)
    assert [(r["pruning"], r["key"]) for r in s["regimes"]] == [("filters", "c_flops=0.1"), ("weights", "c_flops=0.1")]
    filters, weights = s["regimes"]
    assert [sp["space"] for sp in filters["spaces"]] == ["std-0.05"]
    assert [sp["space"] for sp in weights["spaces"]] == ["weights:global", "weights:std-0.05"]  # the baseline apart
    assert filters["baseline"]["space"] == "baseline" and weights["baseline"]["space"] == "weights:uniform"
    # a weight space is measured against weights:uniform (drop 2.0), never against the filter baseline (4.25)
    ws = next(sp for sp in weights["spaces"] if sp["space"] == "weights:std-0.05")
    assert ws["beats_baseline"]["baseline_drop"] == 2.0 and ws["beats_baseline"]["wins"] == 3
    # the fits of each kind take only its own rows: no weight row (mCB 2.466) in the filters' optimal-mCB fit
    assert set(s["fits"]) == {"filters", "weights"}
    assert max(s["fits"]["filters"]["optimal_mcb"]["points"]["mcb"]) < 2.0
    assert min(s["fits"]["weights"]["optimal_mcb"]["points"]["mcb"]) > 2.0
    assert s["optimal_mcb"] == s["fits"]["filters"]["optimal_mcb"]
    # histograms per kind: the filter regime's mCB edges do not stretch to the weight rows
    assert max(filters["hist_edges"]["mcb"]) < 2.0


def test_one_uniform_reference_per_regime_is_the_trained_baselines_own_values():
    computed = {"c_flops=0.1": {"ratio": 0.685, "keep": [1] * 4, "c_flops": 0.09844, "c_params": 0.1,
                                "mcb": 0.9889}}
    s = summarize(_mixed(), k=40, n_boot=50, uniform=computed)
    uni = s["regimes"][0]["uniform"]
    assert uni["trained"] and uni["ratio"] == pytest.approx(0.676) and uni["c_flops"] == pytest.approx(0.1015)
    assert uni["mcb"] == pytest.approx(0.951)
    # without a finished baseline the computed recipe is shown, and says it was not trained
    untrained = summarize([p for p in _mixed() if p.space != "baseline"], k=40, n_boot=50, uniform=computed)
    assert untrained["regimes"][0]["uniform"] == {**computed["c_flops=0.1"], "trained": False}
    assert untrained["regimes"][1]["uniform"]["trained"]  # the weight regime's weights:uniform row


def test_the_best_network_of_a_regime_may_be_its_baseline():
    s = summarize(_mixed(), k=40, n_boot=50)
    filters = s["regimes"][0]
    assert filters["winner"]["space"] == "baseline" and filters["winner"]["acc_drop"] == 4.25
    assert "baseline" in filters["best_k"]["space"] and filters["best_k"]["of"] == 5
    assert s["drop_vs_mcb"]["points"]["space"] == ["baseline"]


def test_intervals_only_where_n_supports_them():
    rng = np.random.default_rng(0)
    few = beats_baseline([5.0, 5.5, 6.0, 7.0], 4.25, 200, rng)
    assert few["ci"] is None and few["wins"] == 0 and beats_text(few) == "0 of 4"
    many = beats_baseline(np.linspace(3, 6, 12), 4.25, 200, rng)
    assert many["ci"] is not None and beats_text(many).startswith("41.7 % [")
    none = beats_baseline(np.linspace(5, 6, 10), 4.25, 200, rng)  # 0 of 10 is not a certain 0 %: Wilson, 95 %
    assert none["ci"][0] == 0.0 and none["ci"][1] == pytest.approx(0.2775, abs=1e-4)
    s = summarize(_mixed(), k=40, n_boot=50)
    sp = s["regimes"][0]["spaces"][0]
    assert sp["drop"]["mean_ci"] is None and sp["edf"]["area_ci"] is None


def test_fits_are_drawn_only_when_they_explain_something():
    weak = Fit("linear", "drop = e0 + a · mCB", {"e0": 1.0, "a": 0.1}, n=3, dof=1, r2=0.086, rmse=0.3)
    drawn, why = weak.drawn()
    assert not drawn and "degree" in why
    poor = Fit("linear", "drop = e0 + a · mCB", {"e0": 1.0, "a": 0.1}, n=12, dof=10, r2=MIN_FIT_R2 - 0.01, rmse=0.3)
    assert not poor.drawn()[0] and "R² = 0.490" in poor.drawn()[1]
    good = Fit("linear", "drop = e0 + a · mCB", {"e0": 1.0, "a": 0.1}, n=12, dof=10, r2=0.9, rmse=0.1)
    assert good.drawn() == (True, "") and good.as_dict()["drawn"] is True


def test_the_best_k_title_counts_what_is_drawn():
    s = summarize(_mixed(), k=40, n_boot=50)
    title = best_k_title(s)
    assert "Best 40" not in title and title.startswith("All 10 finished subnetworks")
    s = summarize(_mixed(), k=2, n_boot=50)
    assert best_k_title(s).startswith("Best k = 2 subnetworks of each regime: 4 of 10 finished")


EXPERIMENT = """
[dataset]
dir = "data"
[model]
name = "resnet20"
pruning = "{pruning}"
[[spaces]]
name = "{space}"
c_flops = [0.3, 0.2]
n = {n}
"""


def test_a_weights_run_trains_its_own_uniform_baseline_per_regime():
    planned = check_spaces(parse_config(EXPERIMENT.format(pruning="weights", space="std-0.05", n=4)))
    assert [p.key for p in planned] == ["weights:std-0.05@c_flops=0.3", "weights:std-0.05@c_flops=0.2",
                                        "weights:uniform@c_flops=0.3", "weights:uniform@c_flops=0.2"]
    assert all(p.n == 1 and p.kind == "sampled" for p in planned[2:])
    # one already given is not doubled; a filter run keeps its one filter baseline per regime
    given = check_spaces(parse_config(EXPERIMENT.format(pruning="weights", space="uniform", n=1)))
    assert [p.key for p in given] == ["weights:uniform@c_flops=0.3", "weights:uniform@c_flops=0.2"]
    filters = check_spaces(parse_config(EXPERIMENT.format(pruning="filters", space="std-0.05", n=4)))
    assert [p.key for p in filters][2:] == ["baseline@c_flops=0.3", "baseline@c_flops=0.2"]


def test_axes_read_as_plain_numbers():
    """references.png over c_flops 0.83-1.0 is linear (its log axis labelled ticks '9×10⁻¹'); where a log axis is
    wanted its ticks are plain numbers."""
    from matplotlib.figure import Figure

    from nps.pipeline.results.figures import _log_axis, log_wanted

    assert not log_wanted([0.83, 0.9, 1.0]) and log_wanted([0.05, 0.25, 1.0]) and not log_wanted([])
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0.05, 1.0], [1, 2])
    _log_axis(ax, "x")
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    labels = [t.get_text() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels()]
    assert labels and not any("10^" in t or "times" in t or "\\mathdefault" in t for t in labels)
    assert "0.1" in labels and "0.05" in labels


def test_a_reference_of_several_seeds_is_compared_by_its_mean_with_an_interval_over_both():
    from nps.pipeline.results.references import compare, gain_interval

    pops = [_pop("std-0.05", np.linspace(1.0, 3.0, 12), value=0.5, seed=1),
            _pop("weights:std-0.05", [1.0, 1.5], value=0.5, seed=2)]
    s = summarize(pops, k=40, n_boot=50)
    refs = {"m": {"model": "m", "seed": 0, "top1": 88.0, "top5": 99.0, "c_flops": 0.5, "c_params": 0.5, "train_s": 10.0},
            "m#1": {"model": "m", "seed": 1, "top1": 87.0, "top5": 99.0, "c_flops": 0.5, "c_params": 0.5,
                    "train_s": 12.0}}
    (entry,) = compare(refs, pops, s["regimes"], 90.0, n_boot=2000, seed=0, band=(2.5, 97.5))
    assert entry["seeds"] == 2 and entry["top1"] == 87.5 and entry["top1_values"] == [88.0, 87.0]
    assert entry["acc_drop"] == 2.5 and entry["train_s"] == 11.0 and entry["top1_range"] == [87.0, 88.0]
    std = entry["spaces"]["std-0.05"]
    assert std["gain"] == pytest.approx(0.5) and std["best_gain"] == pytest.approx(1.5)
    lo, hi = std["gain_ci"]
    # the reference's two seeds differ by 1 pp: the interval is wider than the subnetworks' alone
    alone = gain_interval(pops[0].top1, [87.5], 2000, np.random.default_rng(0), (2.5, 97.5))
    assert lo < alone[0] < 0.5 < alone[1] < hi
    assert lo == pytest.approx(0.5 - 0.5 - 0.35, abs=0.25) and hi == pytest.approx(0.5 + 0.5 + 0.35, abs=0.25)
    assert std["beats"]["wins"] == 9  # drops below 2.5 among 1.0, 1.18, ... 3.0 (12 steps)
    assert entry["spaces"]["weights:std-0.05"]["gain_ci"] is None  # 2 rows: a value, no interval
