"""Every example in examples/ runs to the end with --small and reports that its checks passed.

Each runs in its own interpreter (as a user runs it); one test per example, so that
pytest-xdist spreads them over the workers.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLES = ["per_sample_grads.py", "dp_sgd.py", "ensembling.py", "newton.py", "ntk.py", "maml.py", "control_flow.py",
            "distributed.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_small(script):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--small"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert r.returncode == 0, f"{script} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert "all checks passed" in r.stdout, r.stdout
    assert "check:" in r.stdout  # it printed what it checked
    if script == "per_sample_grads.py":  # the README's demo
        assert "results agree" in r.stdout


def test_every_example_is_smoke_tested():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
    assert scripts == set(EXAMPLES), sorted(scripts ^ set(EXAMPLES))
