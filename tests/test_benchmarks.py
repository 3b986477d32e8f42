"""The benchmark suite's correctness checks (tiny sizes, no timing): every
implementation of every workload (pyfunctorch, torch.func, per-example loop,
hand-batched) must agree with the reference. Timings are never run in tests.

`benchmarks/run.py --check` runs once (per xdist worker); each workload is its own
test so that a failure names the workload."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "MEM"]


@pytest.fixture(scope="session")
def check_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--check", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )
    if not out.exists():
        pytest.fail(f"run.py --check crashed (exit {r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-5000:]}")
    return json.loads(out.read_text()), r


@pytest.mark.parametrize("workload", WORKLOADS)
def test_benchmark_checks(check_run, workload):
    summary, r = check_run
    rows = [row for row in summary["rows"] if row["workload"] == workload]
    assert rows, f"no rows for {workload}\nstdout:\n{r.stdout}"
    bad = [f"{row['case']} / {row['impl']}: {row['status']}" for row in rows if row["status"] != "ok"]
    assert not bad, "\n".join(bad)


def test_benchmark_check_exit_status(check_run):
    summary, r = check_run
    assert (r.returncode == 0) == (not summary["failed"]), r.stdout
