"""A probe of bad input and faults, tried as a new user would: every command, broken files, signals, concurrent runs.

Each case runs `nps` in a fresh process (as a user types it) inside a scratch directory, with a 60 s limit, and
prints one JSON line: the case, the exit status, whether it ended in one line (exit 2, a single stderr line), printed
a traceback or hung, the seconds it took, the first line of stderr, and whether it holds (the expected exit status,
no traceback, nothing hung, and the case's own check). The baseline is the promise itself: bad input and faults of
the environment end in one line (exit 2), a signal in 130 and a resumable file, never a traceback or a hang.

    python tools/probe_faults.py [--only SUBSTRING] [--keep DIR]

Needs the embedded Fashion-MNIST (Debian's dataset-fashion-mnist) for the run cases; a read-only tmpfs when root.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FMNIST = "/usr/share/datasets/fashion-mnist"
LIMIT_S = 60
TINY = ["--set", "dataset.train_images=256", "--set", "dataset.val_images=256", "--set", "base.epochs=1",
        "--set", "retrain.epochs=1", "--set", "spaces.n=2", "--plain"]


def nps(*args) -> list[str]:
    return [sys.executable, "-m", "nps.pipeline.cli", *map(str, args)]


class Probe:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "2"}
        self.results = []

    def run(self, *args, timeout=LIMIT_S, cwd=None):
        started = time.monotonic()
        try:
            done = subprocess.run(nps(*args), capture_output=True, text=True, timeout=timeout, env=self.env,
                                  cwd=cwd or self.root)
            return done.returncode, done.stdout, done.stderr, time.monotonic() - started, False
        except subprocess.TimeoutExpired as exc:
            return None, exc.stdout or "", exc.stderr or "", time.monotonic() - started, True

    def record(self, case, code, out, err, seconds, hung, expect, ok=True):
        err_text = err if isinstance(err, str) else err.decode(errors="replace")
        lines = [line for line in err_text.splitlines() if line.strip() and "leaked semaphore" not in line
                 and "warnings.warn" not in line]
        row = {"case": case, "exit": code, "one_line": code == 2 and len(lines) == 1,
               "traceback": "Traceback" in err_text, "hung": hung, "seconds": round(seconds, 1),
               "stderr": lines[0][:160] if lines else ""}
        row["holds"] = bool(code == expect and not row["traceback"] and not hung and ok
                            and (code != 2 or row["one_line"]))
        self.results.append(row)
        print(json.dumps(row), flush=True)

    def case(self, name, *args, expect=2, check=None, cwd=None, timeout=LIMIT_S):
        code, out, err, seconds, hung = self.run(*args, cwd=cwd, timeout=timeout)
        ok = check(code, out, err) if check is not None and not hung else True
        self.record(name, code, out, err, seconds, hung, expect, ok)
        return code, out, err


def write_idx(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--keep", help="scratch directory to use and keep (default: a temporary one, removed)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="nps-probe-"))
    root.mkdir(parents=True, exist_ok=True)
    p = Probe(root)
    only = args.only
    mounted = []

    def want(name):
        return only in name

    try:
        # ---------------------------------------------------------------------------------------------- data
        data = root / "fm"
        if not (data / "meta.json").exists():
            subprocess.run(nps("convert", "fashion-mnist", "--out", data, "--limit", "2000"), check=True,
                           capture_output=True, env=p.env)
        ro = root / "ro"
        ro.mkdir(exist_ok=True)
        if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                                capture_output=True).returncode == 0:
            mounted.append(ro)
        else:
            ro.chmod(0o555)
        (root / "junk.bin").write_bytes(os.urandom(4096))
        (root / "empty.toml").write_text("")
        (root / "bad.toml").write_text("[experiment\nname = 1\n")
        (root / "unknown.toml").write_text('[experiment]\nnmae = "x"\n')
        (root / "notes.txt").write_text("hello\n")
        (root / "empty.h5").write_bytes(b"")

        # ---------------------------------------------------------------------------------------------- convert
        cases = [
            ("convert: unknown kind", ["convert", "mnist-ish", "--out", root / "c1"]),
            ("convert: missing source", ["convert", "fashion-mnist", "--src", root / "nope", "--out", root / "c2"]),
            ("convert: source is a file", ["convert", "idx", "--src", root / "notes.txt", "--out", root / "c3"]),
            ("convert: --out is a file", ["convert", "fashion-mnist", "--out", root / "notes.txt", "--limit", "10"]),
            ("convert: --out read-only", ["convert", "fashion-mnist", "--out", ro / "c", "--limit", "10"]),
            ("convert: npz without keys", ["convert", "npz", "--src", root / "keys.npz", "--out", root / "c4"]),
            ("convert: cifar10 junk pickle", ["convert", "cifar10", "--src", root / "cifar", "--out", root / "c5"]),
            ("convert: --verify a non-dataset", ["convert", "--verify", root]),
            ("convert: --limit 0", ["convert", "fashion-mnist", "--out", root / "c6", "--limit", "0"]),
            ("convert: truncated idx", ["convert", "idx", "--src", root / "idx-cut", "--out", root / "c7"]),
        ]
        import numpy as np

        np.savez(root / "keys.npz", a=np.zeros(3))
        (root / "cifar").mkdir(exist_ok=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            (root / "cifar" / name).write_bytes(os.urandom(100))
        cut = root / "idx-cut"
        cut.mkdir(exist_ok=True)
        for name in os.listdir(FMNIST):
            raw = gzip.decompress(Path(FMNIST, name).read_bytes())
            write_idx(cut / name, raw[: len(raw) // 2] if "train-images" in name else raw)
        for name, argv in cases:
            if want(name):
                out = argv[argv.index("--out") + 1] if "--out" in argv else None
                made = out is not None and out.parent == root and out.name.startswith("c")
                # a failed conversion leaves no output directory behind
                p.case(name, *argv, check=lambda c, o, e, out=out, made=made: not (made and out.exists()))

        # ---------------------------------------------------------------------------------------------- sample
        sample = ["sample", "--model", "resnet20", "--resolution", "32", "--space", "std-0.05", "--c-flops", "0.5"]
        for name, argv, expect in [
            ("sample: -n 0", [*sample, "-n", "0", "--out", root / "s.h5"], 2),
            ("sample: --c-flops 0", [*sample[:-1], "0", "-n", "5", "--out", root / "s.h5"], 2),
            ("sample: unknown model", ["sample", "--model", "resnet21", "--resolution", "32", "--space", "std-0.05",
                                       "--c-flops", "0.5", "--out", root / "s.h5"], 2),
            ("sample: --out is a directory", [*sample, "-n", "5", "--out", root], 2),
            ("sample: --resolution 0", ["sample", "--model", "resnet20", "--resolution", "0", "--space", "std-0.05",
                                        "--c-flops", "0.5", "--out", root / "s.h5"], 2),
            ("sample: --space bogus", [*sample[:6], "bogus", "--c-flops", "0.5", "--out", root / "s.h5"], 2),
            ("sample: --out read-only", [*sample, "-n", "5", "--out", ro / "s.h5"], 2),
            ("sample: writes", [*sample, "-n", "5", "--out", root / "s.h5"], 0),
            ("sample: exists, no --force", [*sample, "-n", "5", "--out", root / "s.h5"], 2),
            ("sample: mcb band out of reach", ["sample", "--model", "resnet20", "--resolution", "32", "--space",
                                               "mcb-5-6", "--c-flops", "0.5", "--out", root / "s2.h5"], 2),
            ("sample: delta 0", [*sample, "--delta", "0", "--out", root / "s3.h5"], 2),
        ]:
            if want(name):
                p.case(name, *argv, expect=expect)

        # ---------------------------------------------------------------------------------------------- run
        exp = ["--set", f"dataset.dir={data}"]
        for name, argv in [
            ("run: missing experiment file", ["run", root / "nope.toml"]),
            ("run: empty experiment file", ["run", root / "empty.toml"]),
            ("run: TOML syntax error", ["run", root / "bad.toml"]),
            ("run: unknown key", ["run", root / "unknown.toml"]),
            ("run: --set without =", ["run", "demo", "--set", "retrain.epochs"]),
            ("run: --set unknown key", ["run", "demo", "--set", "retrain.epoch=3"]),
            ("run: --devices 7 (no such GPU)", ["run", "demo", "--devices", "7", *exp, "--out", root / "r0"]),
            ("run: dataset dir missing", ["run", "demo", "--set", f"dataset.dir={root / 'nodata'}",
                                          "--out", root / "r1"]),
            ("run: experiment is junk bytes", ["run", root / "junk.bin"]),
            ("run: retrain.epochs = 0", ["run", "demo", *exp, "--set", "retrain.epochs=0"]),
            ("run: c_flops out of reach", ["run", "demo", *exp, "--set", "spaces.c_flops=0.0001",
                                           "--out", root / "r2"]),
            ("run: checkpoint of another model", ["run", "demo", *exp, "--set",
                                                  f"model.checkpoint={root / 'm18.pt'}", "--out", root / "r3"]),
            ("run: --out read-only", ["run", "demo", *exp, "--out", ro / "run"]),
            ("run: absurd resolution", ["run", "demo", *exp, "--set", "model.resolution=100000",
                                        "--out", root / "r4"]),
        ]:
            if name.startswith("run: checkpoint"):
                subprocess.run([sys.executable, "-c", "import torch, torchvision, sys; torch.save("
                                "torchvision.models.resnet18(num_classes=10).state_dict(), sys.argv[1])",
                                str(root / "m18.pt")], check=True)
            if want(name):
                p.case(name, *argv)
        # a dataset whose meta.json is broken, one whose .beton is gone
        broken = root / "fm-broken"
        if want("run: dataset"):
            shutil.copytree(data, broken, dirs_exist_ok=True)
            (broken / "meta.json").write_text("{not json")
            p.case("run: dataset meta.json broken", "run", "demo", "--set", f"dataset.dir={broken}",
                   "--out", root / "r5")
            shutil.copytree(data, root / "fm-nobeton", dirs_exist_ok=True)
            (root / "fm-nobeton" / "val.beton").unlink()
            p.case("run: dataset .beton missing", "run", "demo", "--set", f"dataset.dir={root / 'fm-nobeton'}",
                   "--out", root / "r6")

        # a real tiny run, then faults around it
        run_dir = root / "run"
        if want("run:") or want("status") or want("report") or want("export"):
            p.case("run: tiny demo", "run", "demo", *exp, *TINY, "--out", run_dir, expect=0, timeout=300)
            p.case("run: same command again (nothing left)", "run", "demo", *exp, *TINY, "--out", run_dir,
                   expect=0, timeout=120)
            p.case("run: resume with another experiment", "run", "demo", *exp, *TINY, "--set", "retrain.lr=0.3",
                   "--out", run_dir)

        def signal_case(name, sig, trigger, out):
            proc = subprocess.Popen(nps("run", "demo", *exp, *TINY, "--out", out), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=p.env, cwd=root, start_new_session=True)
            started = time.monotonic()
            while time.monotonic() - started < 120 and proc.poll() is None and not trigger(out):
                time.sleep(0.05)
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
            try:
                out_text, err_text = proc.communicate(timeout=90)
                hung = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out_text, err_text = proc.communicate()
                hung = True
            code = proc.returncode
            expect = -9 if sig == signal.SIGKILL else 130
            p.record(name, code, out_text, err_text, time.monotonic() - started, hung, expect)
            code2, o2, e2, s2, h2 = p.run("run", "demo", *exp, *TINY, "--out", out, timeout=300)
            p.record(name + " → resumed", code2, o2, e2, s2, h2, 0,
                     ok="13 done" in o2 or "done, 0 failed" in o2)

        if want("signal"):
            signal_case("signal: SIGINT while training the base network", signal.SIGINT,
                        lambda out: (out / "log.jsonl").exists() and "\"base\"" in (out / "log.jsonl").read_text(),
                        root / "sig1")
            signal_case("signal: SIGTERM while retraining", signal.SIGTERM,
                        lambda out: (out / "base.pt").exists(), root / "sig2")
            signal_case("signal: SIGKILL while sampling", signal.SIGKILL,
                        lambda out: (out / "results.h5").exists(), root / "sig3")

        if want("concurrent"):
            out = root / "conc"
            first = subprocess.Popen(nps("run", "demo", *exp, *TINY, "--out", out), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=p.env, cwd=root)
            while not (out / "results.h5.lock").exists() and first.poll() is None:
                time.sleep(0.05)
            p.case("concurrent: a second run on the same --out", "run", "demo", *exp, *TINY, "--out", out)
            p.case("concurrent: sample --force onto the live results.h5", *sample, "-n", "5", "--force", "--out",
                   out / "results.h5")
            p.case("concurrent: status while it runs", "status", out, expect=0)
            first.wait(300)
            p.case("concurrent: the first run finished every row", "status", out, expect=0,
                   check=lambda c, o, e: "complete" in o)

        # ---------------------------------------------------------------------------------------------- status
        results = run_dir / "results.h5"
        trunc = root / "one-byte-short.h5"
        if results.exists():
            trunc.write_bytes(results.read_bytes()[:-1])
        for name, argv, expect in [
            ("status: missing file", ["status", root / "nope.h5"], 2),
            ("status: directory without results.h5", ["status", root / "cifar"], 2),
            ("status: empty file", ["status", root / "empty.h5"], 2),
            ("status: a text file", ["status", root / "notes.txt"], 2),
            ("status: one byte short", ["status", trunc], 2),
            ("status: a file from nps sample", ["status", root / "s.h5"], 0),
            ("status: the run directory", ["status", run_dir], 0),
        ]:
            if want(name):
                p.case(name, *argv, expect=expect)

        # ---------------------------------------------------------------------------------------------- report
        (root / "full").mkdir(exist_ok=True)
        (root / "full" / "x").write_text("x")
        for name, argv, expect in [
            ("report: --out not empty, no --force", ["report", results, "--out", root / "full"], 2),
            ("report: --k 0", ["report", results, "--out", root / "rep0", "--k", "0"], 2),
            ("report: --edf-points 1", ["report", results, "--out", root / "rep1", "--edf-points", "1"], 2),
            ("report: no finished rows (nps sample)", ["report", root / "s.h5", "--out", root / "rep2"], 0),
            ("report: --out read-only", ["report", results, "--out", ro / "rep"], 2),
            ("report: one byte short", ["report", trunc, "--out", root / "rep3"], 2),
        ]:
            if want(name):
                p.case(name, *argv, expect=expect)

        # ---------------------------------------------------------------------------------------------- export
        weights = sorted((run_dir / "weights").rglob("*.pt")) if (run_dir / "weights").exists() else []
        for name, argv, expect in [
            ("export: unknown space", ["export", results, "--space", "std-0.7", "--best", "--out", root / "e.pt"], 2),
            ("export: --row 999", ["export", results, "--space", "std-0.05", "--row", "999", "--out",
                                   root / "e.pt"], 2),
            ("export: no --out", ["export", results, "--space", "std-0.05", "--best"], 2),
            ("export: --verify a random file", ["export", "--verify", root / "junk.bin"], 2),
            ("export: writes and verifies", ["export", results, "--space", "std-0.05", "--best", "--out",
                                             root / "e.pt", "--verify"], 0),
            ("export: --out exists, no --force", ["export", results, "--space", "std-0.05", "--best", "--out",
                                                  root / "e.pt"], 2),
            ("export: --verify against another dataset", ["export", "--verify", root / "e.pt", "--data",
                                                          root / "fm-other"], 2),
        ]:
            if name.endswith("another dataset"):
                subprocess.run(nps("convert", "fashion-mnist", "--out", root / "fm-other", "--limit", "300"),
                               capture_output=True, env=p.env)
            if want(name):
                p.case(name, *argv, expect=expect)
        if weights and want("export: damaged weights"):
            victim = [w for w in weights if "std-0.05" in str(w)][0]
            saved = victim.read_bytes()
            victim.write_bytes(os.urandom(300))
            p.case("export: damaged weights file", "export", results, "--space", "std-0.05", "--row",
                   victim.stem, "--out", root / "e2.pt")
            victim.write_bytes(saved)
        if want("presets"):
            p.case("presets: lists every preset", "presets", expect=0, check=lambda c, o, e: "demo-mobilenet" in o)
    finally:
        for place in mounted:
            subprocess.run(["umount", str(place)], check=False)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    held = sum(r["holds"] for r in p.results)
    print(json.dumps({"summary": True, "cases": len(p.results), "hold": held,
                      "hung": sum(r["hung"] for r in p.results), "tracebacks": sum(r["traceback"] for r in p.results)}))
    return 0 if held == len(p.results) else 1


if __name__ == "__main__":
    sys.exit(main())
