"""Opacus with pyfunctorch's per-sample gradients (pyfunctorch.contrib.opacus).

Oracles: Opacus' own hooks mode (per-sample gradients from its layer-specific formulas)
where it has hooks, and a per-example loop of torch.autograd.grad where it has none.
Opacus' torch.func functions are replaced by ones that raise, so the tests also prove that
the functorch path ran through pyfunctorch.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
import opacus.grad_sample.functorch as opacus_ft  # noqa: E402

from pyfunctorch.contrib.opacus import use_pyfunctorch  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


@pytest.fixture
def no_torch_func(monkeypatch):
    """Opacus' torch.func vmap/grad raise: only pyfunctorch may compute the functorch path."""
    def refuse(*a, **k):
        raise AssertionError("Opacus' torch.func path ran instead of pyfunctorch")
    monkeypatch.setattr(opacus_ft, "vmap", refuse)
    monkeypatch.setattr(opacus_ft, "grad", refuse)


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


class Scaled(nn.Module):
    """A layer Opacus has no hook for: its parameters enter nonlinearly."""

    def __init__(self, d):
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(d) * 0.1)
        self.mix = nn.Parameter(torch.randn(d, d) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.mix) * self.log_scale.exp() + x * self.log_scale


def _custom():
    return nn.Sequential(nn.Linear(6, 5), Scaled(5), nn.Linear(5, 3))


def _data(kind, n=7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 6, 6, generator=g) if kind == "cnn" else torch.randn(n, 6, generator=g)
    return x.double(), torch.randint(0, 3, (n,), generator=g)


def _grad_samples(model, x, y, **gsm_kwargs):
    gsm = GradSampleModule(model, loss_reduction="sum", **gsm_kwargs)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    out = {n: p.grad_sample.clone() for n, p in gsm._module.named_parameters()}
    gsm._close()
    return out


def _loop(model, x, y):
    names, params = zip(*model.named_parameters())
    rows = [torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
            for i in range(x.shape[0])]
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_functorch_mode_matches_opacus_hooks(kind, no_torch_func):
    torch.manual_seed(0)
    model = (_mlp() if kind == "mlp" else _cnn()).double()
    x, y = _data(kind)
    hooks = _grad_samples(copy.deepcopy(model), x, y)
    with use_pyfunctorch():
        ours = _grad_samples(copy.deepcopy(model), x, y, force_functorch=True)
    assert hooks.keys() == ours.keys()
    for k in hooks:
        torch.testing.assert_close(ours[k], hooks[k])


def test_layer_without_hook_uses_pyfunctorch(no_torch_func):
    torch.manual_seed(0)
    model = _custom().double()
    x, y = _data("mlp")
    with use_pyfunctorch():
        ours = _grad_samples(copy.deepcopy(model), x, y)  # hooks for Linear, pyfunctorch for Scaled
    expected = _loop(model, x, y)
    for k in expected:
        torch.testing.assert_close(ours[k], expected[k])


def test_use_pyfunctorch_restores_opacus_and_refuses_stale_layers():
    import opacus.grad_sample.grad_sample_module as gsm_mod

    original = gsm_mod.ft_compute_per_sample_gradient
    with use_pyfunctorch():
        assert gsm_mod.ft_compute_per_sample_gradient is not original
        assert opacus_ft.prepare_layer is not original
    assert gsm_mod.ft_compute_per_sample_gradient is original
    # a layer prepared by Opacus' torch.func path before the switch: a clear error, not a silent mix
    model = _custom().double()
    gsm = GradSampleModule(model)
    x, y = _data("mlp")
    with use_pyfunctorch(), pytest.raises(RuntimeError, match="before use_pyfunctorch"):
        F.cross_entropy(gsm(x), y).backward()
    gsm._close()


def _train(model, mode, steps=3):
    x, y = _data("mlp", n=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
                                             max_grad_norm=0.05, grad_sample_mode=mode, poisson_sampling=False)
    losses = []
    for step, (xb, yb) in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model._module.named_parameters()}


def test_privacy_engine_functorch_mode_matches_hooks_mode(no_torch_func):
    torch.manual_seed(0)
    model = _mlp().double()
    losses_h, params_h = _train(copy.deepcopy(model), "hooks")
    with use_pyfunctorch():
        losses_p, params_p = _train(copy.deepcopy(model), "functorch")
    assert losses_p == pytest.approx(losses_h, rel=1e-10)
    for k in params_h:
        torch.testing.assert_close(params_p[k], params_h[k])
    # clipping was active (max_grad_norm is small): the update differs from plain SGD
    plain = copy.deepcopy(model)
    x, y = _data("mlp", n=24)
    F.cross_entropy(plain(x[:8]), y[:8]).backward()
    assert not torch.allclose(next(iter(params_h.values())),
                              next(plain.parameters()).detach() - 0.5 * next(plain.parameters()).grad)
