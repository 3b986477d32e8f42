"""The public modules type-check with mypy (the package ships py.typed).

The modules and options are in pyproject.toml's [tool.mypy] section, so this runs
plain `mypy` from the repository root, as a developer would.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed; python -m pip install -r requirements-dev.txt")
def test_mypy_passes():
    r = subprocess.run(
        [sys.executable, "-m", "mypy"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert r.returncode == 0, f"mypy found errors:\n{r.stdout}\n{r.stderr}"


def test_py_typed_is_shipped():
    assert os.path.exists(os.path.join(ROOT, "src", "pyfunctorch", "py.typed"))
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert '"py.typed"' in pyproject  # listed in [tool.setuptools.package-data]
