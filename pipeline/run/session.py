"""A run from start to end: the transport chosen, then the driver.

:func:`run_experiment` picks the pool (worker processes on this machine, or Ray actors with ``--ray`` /
``[experiment] ray``), opens the :class:`~nps.pipeline.run.driver.Driver` and runs it. This is the one place that
knows which transports exist.
"""
from __future__ import annotations

from nps.pipeline.errors import NpsError
from nps.pipeline.experiment.plan import Plan
from nps.pipeline.run.driver import Driver
from nps.pipeline.run.pools import LocalPool, WorkerPool
from nps.pipeline.run.state import Outcome, RunView


def make_pool(plan: Plan, *, devices: list[str] | None, ray: str | None) -> WorkerPool:
    """Ray actors when a Ray address is given (``--ray`` over ``experiment.ray``), else local processes."""
    from nps.pipeline.experiment.checks import check_ray_address, parse_devices

    address = check_ray_address(ray) if ray is not None else plan.config.experiment.ray
    if address:
        from nps.pipeline.run.ray_pool import RayPool

        if devices:
            raise NpsError("--devices: not used on a Ray cluster (every GPU of it gets a worker); drop --devices or "
                           "the Ray address")
        return RayPool(address, key="--ray" if ray is not None else "experiment.ray")
    key = "--devices" if devices else "experiment.devices"
    devices = devices or parse_devices(plan.config.experiment.devices, key=key)
    cuda = [d for d in devices if d.startswith("cuda")]
    if cuda:
        import torch

        visible = torch.cuda.device_count()
        absent = [d for d in cuda if int(d.split(":")[1]) >= visible]
        if absent:
            raise NpsError(f"{key}: {', '.join(absent)} not available ({visible} GPUs visible)")
    return LocalPool(devices)


def run_experiment(plan: Plan, view: RunView, *, devices: list[str] | None = None, ray: str | None = None,
                   retry_failed: bool = False, pool: WorkerPool | None = None) -> Outcome:
    """Run (or resume) a validated experiment, shown by ``view``. ``ray`` is an address (``auto``, ``HOST:PORT``)
    to run on a Ray cluster; ``pool`` replaces the transport altogether."""
    pool = pool or make_pool(plan, devices=devices, ray=ray)
    outcome = Driver.open(plan, pool, view, retry_failed=retry_failed).run()
    if outcome.status == "complete" and plan.config.output.latency:
        measure_latency(plan, view, devices=devices, ray=ray)
    return outcome


def measure_latency(plan: Plan, view: RunView, *, devices: list[str] | None, ray: str | None) -> None:
    """``[output] latency = true``: after the run (its writer lock released), time the base network and every
    finished row not timed yet on the run's first device (on a Ray cluster: this machine's GPU, else its CPU), and
    store the timings in results.h5 (``nps latency``)."""
    import torch

    from nps.pipeline.experiment.checks import parse_devices
    from nps.pipeline.deploy.latency import measure_results
    from nps.pipeline.results.latency import noise_warning, store_latency
    from nps.pipeline.words import plural

    if ray is not None or plan.config.experiment.ray:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = (devices or parse_devices(plan.config.experiment.devices, key="experiment.devices"))[0]
    view.note(f"[output] latency: timing the base network and the finished rows on {device}")
    session = measure_results(plan.results_path, device=device, only_missing=True)
    if not session["records"]:
        view.note(f"latency: every finished row is timed on {device} already (nps latency times them again)")
        return
    store_latency(plan.results_path, session)
    s = session["settings"]
    timed = plural(len({(r["space"], r["row"]) for r in session["records"]}) - 1, "subnetwork")
    view.note(f"latency: {timed} and the base network timed at batch {', '.join(map(str, s['batches']))} on "
              f"{s['device_name']} ({plural(s['threads'], 'thread')}); stored in {plan.results_path} under "
              f"/latency/{session['device']} (nps report draws them)")
    warning = noise_warning(session)
    if warning:
        view.note(f"warning: {warning}")
