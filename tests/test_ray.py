"""`nps run --ray` on a real Ray cluster of three nodes on this machine, loopback only.

The cluster (tests/ray_cluster.py) lives in a fresh network namespace that holds only ``lo``; the runs enter it with
``nsenter``. Each node has one fake GPU (``NPS_RAY_GPUS_AS_CPU=1``: the actors take the GPU resource and train on
the CPU) and one CPU. (a) a run on the cluster gives the rows of the same run on this machine, bit for bit;
(b, slow) a node killed mid-run: the run completes, every row done once, finished rows unchanged, and a node that
joins later gets work; (c, slow) the driver killed mid-run: the same command resumes and completes. Every process a
test starts is stopped by its handle or pid, and nothing is left in the namespace.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nps.pipeline.results.store import DONE, open_readonly

HELPER = Path(__file__).with_name("ray_cluster.py")
TIMEOUT = 420


def _ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.fmnist, pytest.mark.ray,
    pytest.mark.skipif(not _ray_installed(), reason="Ray is not installed (pip install 'nps[ray]')"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                       reason="needs root, unshare and nsenter for a loopback-only network namespace"),
]


def _pids_in(netns: str | None) -> list[int]:
    """Processes whose network namespace is ``netns`` (``net:[inode]``), never this process's own namespace."""
    if netns is None or netns == os.readlink("/proc/self/ns/net"):
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == netns:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


class RayCluster:
    """Handle on the cluster holder process (see tests/ray_cluster.py)."""

    def __init__(self, nodes: int):
        self.temp = tempfile.mkdtemp(prefix="nps-ray-", dir="/tmp")  # short: Ray's socket paths are limited
        self.log = open(os.path.join(self.temp, "holder.log"), "w")
        command = (f"ip link set lo up && exec {sys.executable} {HELPER} --nodes {nodes} --gpus 1 --cpus 1 "
                   f"--temp {self.temp}/ray")
        self.netns = None
        self.proc = subprocess.Popen(["unshare", "-n", "sh", "-c", command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            up = self.reply(120)
        except BaseException:
            self.proc.kill()  # by its handle; Ray's own processes die with their parent's pipes closing
            self.proc.wait(30)
            raise
        # Only now is the holder surely inside its own namespace (right after Popen it may not have unshared yet).
        netns = os.readlink(f"/proc/{self.proc.pid}/ns/net")
        if netns == os.readlink("/proc/self/ns/net"):
            raise AssertionError("the Ray cluster is not in a namespace of its own")
        self.netns = netns
        self.address, self.nodes = up["address"], list(up["nodes"])

    def reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the Ray cluster did not answer in {timeout}s (see {self.log.name})")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the Ray cluster holder ended (see {self.log.name})")
        return json.loads(line)

    def command(self, text: str, timeout: float = 120) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.reply(timeout)

    def nps(self, *args) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", sys.executable, "-m", "nps.pipeline.cli",
                *map(str, args)]

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.command("quit", timeout=120)
                self.proc.wait(60)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            for pid in _pids_in(self.netns):  # anything the cluster left behind in its namespace, by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.log.close()
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    handle = RayCluster(nodes=3)
    try:
        yield handle
    finally:
        handle.stop()
    assert not _pids_in(handle.netns), "processes outlived the Ray cluster"


ENV = {**os.environ, "NPS_RAY_GPUS_AS_CPU": "1", "OMP_NUM_THREADS": "1"}


def experiment(path: Path, data_dir, checkpoint, out: Path, *, n: int, epochs: int, cohort: int) -> Path:
    path.write_text(f"""
[experiment]
name = "ray"
seed = 3
out = "{out}"
devices = "cpu"

[dataset]
dir = "{data_dir}"
val_batch_size = 128
augment = true

[model]
name = "resnet20"
checkpoint = "{checkpoint}"

[[spaces]]
name = "std-0.05"
c_flops = 0.25
n = {n}

[[spaces]]
name = "std-0.01"
c_flops = 0.25
n = {n}

[retrain]
epochs = {epochs}
batch_size = 32
cohort_size = {cohort}
bn_images = 64
eval_every_epoch = true

[output]
keep_weights = "all"
""")
    return path


def read_all(results: Path) -> dict:
    with open_readonly(results) as reader:
        return {space: reader.read(space) for space in reader.spaces()}


def log_events(out: Path) -> list[dict]:
    with open(out / "log.jsonl") as fh:
        return [json.loads(line) for line in fh]


def done_rows(results: Path) -> int:
    try:
        with open_readonly(results, retry_s=1.0) as reader:
            return sum(s["done"] for s in reader.summary().values())
    except Exception:  # noqa: BLE001 - not created yet, or between structural changes
        return 0


