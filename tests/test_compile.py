"""pyfunctorch.compile: traced-and-replayed transforms against eager pyfunctorch and torch.func
(the oracle), plus the cache, fallback, randomness and autograd semantics."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

import pyfunctorch as pf

from conftest import assert_close

DT = torch.float64


def _twice(c, *args, **kwargs):
    """First call traces, second replays: both must be right."""
    first = c(*args, **kwargs)
    second = c(*args, **kwargs)
    return first, second


def _check(c, eager, oracle, *args, **kwargs):
    first, second = _twice(c, *args, **kwargs)
    expected = oracle(*args, **kwargs)
    assert_close(first, expected)
    assert_close(second, expected)
    assert_close(eager(*args, **kwargs), expected)
    info = c.cache_info()
    assert (info.traces, info.misses, info.hits, info.eager_calls) == (1, 1, 1, 0), info


# -- the workloads ---------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def test_per_sample_grads_functional_call():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def make(func_call, grad, vmap):
        def loss(p, x, y):
            out = func_call(model, p, (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))

    eager = make(pf.functional_call, pf.grad, pf.vmap)
    oracle = make(tf.functional_call, tf.grad, tf.vmap)
    c = pf.compile(eager)
    x, y = torch.randn(7, 6, dtype=DT), torch.randint(0, 3, (7,))
    _check(c, eager, oracle, params, x, y)
    # new weights are graph inputs: no retrace
    params2 = {k: v + 0.1 for k, v in params.items()}
    assert_close(c(params2, x, y), oracle(params2, x, y))
    assert c.cache_info().traces == 1
    # outputs are plain tensors in eager's structure
    out = c(params, x, y)
    assert type(out) is dict and list(out) == list(params)
    assert all(type(v) is torch.Tensor for v in out.values())


def _tanh_mlp(x):
    return torch.tanh(torch.tanh(x @ _W1) @ _W2)


_W1 = torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
_W2 = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(2))


def test_jacrev():
    x = torch.randn(4, dtype=DT)
    _check(pf.compile(pf.jacrev(_tanh_mlp)), pf.jacrev(_tanh_mlp), tf.jacrev(_tanh_mlp), x)


def test_jacfwd():
    x = torch.randn(4, dtype=DT)
    _check(pf.compile(pf.jacfwd(_tanh_mlp)), pf.jacfwd(_tanh_mlp), tf.jacfwd(_tanh_mlp), x)


def test_hessian():
    def f(x):
        return (torch.sin(x) * torch.exp(x @ _W1).sum()).sum()

    x = torch.randn(4, dtype=DT)
    _check(pf.compile(pf.hessian(f)), pf.hessian(f), tf.hessian(f), x)


def test_vmap_over_jvp():
    def make(vmap, jvp):
        return vmap(lambda x, t: jvp(_tanh_mlp, (x,), (t,)))

    x, t = torch.randn(5, 4, dtype=DT), torch.randn(5, 4, dtype=DT)
    eager = make(pf.vmap, pf.jvp)
    _check(pf.compile(eager), eager, make(tf.vmap, tf.jvp), x, t)


def test_batched_hvp():
    def f(x):
        return (torch.tanh(x @ _W1) ** 2).sum()

    def make(vmap, jvp, grad):
        return vmap(lambda x, v: jvp(grad(f), (x,), (v,))[1], in_dims=(None, 0))

    x, v = torch.randn(4, dtype=DT), torch.randn(6, 4, dtype=DT)
    eager = make(pf.vmap, pf.jvp, pf.grad)
    _check(pf.compile(eager), eager, make(tf.vmap, tf.jvp, tf.grad), x, v)


def test_nested_vmap_in_dims():
    def f(a, b, w):
        return torch.sin(a) * b + w.sum()

    def make(vmap):
        return vmap(vmap(f, in_dims=(0, None, None)), in_dims=(1, 0, None))

    a, b, w = torch.randn(3, 4, 2, dtype=DT), torch.randn(4, 2, dtype=DT), torch.randn(5, dtype=DT)
    eager = make(pf.vmap)
    _check(pf.compile(eager), eager, make(tf.vmap), a, b, w)


def test_pytree_outputs_kwargs_and_constants():
    def f(x, *, scale, extra=None):
        return {"y": x * scale, "n": 3, "pair": (x.sin(), [x.cos()])}

    c = pf.compile(f)
    x = torch.randn(3, dtype=DT)
    for _ in range(2):
        out = c(x, scale=2.0)
        assert_close(out, f(x, scale=2.0))
    assert c.cache_info().traces == 1
    c(x, scale=3.0)  # non-tensor arguments are part of the signature, by value
    assert c.cache_info().traces == 2
    assert_close(c(x, scale=3.0), f(x, scale=3.0))


# -- the cache ---------------------------------------------------------------------------


def test_cache_hits_and_retraces():
    calls = []

    def loss(w, x):
        calls.append(1)  # a Python side effect: happens at trace time only
        return (torch.tanh(x @ w) ** 2).sum()

    c = pf.compile(pf.vmap(pf.grad(loss), in_dims=(None, 0)))
    w = torch.randn(4, 3, dtype=DT)
    for _ in range(3):
        c(w, torch.randn(5, 4, dtype=DT))
    assert c.cache_info() == (2, 1, 1, 0, 1, 0, 0)  # hits, misses, traces, eager_calls, entries, guard_failures, evictions
    assert len(calls) == 1
    c(w, torch.randn(6, 4, dtype=DT))  # new batch size
    c(w.float(), torch.randn(5, 4))  # new dtype
    c(w, torch.randn(4, 5, dtype=DT).t())  # new strides
    c(w.requires_grad_(), torch.randn(5, 4, dtype=DT))  # requires_grad
    info = c.cache_info()
    assert (info.traces, info.misses, info.entries) == (5, 5, 5)
    assert len(calls) == 5 and len(c.graphs()) == 5
    x = torch.randn(6, 4, dtype=DT)
    assert_close(c(w.detach(), x), tf.vmap(tf.grad(loss), in_dims=(None, 0))(w.detach(), x))
    assert c.cache_info().traces == 5
    c.cache_clear()
    assert c.cache_info() == (0, 0, 0, 0, 0, 0, 0)


def test_same_tensor_twice_is_part_of_the_signature():
    c = pf.compile(lambda a, b: a * 2 + b)
    x, y = torch.randn(3), torch.randn(3)
    assert_close(c(x, x), x * 3)
    assert_close(c(x, y), x * 2 + y)
    assert_close(c(y, y), y * 3)
    assert c.cache_info().traces == 2


def test_closed_over_tensors_are_constants_by_reference():
    w = torch.randn(3)
    c = pf.compile(pf.grad(lambda x: (x * w).sum()))
    x = torch.randn(3)
    assert_close(c(x), w)
    with torch.no_grad():
        w.mul_(2)  # in-place updates of a captured tensor are seen by the replay
    assert_close(c(x), w)


def test_inplace_update_of_an_input_happens_once_per_call():
    def f(x):
        x.add_(1)
        return x * 2

    c = pf.compile(f)
    x = torch.zeros(3)
    c(x)
    assert_close(x, torch.ones(3))
    c(x)
    assert_close(x, torch.full((3,), 2.0))

    def g(x, y):  # a mutation whose result is unused stays in the graph
        x.add_(1)
        return y * 2

    c = pf.compile(g)
    x, y = torch.zeros(2), torch.ones(2)
    for _ in range(3):
        assert_close(c(x, y), y * 2)
    assert_close(x, torch.full((2,), 3.0))


# -- data-dependent control flow -----------------------------------------------------------


def _branchy(x):
    if x.sum() > 0:
        return x * 2
    return x * 3


def test_data_dependent_control_flow_falls_back_with_a_warning():
    c = pf.compile(pf.vmap(_branchy))
    x = torch.randn(6, 3, dtype=DT)
    expected = torch.stack([_branchy(r) for r in x])
    with pytest.warns(pf.PerformanceWarning, match="pyfunctorch.compile.*run eagerly"):
        assert_close(c(x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; the signature is remembered as eager
        assert_close(c(x), expected)
    info = c.cache_info()
    assert (info.traces, info.misses, info.hits, info.eager_calls) == (0, 1, 1, 2)


def test_data_dependent_strict_raises():
    c = pf.compile(pf.vmap(_branchy), strict=True)
    with pytest.raises(pf.DataDependentError, match=r"strict=True.*test_compile.py"):
        c(torch.randn(4, 3))
    c2 = pf.compile(pf.grad(lambda x: _branchy(x).sum()), strict=True)
    with pytest.raises(pf.DataDependentError, match="reads the value"):
        c2(torch.randn(3))


@pytest.mark.parametrize(
    "f",
    [
        pytest.param(lambda x: x * sum(x.reshape(-1).tolist()), id="tolist"),
        pytest.param(lambda x: x * x.sum().item(), id="item"),
        pytest.param(lambda x: x.nonzero().sum(0).to(x.dtype) + x.sum(), id="nonzero"),
        pytest.param(lambda x: x[x > 0].sum() * x, id="bool-mask"),
    ],
)
@pytest.mark.parametrize("under_vmap", [False, True])
def test_data_dependence_is_detected(f, under_vmap):
    fn = pf.vmap(f) if under_vmap else f
    x = torch.randn(4, 3, dtype=DT)
    expected = torch.stack([f(r) for r in x]) if under_vmap else f(x)
    c = pf.compile(fn)
    with pytest.warns(pf.PerformanceWarning, match="pyfunctorch.compile"):
        assert_close(c(x), expected)
    x2 = torch.randn(4, 3, dtype=DT)  # other values: still right (eager, not a frozen graph)
    assert_close(c(x2), torch.stack([f(r) for r in x2]) if under_vmap else f(x2))
    assert c.cache_info().traces == 0
    with pytest.raises(pf.DataDependentError):
        pf.compile(fn, strict=True)(x)


def test_integer_indexing_is_not_data_dependent():
    idx = torch.tensor([0, 2])
    c = pf.compile(pf.vmap(lambda x: x[idx] * 2))
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)
        assert_close(c(x), x[:, idx] * 2)
        assert_close(c(x), x[:, idx] * 2)
    assert c.cache_info().traces == 1


def test_called_inside_a_transform_runs_eagerly():
    c = pf.compile(lambda x: torch.sin(x) * x)
    x = torch.randn(4, 3)
    with pytest.warns(pf.PerformanceWarning, match="inside a live transform"):
        assert_close(pf.vmap(c)(x), torch.sin(x) * x)
    assert_close(pf.vmap(pf.grad(lambda v: c(v).sum()))(x), torch.cos(x) * x + torch.sin(x))


def test_decorator_forms():
    @pf.compile
    def f(x):
        return torch.sin(x)

    @pf.compile(strict=True)
    def g(x):
        return torch.cos(x)

    x = torch.randn(3)
    assert_close(f(x), torch.sin(x))
    assert_close(g(x), torch.cos(x))
    assert f.__name__ == "f" and g.cache_info().traces == 1


def test_dynamic_true_is_refused():
    with pytest.raises(NotImplementedError, match="dynamic"):
        pf.compile(torch.sin, dynamic=True)


# -- randomness ------------------------------------------------------------------------------


def test_random_ops_draw_fresh_numbers_on_every_replay():
    c = pf.compile(pf.grad(lambda x: (x * torch.randn(64)).sum()))
    x = torch.zeros(64)
    draws = [c(x) for _ in range(4)]
    assert c.cache_info().traces == 1
    for i in range(4):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j])
    # the replay draws from torch's global generator: manual_seed makes it repeat
    torch.manual_seed(123)
    a = c(x)
    torch.manual_seed(123)
    assert torch.equal(a, c(x))


def test_vmap_randomness_same_replays_fresh_draws():
    c = pf.compile(pf.vmap(lambda x: x + torch.randn(3), randomness="same"))
    x = torch.zeros(5, 3)
    draws = [c(x) for _ in range(3)]
    for d in draws:  # 'same': every example sees the same draw
        assert_close(d, d[:1].expand(5, 3))
    assert not torch.equal(draws[1], draws[2])
    assert c.cache_info().traces == 1


def test_vmap_randomness_different_draws_fresh_per_call_and_per_example():
    c = pf.compile(pf.vmap(lambda x: x + torch.randn(3), randomness="different"))
    x = torch.zeros(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)  # traced, not an eager fallback
        draws = [c(x) for _ in range(3)]
    for d in draws:
        assert d.shape == (5, 3) and not torch.equal(d[0], d[1])
    assert not torch.equal(draws[1], draws[2])
    assert c.cache_info().traces == 1


_DIFFERENT = [
    pytest.param(lambda v: v + torch.randn(3), {}, id="factory"),
    pytest.param(lambda v: F.dropout(v, 0.3), {}, id="dropout"),
    pytest.param(lambda v: F.dropout(v, 0.3), {"in_dims": 1}, id="dropout-bdim1"),
    pytest.param(lambda v: torch.rand_like(v) * v, {}, id="rand_like"),
    pytest.param(lambda v: torch.normal(v, 1.0), {}, id="normal"),
    pytest.param(lambda v: torch.bernoulli(v.sigmoid()), {}, id="bernoulli"),
    pytest.param(lambda v: F.dropout(v, 0.5), {"chunk_size": 2}, id="chunked"),
]


@pytest.mark.parametrize("f, opts", _DIFFERENT)
def test_vmap_randomness_different_is_bitwise_eager_under_a_seed(f, opts):
    # the per-example seeds are drawn inside the graph from the global generator, as
    # eager vmap draws them: after the same manual_seed, compiled == eager bit for bit
    eager = pf.vmap(f, randomness="different", **opts)
    c = pf.compile(eager)
    x = torch.randn(3, 5, 3) if opts.get("in_dims") == 1 else torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)
        for seed in range(3):  # the traced call, then replays
            torch.manual_seed(seed)
            got = c(x)
            torch.manual_seed(seed)
            assert torch.equal(got, eager(x))
    assert c.cache_info().traces == 1
    nested = pf.vmap(eager, randomness="different")
    cn = pf.compile(nested)
    xs = torch.stack([x, x + 1])
    for seed in range(2):
        torch.manual_seed(seed)
        got = cn(xs)
        torch.manual_seed(seed)
        assert torch.equal(got, nested(xs))
        assert not torch.equal(got[0], got[1] - 1) or f is _DIFFERENT[0]


def test_dp_sgd_with_dropout_compiles_and_matches_eager_and_a_loop():
    torch.manual_seed(0)
    w = torch.randn(6, 3, dtype=DT)
    p = 0.4

    def loss(w, x, y):
        h = F.dropout(x @ w, p, training=True)
        mask = (h != 0).to(h.dtype)  # (an aux output: which units were kept)
        return ((h - y) ** 2).sum(), mask

    eager = pf.vmap(pf.grad(loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    c = pf.compile(eager)
    x, y = torch.randn(8, 6, dtype=DT), torch.randn(8, 3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            g, mask = c(w, x, y)
            torch.manual_seed(seed)
            ge, maske = eager(w, x, y)
            assert torch.equal(g, ge) and torch.equal(mask, maske)
            # oracle given the masks: plain autograd, one example at a time
            for b in range(8):
                wb = w.clone().requires_grad_()
                h = (x[b] @ wb) * mask[b] / (1 - p)
                (gb,) = torch.autograd.grad(((h - y[b]) ** 2).sum(), wb)
                assert_close(g[b], gb)
            assert 0 < mask.mean() < 1 and len({tuple(m.tolist()) for m in mask}) > 1  # per-example masks
    assert c.cache_info().traces == 1


def test_dp_sgd_functional_call_with_a_dropout_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT).train()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(pf.functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    eager = pf.vmap(pf.grad(loss), in_dims=(None, 0, 0), randomness="different")
    c = pf.compile(eager)
    x, y = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)
        for seed in range(3):
            torch.manual_seed(seed)
            got = c(params, x, y)
            torch.manual_seed(seed)
            want = eager(params, x, y)
            assert all(torch.equal(got[k], want[k]) for k in want)
    assert c.cache_info().traces == 1
    model.eval()  # dropout off: guarded (`training`), retraced; now deterministic = torch.func
    assert_close(c(params, x, y), tf.vmap(tf.grad(lambda p, x, y: F.cross_entropy(
        tf.functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))), in_dims=(None, 0, 0))(params, x, y))


def test_randomness_different_that_cannot_be_traced_still_matches_eager():
    # grad(vmap(...)): the random op meets grad wrappers below the vmap level, so this
    # signature runs eagerly -- with the draws an eager call would make (the failed
    # trace's draws are undone)
    x = torch.randn(4, 6)

    def f(w):
        return pf.vmap(lambda v: F.dropout(v * w, 0.3).sum(), randomness="different")(x).sum()

    eager = pf.grad(f)
    c = pf.compile(eager)
    w = torch.randn(6)
    with pytest.warns(pf.PerformanceWarning):
        torch.manual_seed(0)
        got = c(w)
    torch.manual_seed(0)
    assert torch.equal(got, eager(w))


def test_dropout_under_grad_replays_fresh_masks():
    c = pf.compile(pf.grad(lambda x: F.dropout(x, 0.5, training=True).sum()))
    x = torch.ones(200)
    masks = [c(x) for _ in range(3)]
    assert all(set(m.unique().tolist()) <= {0.0, 2.0} for m in masks)
    assert not torch.equal(masks[1], masks[2])


# -- autograd through the replay ---------------------------------------------------------------


def test_autograd_through_the_replay():
    def f(x):
        return (torch.tanh(x @ _W1) ** 2).sum()

    c = pf.compile(pf.grad(f))
    x0 = torch.randn(4, dtype=DT)
    for _ in range(2):  # trace, then replay
        x = x0.clone().requires_grad_()
        g = c(x)
        (h,) = torch.autograd.grad(g.sin().sum(), x, create_graph=True)
        (h2,) = torch.autograd.grad(h.sum(), x)  # third order through the replay
        xe = x0.clone().requires_grad_()
        ge = tf.grad(f)(xe)
        (he,) = torch.autograd.grad(ge.sin().sum(), xe, create_graph=True)
        (he2,) = torch.autograd.grad(he.sum(), xe)
        assert_close(g, ge)
        assert_close(h, he)
        assert_close(h2, he2)
    assert c.cache_info().traces == 1


def test_autograd_through_replayed_per_sample_grads():
    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    c = pf.compile(pf.vmap(pf.grad(loss), in_dims=(None, 0)))
    w0, x = torch.randn(4, 3, dtype=DT), torch.randn(5, 4, dtype=DT)
    for _ in range(2):
        w = w0.clone().requires_grad_()
        (gw,) = torch.autograd.grad(c(w, x).pow(2).sum(), w)
        we = w0.clone().requires_grad_()
        (gwe,) = torch.autograd.grad(tf.vmap(tf.grad(loss), in_dims=(None, 0))(we, x).pow(2).sum(), we)
        assert_close(gw, gwe)


# -- torch.compile backends ----------------------------------------------------------------------


def test_backend_aot_eager():
    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    eager = pf.vmap(pf.grad(loss), in_dims=(None, 0))
    c = pf.compile(eager, backend="aot_eager")
    w, x = torch.randn(4, 3), torch.randn(5, 4)
    _check(c, eager, tf.vmap(tf.grad(loss), in_dims=(None, 0)), w, x)


def test_failing_backend_falls_back_to_the_replay():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    c = pf.compile(lambda x: torch.sin(x) * 2, backend=broken_backend)
    x = torch.randn(3)
    with pytest.warns(pf.PerformanceWarning, match="no compiler here"):
        for _ in range(3):
            assert_close(c(x), torch.sin(x) * 2)
    with pytest.raises(Exception, match="no compiler here"):
        strict = pf.compile(lambda x: torch.sin(x) * 2, backend=broken_backend, strict=True)
        strict(x)
        strict(x)


@pytest.mark.slow
def test_backend_inductor():  # ~25 s on a 2-core CPU (C++ compilation)
    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    eager = pf.vmap(pf.grad(loss), in_dims=(None, 0))
    c = pf.compile(eager, backend="inductor")
    w, x = torch.randn(4, 3), torch.randn(5, 4)
    _check(c, eager, tf.vmap(tf.grad(loss), in_dims=(None, 0)), w, x)
    wr = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(c(wr, x).sum(), wr)
    c(wr, x)
    wr2 = w.clone().requires_grad_()
    (ge,) = torch.autograd.grad(tf.vmap(tf.grad(loss), in_dims=(None, 0))(wr2, x).sum(), wr2)
    assert_close(g, ge)


# -- other tracing failures, printing ----------------------------------------------------------


def test_errors_of_the_function_itself_propagate():
    def f(x):
        raise ValueError("boom")

    for strict in (False, True):
        c = pf.compile(f, strict=strict)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no compile warning: the eager error is the user's
            with pytest.raises(ValueError, match="boom"):
                c(torch.randn(2))
        assert c.cache_info().entries == 0


def test_failed_trace_after_an_inplace_update_of_an_input_raises():
    def f(x):
        x.add_(1)
        if x.sum() > 0:
            return x
        return -x

    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="in place"):
        pf.compile(f)(x)
    assert_close(x, torch.full((3,), 2.0))  # updated exactly once


def test_print_inside_shows_trace_time_values(capsys):
    def loss(w, x):
        value = (torch.tanh(x @ w) ** 2).sum()
        print("loss:", value)
        return value

    c = pf.compile(pf.vmap(pf.grad(loss), in_dims=(None, 0)))
    w, x = torch.randn(3, 2), torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)  # printing does not break the trace
        c(w, x)
        c(w, x)
    assert capsys.readouterr().out.count("loss:") == 1  # a side effect: at trace time only
    assert c.cache_info().traces == 1


def test_outputs_are_freed_when_the_caller_drops_them():
    # (a reference cycle around the outputs would keep them -- e.g. 25 MB of per-sample
    # gradients -- alive until the cyclic GC runs, and slow every call down)
    import gc
    import weakref

    c = pf.compile(lambda x: {"a": x * 2, "b": (x.sin(), [x.cos()])})
    x = torch.randn(3)
    c(x)
    gc.disable()
    try:
        for _ in range(2):  # the traced call and a replay
            out = c(x)
            refs = [weakref.ref(t) for t in (out["a"], out["b"][0], out["b"][1][0])]
            del out
            assert all(r() is None for r in refs)
    finally:
        gc.enable()


@pytest.mark.slow
def test_backend_inductor_compiles_the_graph_directly():
    # backend='inductor' compiles the traced aten graph with inductor itself (no dynamo frame
    # evaluation per call): outputs keep their structure and types, in-place updates of an
    # input happen once per call, and autograd runs through the compiled graph
    import copy

    def f1(x, y):
        return x.sin() + y, (x * y).sum()

    def f2(x):
        x.add_(1)
        return x * 2

    def f3(d):
        return {"a": [d["x"] * 2], "b": (d["x"].exp(),)}

    for fn, make in ((f1, lambda: (torch.randn(4, 3), torch.randn(3))), (f2, lambda: (torch.randn(3),)),
                     (f3, lambda: ({"x": torch.randn(2)},))):
        c = pf.compile(fn, backend="inductor")
        with warnings.catch_warnings():
            warnings.simplefilter("error", pf.PerformanceWarning)  # no fallback to the replay
            for _ in range(3):
                got_args = make()
                want_args = copy.deepcopy(got_args)
                got, want = c(*got_args), fn(*want_args)
                assert_close(got, want)
                assert type(got) is type(want)
                assert_close(got_args, want_args)
        assert c.cache_info().traces == 1
    w = torch.randn(3, requires_grad=True)
    c = pf.compile(pf.grad(lambda x: (x.sin() * 2).sum()), backend="inductor")
    (g,) = torch.autograd.grad(c(w).sum(), w)
    assert_close(g, -2 * w.detach().sin())


@pytest.mark.parametrize("op", ["mul", "rmul", "add", "sub", "div"])
def test_compiled_jvp_of_jvp_with_a_python_scalar(device, op):
    """jvp(jvp(f)) traced by pyfunctorch.compile, f applying a Python scalar to a dual: the jvp
    levels' `.Scalar` fast path (trap 6) killed the process with a segmentation fault inside
    torch while make_fx traced it (fuzzer seed 7793). Oracle: torch.func, eager."""
    c = torch.randn(3, dtype=torch.float64, device=device)
    apply = {"mul": lambda h: h * 2.5, "rmul": lambda h: 2.5 * h, "add": lambda h: h + 2.5,
             "sub": lambda h: h - 1.0, "div": lambda h: h / 4.0}[op]

    def make(ns):
        f = lambda x: apply(x @ c)  # noqa: E731
        inner = lambda x: ns.jvp(f, (x,), (torch.ones_like(x),))  # noqa: E731
        return lambda x: ns.jvp(inner, (x,), (torch.ones_like(x),))

    x = torch.randn(3, dtype=torch.float64, device=device)
    want = make(tf)(x)
    compiled = pf.compile(make(pf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the trace, then the replay
            assert_close(compiled(x), want)
