"""The run driver behind `nps run`: an experiment end to end, resumable, on this machine or on a Ray cluster.

The data flow, and who owns what::

    resume     results.h5 created or reopened, missing spaces sampled, rows left running reset
    state      the run's state as plain data (spaces, workers, finished rows) and the view's Protocol
    ledger     the one owner of row state: take / finish / requeue / release, written through to results.h5
    driver     opens a run, owns its loop: worker events to the ledger, the next task for idle workers, base.pt,
               weights/, log.jsonl (log), signals, and a clean end
    outputs    kept weights (keep_weights), the two-stage top-k spaces
    protocol   the typed tasks and events between the driver and its workers
    worker     one device's work (base network, cohorts); the same code under every transport
    pools      the transport: LocalPool (a process per device) and, in ray_pool, RayPool (an actor per GPU); a
               pool also moves row weights (staged files, objects in a store) and the base network
    session    run_experiment: the pool chosen, the driver opened and run

The driver is the only writer of results.h5 and of every file beside it; workers send results, kept weights and a
trained base network back as messages.
"""
from nps.pipeline.run.ledger import MAX_ATTEMPTS, RowLedger, row_cost
from nps.pipeline.run.resume import open_results, sample_missing_spaces
from nps.pipeline.run.session import run_experiment
from nps.pipeline.run.state import Outcome

__all__ = ["MAX_ATTEMPTS", "Outcome", "RowLedger", "open_results", "row_cost", "run_experiment",
           "sample_missing_spaces"]