def wait_until(check, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before {what}: {err[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def assert_each_row_done_once(out: Path, total: int) -> None:
    done = Counter((e["space"], e["row"]) for e in log_events(out) if e["event"] == "done")
    assert len(done) == total and set(done.values()) == {1}


def test_a_run_on_the_cluster_gives_the_rows_of_a_local_run(cluster, fmnist_dir, base_checkpoint, tmp_path):
    data = fmnist_dir(256)
    local = experiment(tmp_path / "local.toml", data, base_checkpoint, tmp_path / "local", n=2, epochs=1, cohort=2)
    on_ray = experiment(tmp_path / "ray.toml", data, base_checkpoint, tmp_path / "ray", n=2, epochs=1, cohort=1)
    out = subprocess.run([sys.executable, "-m", "nps.pipeline.cli", "run", local], capture_output=True, text=True,
                         timeout=TIMEOUT, env=ENV)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(cluster.nps("run", on_ray, "--ray", cluster.address), capture_output=True, text=True,
                         timeout=TIMEOUT, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    mine, theirs = read_all(tmp_path / "local" / "results.h5"), read_all(tmp_path / "ray" / "results.h5")
    assert sorted(mine) == sorted(theirs)
    for space, cols in theirs.items():
        assert (cols["status"] == DONE).all()
        for field in ("keep", "seed", "top1", "top5", "loss", "bn_top1", "curve"):
            np.testing.assert_array_equal(cols[field], mine[space][field], err_msg=f"{space} {field}")
    events = log_events(tmp_path / "ray")
    nodes = {e["node"] for e in events if e["event"] == "ready"}
    assert len(nodes) == 3 and all(any(node.endswith(n[:6]) for n in cluster.nodes) for node in nodes)
    assert [e["transport"] for e in events if e["event"] == "start"] == ["ray"]
    assert_each_row_done_once(tmp_path / "ray", 5)  # 2 + 2 sampled rows and the baseline
    # kept weights came through the object store and the driver wrote them: the same tensors as the local run's
    import torch

    for space, cols in theirs.items():
        for row in range(len(cols["status"])):
            a = torch.load(tmp_path / "ray" / "weights" / space / f"{row}.pt", weights_only=True)
            b = torch.load(tmp_path / "local" / "weights" / space / f"{row}.pt", weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_dead_node_loses_no_row_and_a_new_node_gets_work(cluster, fmnist_dir, base_checkpoint, tmp_path):
    exp = experiment(tmp_path / "x.toml", fmnist_dir(256), base_checkpoint, tmp_path / "run", n=12, epochs=4, cohort=1)
    results = tmp_path / "run" / "results.h5"
    proc = subprocess.Popen(cluster.nps("run", exp, "--ray", cluster.address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_until(lambda: done_rows(results) >= 2, proc, "two rows were done")
        before = read_all(results)
        killed = cluster.command("kill 2")["killed"]
        added = cluster.command("add")["added"]
        wait_until(lambda: any(e["event"] == "dispatch" and e["node"].endswith(added[:6])
                               for e in log_events(tmp_path / "run")), proc, "the new node got work")
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    cluster.nodes.append(added)
    after = read_all(results)
    for space, cols in after.items():
        assert (cols["status"] == DONE).all()
        kept = before[space]["status"] == DONE
        for field in ("top1", "loss", "bn_top1", "train_s", "curve"):  # finished rows were not recomputed
            np.testing.assert_array_equal(cols[field][kept], before[space][field][kept])
    assert_each_row_done_once(tmp_path / "run", 25)
    lost = [e for e in log_events(tmp_path / "run") if e["event"] == "worker_lost"]
    assert lost and all(e["node"].endswith(killed[:6]) for e in lost)


@pytest.mark.slow
def test_a_killed_driver_resumes_with_ray(cluster, fmnist_dir, base_checkpoint, tmp_path):
    exp = experiment(tmp_path / "x.toml", fmnist_dir(256), base_checkpoint, tmp_path / "run", n=5, epochs=2, cohort=1)
    results = tmp_path / "run" / "results.h5"
    proc = subprocess.Popen(cluster.nps("run", exp, "--ray", cluster.address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_until(lambda: done_rows(results) >= 2, proc, "two rows were done")
        os.kill(proc.pid, signal.SIGKILL)  # nsenter execs the driver: this pid is the driver
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    before = read_all(results)
    finished = sum(int((c["status"] == DONE).sum()) for c in before.values())
    assert 2 <= finished < 11
    out = subprocess.run(cluster.nps("run", exp, "--ray", cluster.address), capture_output=True, text=True,
                         timeout=TIMEOUT, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming {results}: {finished} subnetworks done are kept" in out.stdout
    after = read_all(results)
    for space, cols in after.items():
        assert (cols["status"] == DONE).all()
        kept = before[space]["status"] == DONE
        np.testing.assert_array_equal(cols["top1"][kept], before[space]["top1"][kept])
    assert_each_row_done_once(tmp_path / "run", 11)
