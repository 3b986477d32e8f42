"""The GPU scripts run on CPU too: scripts/gpu_models.py with --small (per-sample gradients of
common models against torch.func) and scripts/gpu_check.sh, which must skip its CUDA parts
cleanly where there is no GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_models():
    spec = importlib.util.spec_from_file_location("gpu_models", os.path.join(ROOT, "scripts", "gpu_models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_models_small_on_cpu_passes(capsys):
    assert _gpu_models().main(["--device", "cpu", "--small"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS ") == 5 and "all passed" in out, out


def test_gpu_models_detects_wrong_gradients(capsys, monkeypatch):
    # the check can fail: per-sample grads scaled by 1.01 must be reported
    import pyfunctorch as pf

    mod = _gpu_models()
    real = pf.grad

    def off_grad(f, **kw):
        g = real(f, **kw)

        def h(*a):
            grads, aux = g(*a)
            return {k: v * 1.01 for k, v in grads.items()}, aux

        return h

    monkeypatch.setattr(mod.pf, "grad", off_grad)
    assert mod.main(["--device", "cpu", "--small", "--only", "ResNet-BN eval"]) == 1
    assert "FAIL ResNet-BN eval" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_script_without_cuda_runs_the_cpu_smoke_parts(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", GPU_CHECK_SMOKE_ONLY="1",
               GPU_MODELS_ONLY="ResNet-BN eval")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                       timeout=240, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "CUDA is not available" in r.stdout
    summary = (tmp_path / "summary.txt").read_text()
    assert "gpu_models (cpu, small): ok" in summary, summary
