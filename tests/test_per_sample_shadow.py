"""Per-sample gradients on the physical batch (reverse._Shadow under one vmap level): a grad level
directly inside the outermost vmap records its graph on the vmap level's physical values, an
unbatched differentiated input expanded along the batch, and torch's C++ autograd differentiates
that graph. Results are compared with torch.func (or, where torch.func refuses, with vmap's
definition: a loop over torch.func's grad); the mechanism tests check where the physical graph is
used and where the grad level's wrappers are differentiated instead (they fail without it).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

import pyfunctorch as pf
from pyfunctorch import _core, reverse
from pyfunctorch.batching import linalg, physical_ad

from conftest import assert_close, loop_vmap

DT = torch.float64
B = 4


def _models():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2), nn.Flatten(),
                        nn.Linear(4, 5))
    return {
        # name: (module, input of one example, whether the physical graph is used)
        "mlp": (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)), (6,), True),
        "mlp_2d_input": (nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5)), (3, 6), True),
        "mlp_no_bias": (nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 5, bias=False)), (2, 6),
                        True),
        "cnn": (cnn, (1, 7, 7), True),
        "layer_norm_attention": (_Attention(), (3, 6), True),
        "batch_norm_train": (_Norm(), (3, 6), False),
        "embedding": (_Embed(nn.Embedding(10, 5, padding_idx=2)), (3,), True),
        "embedding_scaled": (_Embed(nn.Embedding(10, 5, scale_grad_by_freq=True)), (4,), True),
        "transformer": (_Transformer(), (6,), True),
        "embedding_bag": (_Embed(nn.EmbeddingBag(10, 5, mode="sum")), (3,), True),
        "group_norm": (_GroupNorm(), (4, 6), False),
    }


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 5)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 6 ** 0.5, -1)
        return self.out((a @ self.v(h)).mean(-2))


class _Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):  # (1, 3, 6) -> batch norm over 5 channels of length 3
        return self.bn(self.fc(x).transpose(-1, -2)).sum(-1)


class _GroupNorm(nn.Module):  # (group norm's rule is not in batching/physical_ad.py)
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):  # (1, 4, 6): 4 channels in 2 groups
        return self.fc(self.gn(x)).sum(1)


class _Embed(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.fc = nn.Linear(5, 5)

    def forward(self, idx):
        return self.fc(self.emb(idx).reshape(-1, 5).sum(0))


class _Transformer(nn.Module):
    """Token embedding (with a padding row) + a transformer encoder layer (attention through
    scaled_dot_product_attention) + a linear head: the DP text-classification model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, idx):
        return self.fc(self.enc(self.emb(idx)).mean(1))


def _data(shape, name, g):
    if name.startswith("embedding") or name == "transformer":
        return torch.randint(0, 10, (B,) + shape, generator=g)
    return torch.randn((B,) + shape, generator=g, dtype=DT)


def _loss_with(fc, model):
    def loss(params, x, y):
        out = fc(model, params, (x.unsqueeze(0),)).reshape(1, -1)
        return F.cross_entropy(out, y.unsqueeze(0))

    return loss


def _autograd_grad(loss):
    """grad of ``loss`` in its first argument (a dict of tensors) with torch.autograd."""

    def g(params, *rest):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss(leaves, *rest), list(leaves.values()))
        return dict(zip(leaves, grads))

    return g


def _spy_used(monkeypatch):
    """Records, per grad call inside vmap, whether the gradient comes from the physical graph."""
    used = []
    seal = reverse._Shadow.seal

    def spy(self, *args, **kwargs):
        seal(self, *args, **kwargs)
        if self.vmap is not None:
            used.append(self.usable)

    monkeypatch.setattr(reverse._Shadow, "seal", spy)
    return used


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("batched_params", [False, True])
def test_models_match_torch_func(name, batched_params, monkeypatch, device):
    model, shape, physical = _models()[name]
    model = model.double().to(device)
    if name == "batch_norm_train":
        model.train()
    g = torch.Generator().manual_seed(1)
    x, y = _data(shape, name, g).to(device), torch.randint(0, 5, (B,), generator=g).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    if batched_params:  # (an ensemble's per-member gradients: every parameter batched)
        params = {k: v + 0.1 * torch.randn((B,) + v.shape, generator=g, dtype=DT).to(device) for k, v in params.items()}
    in_dims = (0 if batched_params else None, 0, 0)
    used = _spy_used(monkeypatch)
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = pf.vmap(pf.grad(_loss_with(pf.functional_call, ours_model)), in_dims=in_dims)(params, x, y)
        try:
            theirs = tf.vmap(tf.grad(_loss_with(tf.functional_call, theirs_model)), in_dims=in_dims)(params, x, y)
        except RuntimeError:  # (torch.func refuses batch norm's unbatched running stats): torch.autograd
            theirs_model = copy.deepcopy(model)
            theirs = loop_vmap(_autograd_grad(_loss_with(tf.functional_call, theirs_model)), in_dims=in_dims)(
                params, x, y)
    assert_close(ours, theirs)
    for (k, a), (_, b) in zip(ours_model.named_buffers(), theirs_model.named_buffers()):
        assert_close(a, b)  # (batch norm's running statistics: updated as the loop updates them)
    assert used == [physical], used


