"""The results file at the start of a run: created, or reopened to resume the same experiment.

Resuming: the same command opens results.h5 (the stored config must match, runtime-only keys such as ``out``,
``devices``, ``ray`` or ``cohort_size`` aside), keeps every finished row, puts rows left running by a dead run back
to pending, samples only the spaces that are missing, and skips the base network when its metrics are stored
(``out/base.pt`` or the configured checkpoint gives the weights).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.config import parse_config
from nps.pipeline.experiment.plan import Plan
from nps.pipeline.experiment.toml_text import differing_keys, dump
from nps.pipeline.results.store import FAILED, RUNNING, ResultsStore
from nps.pipeline.run.ledger import RowLedger
from nps.pipeline.run.log import RunLog
from nps.pipeline.run.outputs import WeightsKeeper
from nps.pipeline.training.spec import SpaceSpec
from nps.pipeline.words import plural


def default_spec(plan: Plan) -> SpaceSpec:
    """The spec of the experiment's spaces: ``[retrain]`` and ``model.criterion``."""
    cfg = plan.config
    return SpaceSpec(cfg.retrain.spec(), cfg.model.criterion)


def open_results(plan: Plan) -> tuple[ResultsStore, bool]:
    """(store, resumed): a new results.h5, or the existing one after checking it holds this experiment."""
    cfg, path = plan.config, plan.results_path
    attrs = {"base_flops": plan.table.base_flops, "base_params": plan.table.base_params,
             "dataset_fingerprint": plan.meta["fingerprint"], "experiment": cfg.experiment.name,
             "dataset_num_classes": int(plan.meta.get("num_classes", 0)),
             "dataset_image_shape": list(plan.meta.get("image_shape") or [])}
    if "mean" in plan.meta and "std" in plan.meta:  # what exports need (without them an export reads the dataset)
        attrs.update(dataset_mean=list(plan.meta["mean"]), dataset_std=list(plan.meta["std"]))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        store, resumed = ResultsStore.create(path, plan.table, dump(cfg), attrs, weight_table=plan.weight_table,
                                             latency_model=plan.latency_model), False
    else:
        store, resumed = ResultsStore.open(path), True
    try:
        if resumed:
            _check_same_experiment(store, plan)
        # SWMR from the start: `nps status` can read the file while the spaces are sampled (minutes for a large
        # space), and a run killed then leaves a file readers can open
        store.flush()
    except BaseException:
        store.close()
        raise
    return store, resumed


