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


# -- the CUDA suite (benchmarks/run.py --device cuda, benchmarks/cuda_suite.py) ----------------


def _run_py(*argv, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_device_cuda_without_cuda_exits_with_a_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    r = _run_py("--device", "cuda", "--check")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torch.cuda.is_available() is False" in r.stderr and "--device cuda" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", ["tpu", "meta", "cuda:x"])
def test_device_option_rejects_other_devices(bad):
    r = _run_py("--device", bad, "--check")
    assert r.returncode == 2 and "--device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cuda_suite_checks_on_cpu(tmp_path):
    """The CUDA suite's workloads are device-parametrized: at tiny sizes on the CPU every
    implementation must agree with the reference (hand-batched, else torch.func), and the
    memory rows with the analytic Jacobian/Hessian. (On a GPU machine run.py --device cuda runs
    this same code with device='cuda'.)"""
    out = tmp_path / "cuda_check.json"
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import cuda_suite as C; "
            f"st, _ = C.run({{'W1','W2','W3','W4','W5','MEM'}}, device='cpu', check=True, json_path={str(out)!r}); "
            "sys.exit(st)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.exists(), r.stdout + r.stderr[-3000:]
    summary = json.loads(out.read_text())
    bad = [f"{row['case']} / {row['impl']}: {row['status']}" for row in summary["rows"] if row["status"] != "ok"]
    assert not bad and r.returncode == 0, "\n".join(bad) + r.stdout
    assert {row["workload"] for row in summary["rows"]} == {"W1", "W2", "W3", "W4", "W5", "MEM"}


def test_cuda_suite_timing_path_on_cpu(tmp_path):
    """The synchronized timing and the markdown writer run end to end (CPU, one tiny case)."""
    md = tmp_path / "cuda.md"
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import cuda_suite as C; "
            "C.SIZES['check']['pw_large'] = (4, 16); "
            "cases = [lambda: C.w5_pointwise('cpu', (4, 16))]; C.build_cases = lambda *a: cases; "
            f"st, s = C.run({{'W5'}}, device='cpu', quick=True, out={str(md)!r}); sys.exit(st)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    text = md.read_text()
    assert "# Benchmarks on CUDA" in text and "| W5 20 pointwise ops under vmap | x 4x16 | pyfunctorch |" in text