def test_parameters_that_require_grad_keep_their_graph():
    # params passed as they are (nn.Parameters): the per-sample gradients depend on them, and
    # differentiating a function of them (e.g. a meta-learning step) gives torch.func's numbers
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, 6, generator=g, dtype=DT), torch.randint(0, 5, (B,), generator=g)
    params = dict(model.named_parameters())
    ours = pf.vmap(pf.grad(_loss_with(pf.functional_call, model)), in_dims=(None, 0, 0))(params, x, y)
    theirs = tf.vmap(tf.grad(_loss_with(tf.functional_call, model)), in_dims=(None, 0, 0))(params, x, y)
    assert_close(ours, theirs)
    assert all(v.requires_grad for v in ours.values())
    ga = torch.autograd.grad(sum((v * v).sum() for v in ours.values()), list(params.values()))
    gb = torch.autograd.grad(sum((v * v).sum() for v in theirs.values()), list(params.values()))
    assert_close(ga, gb)


def test_closed_over_weight_that_requires_grad():
    W = torch.randn(5, 6, dtype=DT, requires_grad=True)
    w = torch.randn(6, dtype=DT)
    xs = torch.randn(B, 5, dtype=DT)

    def f(w, x):
        return (torch.tanh(W @ w) * x).sum()

    ours = pf.vmap(pf.grad(f), in_dims=(None, 0))(w, xs)
    theirs = tf.vmap(tf.grad(f), in_dims=(None, 0))(w, xs)
    assert_close(ours, theirs)
    assert ours.requires_grad and theirs.requires_grad
    assert_close(torch.autograd.grad(ours.square().sum(), W), torch.autograd.grad(theirs.square().sum(), W))


@pytest.mark.parametrize("kind", ["grad_of_grad", "hessian_rows", "has_aux", "argnums", "in_dims_1", "chunked",
                                  "one_example", "value_only_of_weights", "unused_input", "no_grad_inside"])
def test_compositions_match_torch_func(kind):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 6, generator=g, dtype=DT)
    w = torch.randn(6, generator=g, dtype=DT)
    xs = torch.randn(B, 5, generator=g, dtype=DT)

    def f(w, x):
        return (torch.tanh(W @ w) * x).sum() + (w * w).sum()

    def run(lib):
        if kind == "grad_of_grad":
            return lib.vmap(lib.grad(lambda w, x: lib.grad(f)(w, x).sin().sum()), in_dims=(None, 0))(w, xs)
        if kind == "hessian_rows":
            return lib.vmap(lib.grad(lambda w, x: lib.grad(f)(w, x) @ x[:1].repeat(6)), in_dims=(None, 0))(w, xs)
        if kind == "has_aux":
            return lib.vmap(lib.grad(lambda w, x: (f(w, x), torch.tanh(W @ w)), has_aux=True),
                            in_dims=(None, 0))(w, xs)
        if kind == "argnums":
            return lib.vmap(lib.grad(f, argnums=(0, 1)), in_dims=(None, 0))(w, xs)
        if kind == "in_dims_1":
            return lib.vmap(lib.grad(f, argnums=(0, 1)), in_dims=(None, 1))(w, xs.t().contiguous())
        if kind == "chunked":
            return lib.vmap(lib.grad(f), in_dims=(None, 0), chunk_size=3)(w, xs)
        if kind == "one_example":
            return lib.vmap(lib.grad(f), in_dims=(None, 0))(w, xs[:1])
        if kind == "value_only_of_weights":
            return lib.vmap(lib.grad_and_value(lambda w, x: (w * w).sum() + 0 * x.sum()), in_dims=(None, 0))(w, xs)
        if kind == "unused_input":
            return lib.vmap(lib.grad(lambda w, x: x.sum() * 1.0, argnums=(0, 1)), in_dims=(None, 0))(w, xs)

        def h(w, x):
            with torch.no_grad():
                c = (W @ w).sum()
            return f(w, x) * c

        return lib.vmap(lib.grad(h), in_dims=(None, 0))(w, xs)

    assert_close(run(pf), run(tf))


