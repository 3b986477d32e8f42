"""The functorch tutorial workloads, checked against torch.func and plain torch.autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

import pyfunctorch as pf

from conftest import assert_close

DT = torch.float64


class MLP(nn.Module):
    def __init__(self, d_in=6, d_hidden=8, n_classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, n_classes)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))  # (N, 3, 6, 6)
        x = F.max_pool2d(x, 2)  # (N, 3, 3, 3)
        x = F.relu(self.conv2(F.pad(x, (1, 0, 1, 0))))  # (N, 4, 2, 2)
        x = torch.flatten(x, 1)
        return F.log_softmax(self.fc(x), dim=1)


def _per_sample_grads(M, model, data, targets, loss_fn):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def compute_loss(params, buffers, sample, target):
        batch = sample.unsqueeze(0)
        targets = target.unsqueeze(0)
        predictions = M.functional_call(model, (params, buffers), (batch,))
        return loss_fn(predictions, targets)

    return M.vmap(M.grad(compute_loss), in_dims=(None, None, 0, 0))(params, buffers, data, targets)


def _per_sample_grads_autograd(model, data, targets, loss_fn):
    out = {k: [] for k, _ in model.named_parameters()}
    for x, t in zip(data, targets):
        model.zero_grad()
        loss_fn(model(x.unsqueeze(0)), t.unsqueeze(0)).backward()
        for k, p in model.named_parameters():
            out[k].append(p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# per-sample gradients
# ----------------------------------------------------------------------------------------


def test_per_sample_grads_mlp(device):
    model = MLP().to(device=device, dtype=DT)
    data = torch.randn(8, 6, dtype=DT, device=device)
    targets = torch.randint(3, (8,), device=device)
    got = _per_sample_grads(pf, model, data, targets, F.cross_entropy)
    assert_close(got, _per_sample_grads(tf, model, data, targets, F.cross_entropy))
    assert_close(got, _per_sample_grads_autograd(model, data, targets, F.cross_entropy))
    # the gradient of the mean loss is the mean of the per-sample gradients
    model.zero_grad()
    F.cross_entropy(model(data), targets).backward()
    assert_close({k: v.mean(0) for k, v in got.items()}, {k: p.grad for k, p in model.named_parameters()})


def test_per_sample_grads_small_cnn(device):
    model = SmallCNN().to(device=device, dtype=DT)
    data = torch.randn(4, 1, 8, 8, dtype=DT, device=device)
    targets = torch.randint(3, (4,), device=device)
    got = _per_sample_grads(pf, model, data, targets, F.nll_loss)
    assert_close(got, _per_sample_grads(tf, model, data, targets, F.nll_loss))
    assert_close(got, _per_sample_grads_autograd(model, data, targets, F.nll_loss))


def test_per_sample_grads_with_buffers_batchnorm_eval():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    model.train()
    model(torch.randn(16, 5, dtype=DT))  # populate running stats
    model.eval()
    data, targets = torch.randn(6, 5, dtype=DT), torch.randint(2, (6,))
    got = _per_sample_grads(pf, model, data, targets, F.cross_entropy)
    assert_close(got, _per_sample_grads(tf, model, data, targets, F.cross_entropy))


# ----------------------------------------------------------------------------------------
# model ensembling
# ----------------------------------------------------------------------------------------


def _ensemble(M, models, minibatches, in_dims):
    params, buffers = M.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def fmodel(params, buffers, x):
        return M.functional_call(base, (params, buffers), (x,))

    return M.vmap(fmodel, in_dims=in_dims)(params, buffers, minibatches)


def test_ensembling_same_minibatch(device):
    models = [MLP().to(device=device, dtype=DT) for _ in range(4)]
    x = torch.randn(5, 6, dtype=DT, device=device)
    got = _ensemble(pf, models, x, (0, 0, None))
    assert got.shape == (4, 5, 3)
    assert_close(got, torch.stack([m(x) for m in models]).detach())
    assert_close(got, _ensemble(tf, models, x, (0, 0, None)).detach())


def test_ensembling_different_minibatches(device):
    models = [MLP().to(device=device, dtype=DT) for _ in range(3)]
    xs = torch.randn(3, 5, 6, dtype=DT, device=device)
    got = _ensemble(pf, models, xs, (0, 0, 0))
    assert_close(got, torch.stack([m(x) for m, x in zip(models, xs)]).detach())
    assert_close(got, _ensemble(tf, models, xs, (0, 0, 0)).detach())


def test_ensembling_cnn(device):
    models = [SmallCNN().to(device=device, dtype=DT) for _ in range(2)]
    x = torch.randn(3, 1, 8, 8, dtype=DT, device=device)
    got = _ensemble(pf, models, x, (0, 0, None))
    assert_close(got, torch.stack([m(x) for m in models]).detach())


def test_ensemble_gradient_wrt_stacked_params(device):
    models = [MLP().to(device=device, dtype=DT) for _ in range(3)]
    params, buffers = pf.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x, t = torch.randn(5, 6, dtype=DT, device=device), torch.randint(3, (5,), device=device)

    def loss(p, b):
        return F.cross_entropy(pf.functional_call(base, (p, b), (x,)), t)

    got = pf.vmap(pf.grad(loss))({k: v.detach() for k, v in params.items()}, buffers)
    for i, m in enumerate(models):
        m.zero_grad()
        F.cross_entropy(m(x), t).backward()
        for k, p in m.named_parameters():
            assert_close(got[k][i], p.grad)


# ----------------------------------------------------------------------------------------
# Jacobians, Hessians, HVPs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(3, 7), (7, 3), (4, 4)], ids=["n<m", "n>m", "n=m"])
def test_jacobians_both_ways(device, n, m):
    W = torch.randn(m, n, dtype=DT, device=device)
    b = torch.randn(m, dtype=DT, device=device)
    x = torch.randn(n, dtype=DT, device=device)

    def predict(weight, bias, x):
        return torch.tanh(F.linear(x, weight, bias))

    exact = torch.diag(1 - predict(W, b, x) ** 2) @ W
    for which in ("jacrev", "jacfwd"):
        got = getattr(pf, which)(predict, argnums=2)(W, b, x)
        assert got.shape == (m, n)
        assert_close(got, exact)
        assert_close(got, getattr(tf, which)(predict, argnums=2)(W, b, x))
        # wrt weight and bias at once
        got_wb = getattr(pf, which)(predict, argnums=(0, 1))(W, b, x)
        assert_close(got_wb, tf.jacrev(predict, argnums=(0, 1))(W, b, x))
    # torch.autograd.functional oracle
    assert_close(pf.jacrev(predict, argnums=2)(W, b, x), torch.autograd.functional.jacobian(lambda x: predict(W, b, x), x))


def test_batched_jacobians(device):
    W, b = torch.randn(5, 3, dtype=DT, device=device), torch.randn(5, dtype=DT, device=device)
    xb = torch.randn(4, 3, dtype=DT, device=device)
    predict = lambda x: torch.sin(F.linear(x, W, b))  # noqa: E731
    for which in ("jacrev", "jacfwd"):
        got = pf.vmap(getattr(pf, which)(predict))(xb)
        assert_close(got, torch.stack([torch.autograd.functional.jacobian(predict, x) for x in xb]))
    # jacobian of the batched function, summed over the batch, is the batched jacobian
    assert_close(pf.jacrev(lambda x: predict(x).sum(0))(xb).movedim(1, 0), pf.vmap(pf.jacrev(predict))(xb))


def test_hessian_of_small_net_loss_wrt_inputs():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    x = torch.randn(4, dtype=DT)

    def loss(x):
        return (net(x) ** 2).sum() + torch.sin(x).sum()

    got = pf.hessian(loss)(x)
    assert_close(got.detach(), tf.hessian(loss)(x).detach())
    assert_close(got.detach(), torch.autograd.functional.hessian(loss, x))
    assert_close(got.detach(), got.detach().T)  # symmetric


def test_hessian_variants_agree(device):
    x = torch.randn(5, dtype=DT, device=device)
    f = lambda x: (x.sin() * x.cos().exp()).sum()  # noqa: E731
    want = torch.autograd.functional.hessian(f, x)
    assert_close(pf.hessian(f)(x), want)
    assert_close(pf.jacfwd(pf.jacfwd(f))(x), want)
    assert_close(pf.jacrev(pf.jacrev(f))(x), want)
    assert_close(pf.jacfwd(pf.jacrev(f))(x), want)


def _hvp(M, f, primals, tangents):
    return M.jvp(M.grad(f), primals, tangents)[1]


def test_batched_hvp(device):
    W = torch.randn(6, 6, dtype=DT, device=device)

    def f(x):
        return torch.tanh(W @ x).pow(2).sum() + x.exp().sum()

    x = torch.randn(6, dtype=DT, device=device)
    vs = torch.randn(5, 6, dtype=DT, device=device)
    got = pf.vmap(lambda v: _hvp(pf, f, (x,), (v,)))(vs)
    assert_close(got, tf.vmap(lambda v: _hvp(tf, f, (x,), (v,)))(vs))
    H = torch.autograd.functional.hessian(f, x)
    assert_close(got, vs @ H.T)
    # reverse-over-reverse HVP agrees
    rr = pf.vmap(lambda v: pf.grad(lambda x: torch.dot(pf.grad(f)(x), v))(x))(vs)
    assert_close(rr, vs @ H.T)


def test_batched_hvp_batched_primals(device):
    def f(x):
        return (x.sin() * x.roll(1)).sum()

    xs = torch.randn(4, 5, dtype=DT, device=device)
    vs = torch.randn(4, 5, dtype=DT, device=device)
    got = pf.vmap(lambda x, v: _hvp(pf, f, (x,), (v,)))(xs, vs)
    assert_close(got, tf.vmap(lambda x, v: _hvp(tf, f, (x,), (v,)))(xs, vs))
    want = torch.stack([torch.autograd.functional.hvp(f, x, v)[1] for x, v in zip(xs, vs)])
    assert_close(got, want)


# ----------------------------------------------------------------------------------------
# neural tangent kernel
# ----------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _ntk(M, net, params, x1, x2, compute="full"):
    def fnet_single(params, x):
        return M.functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = M.vmap(M.jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = M.vmap(M.jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    einsum_expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[compute]
    return torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)


def _ntk_autograd(net, x1, x2):
    def jac(x):
        rows = []
        for a in range(2):
            net.zero_grad()
            net(x.unsqueeze(0))[0, a].backward()
            rows.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        return torch.stack(rows)  # (a, f)

    J1 = torch.stack([jac(x) for x in x1])
    J2 = torch.stack([jac(x) for x in x2])
    return torch.einsum("Naf,Mbf->NMab", J1, J2)


@pytest.mark.parametrize("compute", ["full", "trace", "diagonal"])
def test_ntk(device, compute):
    net = TinyNet().to(device=device, dtype=DT)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x1, x2 = torch.randn(4, 3, dtype=DT, device=device), torch.randn(3, 3, dtype=DT, device=device)
    got = _ntk(pf, net, params, x1, x2, compute)
    assert_close(got, _ntk(tf, net, params, x1, x2, compute))
    full = _ntk_autograd(net, x1, x2)
    want = {"full": full, "trace": torch.einsum("NMaa->NM", full), "diagonal": torch.einsum("NMaa->NMa", full)}[compute]
    assert_close(got, want)


def test_ntk_vector_products(device):
    """The implicit NTK: J1 J2^T v via vjp then jvp, batched with vmap."""
    net = TinyNet().to(device=device, dtype=DT)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x1, x2 = torch.randn(1, 3, dtype=DT, device=device), torch.randn(1, 3, dtype=DT, device=device)

    def run(M):
        def f1(p):
            return M.functional_call(net, p, (x1,))

        def f2(p):
            return M.functional_call(net, p, (x2,))

        def get_ntk_slice(vec):
            (vjps,) = M.vjp(f2, params)[1](vec)
            return M.jvp(f1, (params,), (vjps,))[1]

        basis = torch.eye(2, dtype=DT, device=device).view(2, 1, 2)
        return M.vmap(get_ntk_slice)(basis)

    assert_close(run(pf), run(tf))
