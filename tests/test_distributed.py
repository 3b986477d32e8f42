"""DP-SGD with per-sample clipping inside DistributedDataParallel, and an ensemble sharded
over ranks (examples/distributed.py), in 2 processes over gloo on 127.0.0.1.

The test spawns the processes itself (torch.multiprocessing, a free port, a deadline) and
compares with independent oracles computed here in one process: DP-SGD by a per-example
loop of torch.autograd.grad over the whole global batch, and each model of the ensemble
run on its own.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import distributed as example  # noqa: E402  (examples/distributed.py; the spawned ranks import it too)


def _dp_sgd_loop(cfg):
    """DP-SGD in one process over each whole global batch, per-sample gradients by a loop."""
    x, y = example.make_data(cfg["n"])
    model = example.make_model(cfg["seed"], cfg["hidden"])
    params = list(model.parameters())
    B, C = cfg["batch"], cfg["max_norm"]
    for step in range(cfg["steps"]):
        start = (step * B) % x.shape[0]
        total = [torch.zeros_like(p) for p in params]
        for i in range(start, start + B):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
            norm = torch.stack([t.norm() for t in g]).norm()
            c = (C / (norm + 1e-6)).clamp(max=1.0)
            total = [a + c * t for a, t in zip(total, g)]
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + step)
        with torch.no_grad():
            for p, t in zip(params, total):
                p -= cfg["lr"] * (t / B + cfg["noise"] * C / B * torch.randn(p.shape, generator=gen))
    return dict(model.named_parameters())


def test_ddp_dp_sgd_and_sharded_ensemble_equal_one_process():
    cfg = example.config(small=True)
    got = example.run_distributed(2, cfg, timeout=120)
    expected = _dp_sgd_loop(cfg)
    for k, v in expected.items():
        torch.testing.assert_close(got["params"][k], v.detach(), rtol=1e-5, atol=1e-6)
    # the update moved the parameters (the comparison is not of two untouched initializations)
    init = dict(example.make_model(cfg["seed"], cfg["hidden"]).named_parameters())
    assert not torch.allclose(got["params"]["0.weight"], init["0.weight"])
    x, _ = example.make_data(cfg["n"])
    models = [example.make_model(100 + i, cfg["hidden"]) for i in range(cfg["models"])]
    with torch.no_grad():
        torch.testing.assert_close(got["ensemble"], torch.stack([m(x[:8]) for m in models]))