def _check_same_experiment(store: ResultsStore, plan: Plan) -> None:
    from nps.datasets.meta import same_dataset_problem
    from nps.pipeline.network.layer_table import LayerTable

    path = plan.results_path
    hint = "resume with the same settings, or start a new run with another --out"
    try:
        stored = parse_config(store.attrs.get("config", ""), f"{path} (stored config)")
    except NpsError as exc:
        raise NpsError(f"{path} was not written by `nps run` or by an incompatible version ({exc}); {hint}") from None
    diff = differing_keys(stored, plan.config)
    if diff:
        shown = ", ".join(f"{k} (stored {a!r}, now {b!r})" for k, a, b in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        if any(k.startswith(("spaces", "references")) for k, _, _ in diff):
            # a file holds its spaces for good; other spaces go to a new file, on the same trained base network
            base = plan.config.model.checkpoint or plan.base_path
            hint = ("resume with the same settings; to run other spaces or references on this run's base network, "
                    f"start a new run with another --out and --set model.checkpoint={base} (it is evaluated, not "
                    "trained again)")
        raise NpsError(f"{path} holds a different experiment: {shown}{more}; {hint}")
    problem = same_dataset_problem(plan.meta, str(store.attrs.get("dataset_fingerprint", "")))
    if problem:
        raise NpsError(f"dataset.dir: {plan.config.dataset.dir} is not the dataset {path} was made with "
                       f"({problem}); {hint}")
    if "layers" in store.file and LayerTable.from_hdf5(store.layers) != plan.table:
        raise NpsError(f"{path}: its layer table differs from {plan.config.model.name} as configured; {hint}")
    stored_weights = store.weight_layers
    if (stored_weights is None) != (plan.weight_table is None) or (
            stored_weights is not None and LayerTable.from_hdf5(stored_weights) != plan.weight_table):
        raise NpsError(f"{path}: its weight table differs from {plan.config.model.name} as configured; {hint}")


def needs_base_weights(p) -> bool:
    """A space whose recipe depends on the trained base network (``weights:global``): made once the base is."""
    return p.kind == "sampled" and p.space.pruning == "weights" and p.space.kind == "global"


def load_base_model(plan: Plan):
    """The trained base network on the CPU (for the spaces whose recipe depends on its weights)."""
    from nps.pipeline.network.checkpoints import load_base_network

    m = plan.config.model
    return load_base_network(m.checkpoint or plan.base_path, m.name, plan.num_classes, plan.in_channels)


def sample_missing_spaces(store: ResultsStore, plan: Plan, progress=None, base_model=None) -> list[str]:
    """Create every planned space the file does not have yet (rows pending); returns their space keys.

    Sampled spaces draw their recipes (on the weight table for a weight space; ``weights:uniform`` and
    ``weights:global`` are one recipe each, the latter only once ``base_model`` is given), a ratio space has its
    uniform ratios, a baseline the uniform ratio closest to its regime's target
    (:mod:`nps.pipeline.experiment.space_plan`). All are made in memory before any is written, so an
    interrupt while sampling leaves no half space. Each space stores its spec (``retrain_spec``, ``criterion``) and
    its overrides beside its constraints.
    """
    from nps.kernels.errors import SamplerError
    from nps.pipeline.experiment.sampling import (
        baseline_rows,
        ratio_rows,
        sample_rows,
        weight_global_rows,
        weight_uniform_rows,
    )

    cfg = plan.config
    present = set(store.spaces())
    drawn = []
    for p in plan.spaces:
        if p.key in present or (needs_base_weights(p) and base_model is None):
            continue
        if progress:
            progress(f"sampling {p.key}" + (f": {plural(p.n, 'recipe')}" if p.kind == "sampled" else ""))
        table = plan.table_for(p.key)
        if p.kind == "sampled":
            try:
                if needs_base_weights(p):
                    rows, attrs = weight_global_rows(table, p.space, p.n, cfg.experiment.seed, base_model)
                elif p.space.deterministic:
                    rows, attrs = weight_uniform_rows(table, p.space, p.n, cfg.experiment.seed)
                else:
                    rows, attrs, _ = sample_rows(table, p.space, p.n, cfg.experiment.seed,
                                                 max_seconds=cfg.spaces[p.index].max_seconds)
            except SamplerError as exc:
                raise NpsError(f"spaces[{p.index}]: {exc}") from None
        elif p.kind == "baseline":
            rows, attrs = baseline_rows(plan.table, p.target, p.value, cfg.experiment.seed, delta=p.delta, R=p.R)
        else:
            rows, attrs = ratio_rows(plan.table, p.key, p.ratios, p.n, cfg.experiment.seed)
        attrs.update(p.attrs())
        drawn.append((p.key, rows, attrs, p.spec.retrain.epochs))
    for name, rows, attrs, epochs in drawn:
        store.add_space(name, rows, epochs=epochs, attrs=attrs)
    return [name for name, *_ in drawn]


def reset_rows(store: ResultsStore, *, retry_failed: bool) -> tuple[int, dict[str, int]]:
    """Rows left running by a dead run back to pending (and failed ones, with ``retry_failed``).

    Returns (rows that were running, failed rows put back per space)."""
    redone, retried = 0, {}
    for name in store.spaces():
        if retry_failed:
            failed = int(np.count_nonzero(store.status(name) == FAILED))
            store.reset_failed(name)
            if failed:
                retried[name] = failed
        redone += int(np.count_nonzero(store.status(name) == RUNNING))
        store.reset_running(name)
    store.flush()
    return redone, retried


def base_state(store: ResultsStore, plan: Plan) -> tuple[float, bool | None]:
    """(stored base top-1, what is left to do): None when the metrics are stored, else whether to train it."""
    base_top1 = float(store.attrs.get("base_top1", math.nan))
    weights = plan.config.model.checkpoint or plan.base_path
    if math.isfinite(base_top1):
        if not os.path.isfile(weights):
            raise NpsError(f"{plan.results_path} has base metrics but the base weights {weights} are gone; "
                           "start a new run with another --out")
        return base_top1, None
    return base_top1, not plan.config.model.checkpoint and not os.path.isfile(plan.base_path)


def space_order(names: list[str], plan: Plan) -> list[str]:
    """Space keys in the experiment's order, each ``#top`` space right after its parent."""
    from nps.kernels.spaces import parse_space_key

    configured = [p.key for p in plan.spaces]

    def rank(name: str):
        key = parse_space_key(name)
        parent = key.parent if key else name
        return (configured.index(parent) if parent in configured else len(configured), name)

    return sorted(names, key=rank)


@dataclass
class Prepared:
    """A run ready for its driver: the results file and its ledger, the kept weights, the log, the base network's
    state."""

    store: ResultsStore
    ledger: RowLedger
    weights: WeightsKeeper
    log: RunLog
    base_top1: float
    base_todo: bool | None  # None: metrics stored; else whether to train (True) or evaluate (False) it
    resumed: bool


def prepare(plan: Plan, pool, *, phase, note, retry_failed: bool = False) -> Prepared:
    """Open or create results.h5, sample the missing spaces (``phase`` says so), reset rows left running (and
    failed ones, with ``retry_failed``; ``note`` tells), and load every space into a new ledger."""
    cfg = plan.config
    store = None
    try:
        store, resumed = open_results(plan)
        sampled = sample_missing_spaces(store, plan, progress=phase)
        redone, retried = reset_rows(store, retry_failed=retry_failed)
        for name, count in retried.items():
            note(f"{name}: {plural(count, 'failed row')} will be retried")
        base_top1, todo = base_state(store, plan)
        if todo is None and any(needs_base_weights(p) for p in plan.spaces):
            sampled += sample_missing_spaces(store, plan, progress=phase, base_model=load_base_model(plan))
        ledger = RowLedger(store, base_top1=base_top1)
        weights = WeightsKeeper(plan.results_path, cfg.output.keep_weights, cfg.output.top_k, pool)
        default = default_spec(plan)
        for name in space_order(store.spaces(), plan):
            s = ledger.load(name, default)
            weights.start_space(name, s.status, s.top1)
        os.makedirs(cfg.experiment.out, exist_ok=True)
        log = RunLog(cfg.experiment.out)
    except BaseException:
        if store is not None:
            store.close()
        raise
    done = sum(s.done for s in ledger.states())
    log.write("start", pid=os.getpid(), resumed=resumed, done=done, redo=redone, sampled=sampled,
              transport=pool.kind)
    if resumed:
        note(f"resuming {plan.results_path}: {plural(done, 'subnetwork')} done {'is' if done == 1 else 'are'} kept"
             + (f", {redone} left running by the last run {'is' if redone == 1 else 'are'} redone" if redone else ""))
    return Prepared(store, ledger, weights, log, base_top1, todo, resumed)