def test_the_backward_runs_without_python_dispatch(monkeypatch):
    # per-sample gradients of an MLP: the forward pass dispatches at both levels, the backward
    # pass at none (it ran two dispatches per op: the grad level's wrappers, then vmap's)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(B, 6, dtype=DT), torch.randint(0, 5, (B,))
    fn = pf.vmap(pf.grad(_loss_with(pf.functional_call, model)), in_dims=(None, 0, 0))
    counts = {"forward": 0, "backward": 0}
    phase = ["forward"]
    orig_td = _core.LevelTensor.__torch_dispatch__.__func__
    orig_grad = reverse._Shadow.grad

    def spy(cls, func, types, args=(), kwargs=None):
        counts[phase[0]] += 1
        return orig_td(cls, func, types, args, kwargs)

    def grad(self, *a, **k):
        phase[0] = "backward"
        try:
            return orig_grad(self, *a, **k)
        finally:
            phase[0] = "forward"

    monkeypatch.setattr(_core.LevelTensor, "__torch_dispatch__", classmethod(spy))
    monkeypatch.setattr(reverse._Shadow, "grad", grad)
    fn(params, x, y)
    assert counts["forward"] > 0 and counts["backward"] == 0, counts
    monkeypatch.setattr(reverse, "PER_SAMPLE_SHADOW", False)
    counts.update(forward=0, backward=0)
    fn(params, x, y)
    assert counts["backward"] == 0 and counts["forward"] > 0  # (the wrappers' backward: under "forward")


def test_an_op_without_a_physically_differentiable_rule_turns_it_off(monkeypatch):
    # group norm's rule is correct as a function but not listed in batching/physical_ad.py: the
    # per-sample gradient is then taken on the grad level's wrappers (before that list, embedding's
    # rule with padding_idx gave wrong per-sample gradients when differentiated physically)
    assert not physical_ad.physically_differentiable(torch.ops.aten.native_group_norm.default)
    assert physical_ad.physically_differentiable(torch.ops.aten.addmm.default)
    assert physical_ad.physically_differentiable(torch.ops.aten.tanh.default)
    assert physical_ad.physically_differentiable(torch.ops.aten._embedding_bag.default)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, dtype=DT)
    x = torch.randn(B, 1, 4, 6, generator=g, dtype=DT)

    def f(w, x):
        return F.group_norm(x, 2, w).square().sum()

    used = _spy_used(monkeypatch)
    ours = pf.vmap(pf.grad(f, argnums=(0, 1)), in_dims=(None, 0))(w, x)
    theirs = tf.vmap(tf.grad(f, argnums=(0, 1)), in_dims=(None, 0))(w, x)
    assert_close(ours, theirs)
    assert used == [False]


