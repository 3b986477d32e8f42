"""The shadow graph (reverse._Shadow): a grad/vjp level that no other transform encloses also
records its graph on plain inner values and differentiates that one (speed). Every result is
compared with torch.func (values, and whether it requires grad) or with torch.autograd;
the mechanism tests check that the shadow is taken where it should be (they fail without it).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import pyfunctorch as pf
from pyfunctorch import _core, reverse

from conftest import assert_close, loop_vmap, run_in_threads
from test_custom_function import Cube  # (x**3 with its own backward and jvp)

DT = torch.float64


def _weights(device, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    W1 = (torch.randn(5, 4, generator=g, dtype=DT) / 2).to(device)
    W2 = (torch.randn(3, 5, generator=g, dtype=DT) / 2).to(device)
    if requires_grad:
        W1.requires_grad_()
        W2.requires_grad_()
    return W1, W2


def _bodies(W1, W2, oracle=False):
    """name -> f(x) with x of shape (4,), returning a vector of 3. (``oracle``: saved-tensor
    hooks left out, which torch.func refuses; they change no value.)"""

    def mlp(x):
        return W2 @ torch.tanh(W1 @ x + 0.1)

    def views_and_writes(x):
        buf = torch.zeros(2, 4, dtype=x.dtype, device=x.device)
        buf[0] = x.sin()
        buf[1].copy_(x.cos() * 2)
        return buf.t().reshape(8)[:3] * buf.sum()

    def linear_ce(x):
        logits = F.linear(x.unsqueeze(0), W1, torch.ones(5, dtype=x.dtype, device=x.device))
        return F.log_softmax(logits, -1)[0, :3] + F.cross_entropy(logits, torch.tensor([1], device=x.device))

    def layer_norm(x):
        return F.layer_norm(W1 @ x, (5,))[:3] ** 2

    def custom_function(x):
        return Cube.apply(W2 @ x.sin().repeat(2)[:5])

    def hook(x):
        y = x.sin()
        y.register_hook(lambda g: g * 3)  # the backward must see the hook
        return W2 @ (W1 @ (y * y))

    def checkpointed(x):
        if oracle:
            return W2 @ torch.tanh(W1 @ x)
        return checkpoint(lambda a: W2 @ torch.tanh(W1 @ a), x, use_reentrant=False)

    def checkpoint_and_function(x):
        # the custom Function makes the level differentiate its wrappers (as torch 2.11's
        # checkpoint does itself, before its region): the recomputation then runs during that
        # backward. (A Function inside the region fails under vjp as before the shadow graph.)
        if oracle:
            return Cube.apply(W2 @ torch.tanh(W1 @ x))
        return Cube.apply(checkpoint(lambda a: W2 @ torch.tanh(W1 @ a), x, use_reentrant=False))

    def cut_by_data(x):
        # ``.data`` cuts the wrappers' graph (this level only, as torch.func): the plain graph
        # must not keep the edge (alias is a view: kept)
        y = W1 @ x.sin()
        return W2 @ (y.data * y + torch.ops.aten.alias.default(y) * y)

    def cut_by_new_tensor(x):
        y = torch.tanh(W1 @ x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (torch's "use clone().detach()")
            c = y.new_tensor(y)
        return W2 @ (c * y)

    def hooks_inside(x):
        if oracle:
            return W2 @ (W1 @ x).exp()
        with torch.autograd.graph.save_on_cpu():
            return W2 @ (W1 @ x).exp()

    def detach_and_no_grad(x):
        with torch.no_grad():
            c = x * 2
        return (W2 @ (W1 @ x)) * c.sum() + x.detach()[:3]

    def in_place_on_intermediate(x):
        y = W1 @ x
        y.add_(x[0])
        y[1:3].add_(x[:2] * x[1:3])
        y.exp_()
        return W2 @ y

    return {f.__name__: f for f in (mlp, views_and_writes, linear_ce, layer_norm, custom_function, hook,
                                    checkpointed, checkpoint_and_function, hooks_inside, detach_and_no_grad,
                                    in_place_on_intermediate, cut_by_data, cut_by_new_tensor)}


BODIES = list(_bodies(*_weights("cpu")))


def _compositions(lib):
    def grad_of(f):
        return lib.grad(lambda x: f(x).square().sum())(_X)

    def grad_and_value_aux(f):
        g, (v, aux) = lib.grad_and_value(lambda x: (f(x).sum(), f(x)), has_aux=True)(_X)
        return g, v, aux

    def vjp_once(f):
        out, fn = lib.vjp(f, _X)
        return out, fn(_V)[0]

    def vjp_twice(f):
        out, fn = lib.vjp(f, _X)
        return fn(_V)[0], fn(2 * _V)[0]

    def vjp_under_vmap(f):
        out, fn = lib.vjp(f, _X)
        return lib.vmap(fn)(torch.eye(3, dtype=DT, device=_X.device))[0]

    def vjp_under_no_grad(f):
        out, fn = lib.vjp(f, _X)
        with torch.no_grad():
            return fn(_V)[0]

    def jacrev(f):
        return lib.jacrev(f)(_X)

    def jacrev_chunked(f):
        return lib.jacrev(f, chunk_size=2)(_X)

    def jacrev_of_jacrev(f):
        return lib.jacrev(lib.jacrev(lambda x: f(x)[:2]))(_X)

    # per-sample gradients (the shadow on the vmap level's physical values): of a batched input,
    # and of a shared input (in_dims=None: differentiated per example, as a weight)
    def per_example_input_grads(f):
        return lib.vmap(lib.grad(lambda x: f(x).square().sum()))(_XS)

    def per_sample_grads_of_a_shared_input(f):
        return lib.vmap(lib.grad(lambda x, v: (f(x) * v).sum()), in_dims=(None, 0))(_X, _VS)

    def per_sample_grad_and_value_aux(f):
        return lib.vmap(lib.grad_and_value(lambda x, v: ((f(x) * v).sum(), f(x)), has_aux=True),
                        in_dims=(None, 0))(_X, _VS)

    def per_sample_grads_both(f):
        return lib.vmap(lib.grad(lambda x, y: (f(x) * f(y)).sum(), argnums=(0, 1)), in_dims=(None, 0))(_X, _XS)

    return {c.__name__: c for c in (grad_of, grad_and_value_aux, vjp_once, vjp_twice, vjp_under_vmap,
                                    vjp_under_no_grad, jacrev, jacrev_chunked, jacrev_of_jacrev,
                                    per_example_input_grads, per_sample_grads_of_a_shared_input,
                                    per_sample_grad_and_value_aux, per_sample_grads_both)}


COMPOSITIONS = list(_compositions(pf))
_X = _V = _XS = _VS = None


def _run(lib, comp, body, device, w_requires_grad=False, x_requires_grad=False):
    global _X, _V, _XS, _VS
    W1, W2 = _weights(device, w_requires_grad)
    g = torch.Generator().manual_seed(5)
    _X = torch.randn(4, generator=g, dtype=DT).to(device)
    _V = torch.randn(3, generator=g, dtype=DT).to(device)
    _XS = torch.randn(3, 4, generator=g, dtype=DT).to(device)
    _VS = torch.randn(3, 3, generator=g, dtype=DT).to(device)
    if x_requires_grad:
        _X.requires_grad_()
        _XS.requires_grad_()
    out = _compositions(lib)[comp](_bodies(W1, W2, oracle=lib is not pf)[body])
    return out, (W1, W2), _X


# per-sample compositions: vmap's definition (a loop) over torch.func's grad -- torch.func's vmap
# refuses some bodies (writes of batched values into a buffer made inside)
_LOOP_OVER_TF = types.SimpleNamespace(vmap=loop_vmap, grad=tf.grad, grad_and_value=tf.grad_and_value)


def _oracle(comp):
    return _LOOP_OVER_TF if comp.startswith("per_") else tf


def _flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("comp", COMPOSITIONS)
@pytest.mark.parametrize("body", BODIES)
def test_results_and_requires_grad_match_torch_func(comp, body, device):
    # (checkpoint_and_function under jacrev_of_jacrev raised CheckpointError -- the recomputation ran
    # with the inner vjp level ended, so it saved a different number of tensors -- until checkpoint's
    # unpack hook ran with that level current again: pyfunctorch._saved_hooks)
    ours, _, _ = _run(pf, comp, body, device)
    theirs, _, _ = _run(_oracle(comp), comp, body, device)
    for a, b in zip(_flat(ours), _flat(theirs), strict=True):
        assert_close(a, b)
        assert a.requires_grad == b.requires_grad


@pytest.mark.parametrize("comp", ["grad_of", "grad_and_value_aux", "vjp_once", "jacrev",
                                  "per_sample_grads_of_a_shared_input", "per_example_input_grads"])
@pytest.mark.parametrize("body", ["mlp", "layer_norm", "hook", "checkpointed", "checkpoint_and_function",
                                  "in_place_on_intermediate", "cut_by_data", "cut_by_new_tensor"])
def test_weights_that_require_grad_stay_differentiable(comp, body, device):
    # a closed-over weight requiring grad (outside autograd): the results carry its graph,
    # and differentiating them by torch.autograd gives torch.func's numbers
    ours, (W1, _), _ = _run(pf, comp, body, device, w_requires_grad=True)
    theirs, (W1e, _), _ = _run(_oracle(comp), comp, body, device, w_requires_grad=True)
    for a, b in zip(_flat(ours), _flat(theirs), strict=True):
        assert_close(a, b)
        assert a.requires_grad == b.requires_grad
    (ga,) = torch.autograd.grad(sum((t * t).sum() for t in _flat(ours) if t.requires_grad), W1)
    (gb,) = torch.autograd.grad(sum((t * t).sum() for t in _flat(theirs) if t.requires_grad), W1e)
    assert_close(ga, gb)


@pytest.mark.parametrize("comp", ["grad_of", "vjp_once", "jacrev", "per_sample_grads_of_a_shared_input",
                                  "per_sample_grads_both"])
@pytest.mark.parametrize("body", ["mlp", "layer_norm", "views_and_writes", "in_place_on_intermediate"])
def test_inputs_that_require_grad_keep_their_graph(comp, body, device):
    # x requires grad outside: second derivatives through the results (plain autograd)
    ours, _, x = _run(pf, comp, body, device, x_requires_grad=True)
    theirs, _, xe = _run(_oracle(comp), comp, body, device, x_requires_grad=True)
    (ga,) = torch.autograd.grad(sum((t.sin()).sum() for t in _flat(ours)), x)
    (gb,) = torch.autograd.grad(sum((t.sin()).sum() for t in _flat(theirs)), xe)
    assert_close(ga, gb)


def test_escaped_intermediates_carry_no_graph_of_the_level():
    W1, W2 = _weights("cpu")
    x = torch.randn(4, dtype=DT)
    for lib in (pf, tf):
        kept = []

        def f(x):
            y = torch.tanh(W1 @ x)
            kept.append(y)
            return (W2 @ y).sum()

        g = lib.grad(f)(x)
        assert_close(g, tf.grad(f)(x))
        escaped = kept[-1] + 0
        assert not escaped.requires_grad, lib
        assert_close(escaped, torch.tanh(W1 @ x))


def _grad_level_events(fn, *args):
    """(events at grad levels, events on ended levels) while ``fn(*args)`` runs."""
    counts = {"grad": 0, "dead": 0}
    orig = _core.LevelTensor.__torch_dispatch__.__func__

    def spy(cls, func, types, args=(), kwargs=None):
        top, dead = _core._find_top(args, kwargs or {})
        if dead:
            counts["dead"] += 1
        elif top is not None and top.kind == "grad":
            counts["grad"] += 1
        return orig(cls, func, types, args, kwargs)

    _core.LevelTensor.__torch_dispatch__ = classmethod(spy)
    try:
        fn(*args)
    finally:
        _core.LevelTensor.__torch_dispatch__ = classmethod(orig)
    return counts["grad"], counts["dead"]


def test_the_backward_runs_on_the_shadow_graph(monkeypatch):
    W1, W2 = _weights("cpu")
    x = torch.randn(4, dtype=DT)

    def f(x):
        return (W2 @ torch.tanh(W1 @ x.sin() + 1)).square().sum()

    fwd, _ = _grad_level_events(pf.vjp, f, x)  # (the forward pass only)
    shadow_grad, _ = _grad_level_events(pf.grad(f), x)
    shadow_jac = _grad_level_events(pf.jacrev(lambda a: W2 @ torch.tanh(W1 @ a)), x)
    monkeypatch.setattr(reverse._Shadow, "start", staticmethod(lambda flat, per_sample=False: None))
    wrapper_grad, _ = _grad_level_events(pf.grad(f), x)
    wrapper_jac = _grad_level_events(pf.jacrev(lambda a: W2 @ torch.tanh(W1 @ a)), x)
    # with the shadow, only the forward pass runs on the grad level's wrappers
    assert shadow_grad == fwd < wrapper_grad
    assert shadow_jac[1] == 0 < wrapper_jac[1]  # jacrev's backward: no op on the ended vjp level


@pytest.mark.parametrize("case", ["hook", "custom_function_under_vmap", "retain_grad"])
def test_the_wrappers_graph_is_differentiated_where_the_shadow_would_miss_something(case):
    x = torch.randn(4, dtype=DT)
    if case == "hook":
        def f(x):
            y = x.sin()
            y.register_hook(lambda g: g * 3)
            return (y * y).sum()

        assert_close(pf.grad(f)(x), tf.grad(f)(x))
        assert_close(pf.grad(f)(x), 3 * 2 * x.sin() * x.cos())
    elif case == "custom_function_under_vmap":
        eye = torch.eye(4, dtype=DT)
        from torch.testing._internal.autograd_function_db import NumpyCube

        for fn in (lambda a: Cube.apply(a.sin()), lambda a: NumpyCube.apply(a * 2)[0]):
            out, vjp_fn = pf.vjp(fn, x)
            assert_close(pf.vmap(vjp_fn)(eye)[0], torch.autograd.functional.jacobian(fn, x))
            assert_close(pf.jacrev(fn)(x), torch.autograd.functional.jacobian(fn, x))
    else:
        def f(x):
            y = x.sin()
            y.retain_grad()  # (torch.func raises here)
            return (y * y).sum()

        assert_close(pf.grad(f)(x), 2 * x.sin() * x.cos())


def test_shadow_is_not_taken_under_transforms_or_modes(monkeypatch):
    taken = []
    start = reverse._Shadow.start

    def spy(flat, per_sample=False):
        r = start(flat, per_sample)
        taken.append(r is not None and (r[1] is not None) + 1)  # (1: top level, 2: inside one vmap)
        return r

    monkeypatch.setattr(reverse._Shadow, "start", staticmethod(spy))
    x = torch.randn(3, 4, dtype=DT)
    f = lambda a: a.sin().sum()  # noqa: E731
    pf.grad(f)(x[0])
    pf.vmap(pf.grad(f))(x)  # (per-sample gradients: on the vmap level's physical values)
    pf.jacfwd(pf.jacrev(f))(x[0])
    pf.vmap(pf.vmap(pf.grad(f)))(x[None])  # (not inside two vmap levels)
    pf.grad(lambda a: pf.vmap(f)(a).sum())(x)  # (a vmap level inside: the top-level shadow)
    with torch.inference_mode():
        pf.grad(f)(x[0])
    with torch.no_grad():
        pf.grad(f)(x[0])
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        pf.grad(f)(x[0])
    assert taken == [1, 2, False, False, 1, False, False, False]


def _edge_cases(lib):
    x = torch.randn(3, dtype=DT)
    with torch.inference_mode():
        xi = torch.randn(3, dtype=DT)
    base = torch.randn(6, dtype=DT, requires_grad=True)
    p = torch.nn.Parameter(torch.randn(3, dtype=DT))
    one = torch.ones(3, dtype=DT)
    out, fn = lib.vjp(torch.sin, x)
    return {
        "inference tensor input": lambda: lib.grad(lambda a: a.sin().sum())(xi),
        "inference tensor jacrev": lambda: lib.jacrev(torch.sin)(xi),
        "view requiring grad": lambda: lib.grad(lambda a: (a ** 3).sum())(base[:3]),
        "parameter": lambda: lib.grad(lambda w: (w * x).sum())(p),
        "one tensor twice": lambda: lib.grad(lambda a, b: (a * b).sum(), argnums=(0, 1))(x, x),
        "dict input": lambda: lib.grad(lambda d: (d["a"] * d["b"]).sum())({"a": x, "b": x * 3}),
        "aux is the input": lambda: lib.grad(lambda a: (a.sum(), a), has_aux=True)(x),
        "constant output": lambda: lib.grad(lambda a: torch.tensor(1.0, dtype=DT))(x),
        "vjp_fn create_graph": lambda: lib.vjp(torch.sin, x)[1](one, create_graph=True),
        "grad over a saved vjp_fn": lambda: lib.grad(lambda v: fn(v)[0].sum())(one),
        "jvp over a saved vjp_fn": lambda: lib.jvp(lambda v: fn(v)[0], (one,), (one,)),
        "seeded dropout": lambda: (torch.manual_seed(0), lib.grad(lambda a: F.dropout(a, 0.5).sum())(x))[1],
    }


@pytest.mark.parametrize("case", list(_edge_cases(tf)))
def test_edge_cases_match_torch_func(case):
    torch.manual_seed(1)
    ours = _edge_cases(pf)[case]()
    torch.manual_seed(1)
    theirs = _edge_cases(tf)[case]()
    for a, b in zip(_flat(ours), _flat(theirs), strict=True):
        assert_close(a, b)
        assert a.requires_grad == b.requires_grad


def test_levels_in_several_threads():
    W1, W2 = _weights("cpu")
    f = lambda a: W2 @ torch.tanh(W1 @ a)  # noqa: E731
    xs = torch.randn(8, 4, dtype=DT)
    want = [tf.jacrev(f)(x) for x in xs]

    def work():
        for _ in range(10):
            for x, w in zip(xs, want):
                assert_close(pf.jacrev(f)(x), w)
                assert_close(pf.grad(lambda a: f(a).sum())(x), w.sum(0))

    assert run_in_threads(work, 4) == []
