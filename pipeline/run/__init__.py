"""The run driver behind `nps run`: an experiment end to end, resumable, on this machine or on a Ray cluster.

The data flow, and who owns what::

    resume     results.h5 created or reopened, missing spaces sampled, rows left running reset
    ledger     the one owner of row state: take / finish / requeue / release, written through to results.h5
    driver     applies worker events to the ledger, hands idle workers the next task, writes base.pt, weights/
    outputs    kept weights (keep_weights), the two-stage top-k spaces
    protocol   the typed tasks and events between the driver and its workers
    worker     one device's work (base network, cohorts); the same code under every transport
    pools      the transport: LocalPool (a process per device) and, in ray_pool, RayPool (an actor per GPU)
    session    run_experiment: the pool chosen, the loop, signals, and a clean end

The driver is the only writer of results.h5 and of every file beside it; workers send results, kept weights and a
trained base network back as messages.
"""
from nps.pipeline.run.driver import Outcome
from nps.pipeline.run.ledger import MAX_ATTEMPTS, RowLedger, row_cost
from nps.pipeline.run.resume import open_results, sample_missing_spaces
from nps.pipeline.run.session import run_experiment

__all__ = ["MAX_ATTEMPTS", "Outcome", "RowLedger", "open_results", "row_cost", "run_experiment",
           "sample_missing_spaces"]
