"""The examples run end to end (small sizes) and report agreement."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


def test_per_sample_grads_example():
    r = _run("examples/per_sample_grads.py", "--batch", "8", "--repeats", "1")
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "results agree" in r.stdout