@pytest.mark.parametrize("layout", ["transposed", "row_major"])
def test_shared_operand_product_gradients(layout, device):
    # matmul_batched with an operand expanded along the batch (stride 0) that requires grad:
    # one product forward, per-example gradients (first and second order) as the batched product's
    g = torch.Generator().manual_seed(4)
    a = torch.randn(B, 3, 6, generator=g, dtype=DT).to(device).requires_grad_()
    base = (torch.randn(5, 6, generator=g, dtype=DT) if layout == "transposed" else
            torch.randn(6, 5, generator=g, dtype=DT)).to(device)
    outs = []
    for shared in (True, False):
        leaf = base.expand((B,) + base.shape).detach().requires_grad_()
        bmat = leaf.transpose(-1, -2) if layout == "transposed" else leaf
        out = linalg.matmul_batched(a, bmat) if shared else torch.matmul(a, bmat)
        ga, gb = torch.autograd.grad(out.sin().sum(), (a, leaf), create_graph=True)
        second = torch.autograd.grad((ga.square().sum() + gb.square().sum()), (a, leaf))
        outs.append((out, ga, gb, second))
    assert_close(outs[0], outs[1])
    assert outs[0][2].shape == (B,) + base.shape


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("has_n", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_shared_filter_convolution_gradients(has_n, groups, bias, device):
    # convolution with filters (and a bias) expanded along the batch (stride 0) that require
    # grad: one convolution forward, the bias inside it, per-example filter and bias gradients
    # (first and second order) as a loop's
    g = torch.Generator().manual_seed(5)
    x = torch.randn((B, 3, 4, 7, 7) if has_n else (B, 4, 7, 7), generator=g, dtype=DT).to(device).requires_grad_()
    base = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=DT).to(device)
    bbase = torch.randn(6, generator=g, dtype=DT).to(device)
    from pyfunctorch.batching.convolution import _shared_filters

    outs = []
    for shared in (True, False):
        leaf = base.expand((B,) + base.shape).detach().requires_grad_()
        bleaf = bbase.expand((B,) + bbase.shape).detach().requires_grad_() if bias else None
        wrt = (x, leaf) + ((bleaf,) if bias else ())
        rest = ([1, 1], [1, 0], [1, 1], False, [0, 0])
        if shared:
            out = _shared_filters(x, leaf, bleaf, rest, groups, has_n)
        else:
            conv = torch.ops.aten.convolution.default
            bi = (lambda i: bleaf[i]) if bias else (lambda i: None)
            out = torch.stack([conv(x[i], leaf[i], bi(i), *rest, groups) if has_n else
                               conv(x[i].unsqueeze(0), leaf[i], bi(i), *rest, groups)[0] for i in range(B)])
        first = torch.autograd.grad(out.sin().sum(), wrt, retain_graph=True)  # (the fast backward)
        grads = torch.autograd.grad(out.sin().sum(), wrt, create_graph=True)
        second = torch.autograd.grad(sum(gr.square().sum() for gr in grads), wrt)
        outs.append((out, grads, second, first))
    assert_close(outs[0], outs[1])


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("shared_indices", [False, True])
def test_gradient_through_vmap_of_embedding_with_per_example_tables(padding_idx, shared_indices, device):
    # grad *around* vmap: the level outside differentiates what the embedding rule computes on the
    # physical batch. With padding_idx, one lookup in a table of B*V rows honoured the padding row
    # of example 0 only: every other example's padding row got a gradient (silently wrong, max
    # error ~2). Oracle: torch.autograd through a loop over the examples (vmap's definition).
    g = torch.Generator().manual_seed(6)
    W = torch.randn(B, 6, 4, generator=g, dtype=DT).to(device)
    idx = torch.tensor([[0, 2, 2, 5], [2, 1, 2, 3], [4, 2, 0, 2], [2, 2, 1, 5]], device=device)
    if shared_indices:
        idx = idx[0]

    def per_example(w, i):
        return F.embedding(i, w, padding_idx=padding_idx).sin()

    in_dims = (0, None if shared_indices else 0)

    def f(W):
        return pf.vmap(per_example, in_dims=in_dims)(W, idx).square().sum()

    Wr = W.clone().requires_grad_()
    loop = torch.stack([per_example(Wr[b], idx if shared_indices else idx[b]) for b in range(B)])
    (want,) = torch.autograd.grad(loop.square().sum(), Wr)
    assert_close(pf.grad(f)(W), want)
    # second order (grad of grad, a Hessian-vector product) and forward mode around vmap
    v = torch.randn(W.shape, generator=g, dtype=DT).to(device)
    (gg,) = torch.autograd.grad(torch.autograd.grad(torch.stack(
        [per_example(Wr[b], idx if shared_indices else idx[b]) for b in range(B)]).square().sum(), Wr,
        create_graph=True)[0].mul(v).sum(), Wr)
    assert_close(pf.grad(lambda W: (pf.grad(f)(W) * v).sum())(W), gg)
    # (forward AD through torch's kernel: padding_idx does not zero a tangent, so not want . v)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(W, v)
        tangent = fwAD.unpack_dual(torch.stack([per_example(dual[b], idx if shared_indices else idx[b])
                                                for b in range(B)]).square().sum()).tangent
    assert_close(pf.jvp(f, (W,), (v,))[1], tangent)


def test_sparse_embedding_per_sample_gradients_are_sparse():
    # the shared table's per-example gradients keep torch's sparse layout (values as the loop's)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 4, generator=g, dtype=DT)
    idx = torch.tensor([[0, 2, 2, 5], [2, 1, 2, 3], [4, 2, 0, 2], [2, 2, 1, 5]])

    def f(w, i):
        return F.embedding(i, w, sparse=True).sin().sum()

    ours = pf.vmap(pf.grad(f), in_dims=(None, 0))(w, idx)
    assert ours.layout == torch.sparse_coo
    want = loop_vmap(lambda w, i: tf.grad(lambda w: F.embedding(i, w).sin().sum())(w), in_dims=(None, 0))(w, idx)
    assert_close(ours.to_dense(), want)
