"""Reverse mode and its links to plain autograd and torch's global modes.

inference_mode, no_grad / set_grad_enabled around and inside transforms, tensors the
function closes over that require grad, torch.utils.checkpoint, Tensor.backward inside
vmap, in-place writes into tensors made inside the function, has_aux, exception classes
and empty shapes. Oracles: torch.func, plain torch.autograd, the per-example loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import pyfunctorch as pf
from pyfunctorch.errors import ArgumentError, ArgumentTypeError

from conftest import assert_close

DT = torch.float64


def _x(*shape):
    return torch.randn(*shape, dtype=DT)


# -- 1. inference_mode ---------------------------------------------------------------

_SQ = lambda a: (a ** 2).sum()  # noqa: E731
_TR = lambda a: torch.sin(a) * a.sum()  # noqa: E731

INFERENCE_CASES = {
    "grad": lambda L, x: L.grad(_SQ)(x),
    "grad_and_value": lambda L, x: L.grad_and_value(_SQ)(x),
    "vjp": lambda L, x: L.vjp(_TR, x)[1](torch.ones_like(x)),
    "jvp": lambda L, x: L.jvp(_TR, (x,), (torch.ones_like(x),)),
    "vmap_grad": lambda L, x: L.vmap(L.grad(_SQ))(x.reshape(3, 1).repeat(1, 2)),
    "jacrev": lambda L, x: L.jacrev(_TR)(x),
    "jacfwd": lambda L, x: L.jacfwd(_TR)(x),
    "hessian": lambda L, x: L.hessian(lambda a: (torch.sin(a) * a).sum())(x),
    "grad_grad": lambda L, x: L.grad(lambda a: L.grad(_SQ)(a).pow(2).sum())(x),
}


@pytest.mark.parametrize("made_inside", [False, True], ids=["outside_tensor", "inference_tensor"])
@pytest.mark.parametrize("case", list(INFERENCE_CASES))
def test_transforms_under_inference_mode_match_torch_func(case, made_inside):
    # Oracle: torch.func *outside* inference mode. (torch.func under inference mode agrees with it
    # on torch 2.13, but returns zeros on torch 2.11, where pyfunctorch still gives the gradient.)
    fn = INFERENCE_CASES[case]
    base = _x(3)
    want = fn(tf, base * 1 if made_inside else base)
    with torch.inference_mode():
        x = base * 1 if made_inside else base
        got = fn(pf, x)
        assert torch.is_inference_mode_enabled()  # restored after the transform
    assert_close(got, want)
    if torch.__version__ >= "2.13":
        with torch.inference_mode():
            assert_close(fn(tf, base * 1 if made_inside else base), want)  # (the oracle's premise)


def test_results_under_inference_mode_are_not_inference_tensors_as_torch_func():
    x = _x(3)
    with torch.inference_mode():
        ours = [pf.grad(_SQ)(x), pf.jacrev(_TR)(x), pf.jvp(_TR, (x,), (x,))[1]]
        theirs = [tf.grad(_SQ)(x), tf.jacrev(_TR)(x), tf.jvp(_TR, (x,), (x,))[1]]
    assert [t.is_inference() for t in ours] == [t.is_inference() for t in theirs]


def test_vjp_fn_called_under_inference_mode():
    x = _x(3)
    _, fn_ours = pf.vjp(_TR, x)
    _, fn_theirs = tf.vjp(_TR, x)
    with torch.inference_mode():
        assert_close(fn_ours(torch.ones_like(x)), fn_theirs(torch.ones_like(x)))


def test_jvp_ignores_callers_forward_grad_mode_as_torch_func():
    import torch.autograd.forward_ad as fwAD

    x = _x(3)
    with fwAD._set_fwd_grad_enabled(False):
        ours = pf.jvp(torch.sin, (x,), (torch.ones_like(x),))
        theirs = tf.jvp(torch.sin, (x,), (torch.ones_like(x),))
        assert not torch._C._is_fwd_grad_enabled()
    assert_close(ours, theirs)


# -- 2. closed-over tensors that require grad keep their graph -------------------------


def _W():
    return (torch.eye(3, dtype=DT) + 0.1 * torch.arange(9, dtype=DT).reshape(3, 3)).requires_grad_()


CLOSURE_CASES = {
    "grad": lambda L, W, x: L.grad(lambda a: torch.tanh(a @ W).sum())(x).pow(2).sum() + W.sum(),
    "grad_and_value": lambda L, W, x: sum(t.pow(2).sum() for t in L.grad_and_value(lambda a: torch.tanh(a @ W).sum())(x)),
    "vjp": lambda L, W, x: L.vjp(lambda a: torch.tanh(a @ W), x)[1](torch.ones(3, dtype=DT))[0].pow(2).sum(),
    "vjp_output": lambda L, W, x: L.vjp(lambda a: torch.tanh(a @ W), x)[0].pow(2).sum(),
    "vmap_grad": lambda L, W, x: L.vmap(L.grad(lambda a: torch.tanh(a @ W).sum()))(torch.stack([x, 2 * x])).pow(2).sum(),
    "jacrev": lambda L, W, x: L.jacrev(lambda a: torch.tanh(a @ W))(x).pow(2).sum(),
    "jacfwd": lambda L, W, x: L.jacfwd(lambda a: torch.tanh(a @ W))(x).pow(2).sum(),
    "hessian": lambda L, W, x: L.hessian(lambda a: torch.tanh(a @ W).sum())(x).pow(2).sum(),
    "grad_argnums_other": lambda L, W, x: L.grad(lambda a, w: torch.tanh(a @ w).sum())(x, W).pow(2).sum(),
    "grad_of_grad": lambda L, W, x: L.grad(lambda a: L.grad(lambda b: torch.tanh(b @ W).sum())(a).pow(2).sum())(x).sum(),
}


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("case", list(CLOSURE_CASES))
def test_closed_over_tensor_keeps_its_graph_as_torch_func(case, x_requires_grad):
    fn = CLOSURE_CASES[case]
    base = _x(3)
    grads = []
    for L in (tf, pf):
        W = _W()
        x = base.clone().requires_grad_(x_requires_grad)
        fn(L, W, x).backward()
        grads.append((W.grad, x.grad))
    assert_close(grads[1][0], grads[0][0])
    if x_requires_grad:
        assert_close(grads[1][1], grads[0][1])


def test_gradient_penalty_matches_plain_autograd():
    x = _x(3)
    W = _W()
    g = pf.grad(lambda a: torch.tanh(a @ W).sum())(x)
    (g.pow(2).sum() + W.sum()).backward()
    W2 = _W()
    xr = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(torch.tanh(xr @ W2).sum(), xr, create_graph=True)
    (g2.pow(2).sum() + W2.sum()).backward()
    assert_close(W.grad, W2.grad)
    assert not torch.allclose(W.grad, torch.ones_like(W.grad))


# -- 3. torch.utils.checkpoint ----------------------------------------------------------

_CK_INNER = lambda b: torch.sin(b).sum() * b.exp().sum()  # noqa: E731

CHECKPOINT_CASES = {
    "grad": lambda L, f, x: L.grad(f)(x),
    "hessian": lambda L, f, x: L.hessian(f)(x),
    "jacrev_jacrev": lambda L, f, x: L.jacrev(L.jacrev(f))(x),
    "jacrev_grad": lambda L, f, x: L.jacrev(L.grad(f))(x),
    "grad_grad": lambda L, f, x: L.grad(lambda a: L.grad(f)(a).sum())(x),
    "vmap_grad": lambda L, f, x: L.vmap(L.grad(f))(torch.stack([x, -x])),
    "vmap_hessian": lambda L, f, x: L.vmap(L.hessian(f))(torch.stack([x, -x])),
    "jvp_grad": lambda L, f, x: L.jvp(L.grad(f), (x,), (torch.ones_like(x),))[1],
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_non_reentrant_higher_derivatives(case):
    # torch.func refuses saved-tensor hooks; oracle: torch.func on the same function
    # without checkpoint (checkpointing must not change any derivative)
    x = _x(3)
    fn = CHECKPOINT_CASES[case]
    ours = fn(pf, lambda a: checkpoint(_CK_INNER, a, use_reentrant=False), x)
    assert_close(ours, fn(tf, _CK_INNER, x))


def test_checkpoint_non_reentrant_plain_double_backward_through_grad():
    # grad result through checkpoint stays linked to a closed-over weight (plain autograd oracle)
    x = _x(3)
    w = _x(3).requires_grad_()
    g = pf.grad(lambda a: checkpoint(lambda b: (torch.sin(b * w)).sum(), a, use_reentrant=False))(x)
    g.sum().backward()
    assert_close(w.grad, _plain_weight_grad_of_sin_grad(x, w))


def _plain_weight_grad_of_sin_grad(x, w):
    """d/dw of sum(d/dx sum(sin(x * w))), by plain autograd (the oracle of the tests above and below)."""
    w2 = w.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(torch.sin(xr * w2).sum(), xr, create_graph=True)
    g2.sum().backward()
    return w2.grad


@pytest.mark.parametrize("transform", ["grad", "hessian", "jacrev"])
def test_checkpoint_reentrant_raises_runtime_error_as_torch_func(transform):
    x = _x(3)
    f = lambda a: checkpoint(_CK_INNER, a, use_reentrant=True)  # noqa: E731
    with pytest.raises(RuntimeError):
        getattr(tf, transform)(f)(x)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        getattr(pf, transform)(f)(x)


def test_user_detach_still_detaches_every_level():
    x = _x(3)
    f = lambda a: (a * a.detach() * a).sum()  # noqa: E731
    assert_close(pf.hessian(f)(x), tf.hessian(f)(x))
    assert_close(pf.grad(lambda a: pf.grad(f)(a).sum())(x), tf.grad(lambda a: tf.grad(f)(a).sum())(x))


def _ck_buffer(b):
    # a buffer made inside, filled in place: it belongs to the levels live where it is made
    acc = torch.zeros(b.shape, dtype=b.dtype, device=b.device)
    acc += b.sin()
    c = b.clone()
    c.mul_(2)
    return (acc * b.exp()).sum() + (b * b.detach()).sum() + (c * b).sum()


def _jvp_of_vjp_fn(L, f, x):
    def g(a):
        out, fn = L.vjp(f, a)
        return fn(torch.ones_like(out))[0]

    return L.jvp(g, (x,), (torch.ones_like(x),))[1]


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES) + ["jvp_vjp_fn"])
def test_checkpoint_of_a_function_filling_a_buffer(case):
    # checkpoint's recomputation runs in its unpack hook, for vjp_fn after the vjp level ended:
    # the buffer made there belonged to the live levels only, the recomputed graph saved other
    # tensors than the first run, and checkpoint paired them by position -- hessian, jacrev(jacrev)
    # and jvp of vjp_fn were silently wrong (half the answer in the last). Oracle: torch.func
    # without checkpoint (under vmap, which torch.func refuses for the in-place buffer: the loop)
    x = _x(3)
    ck = lambda a: checkpoint(_ck_buffer, a, use_reentrant=False)  # noqa: E731
    if case == "jvp_vjp_fn":
        assert_close(_jvp_of_vjp_fn(pf, ck, x), _jvp_of_vjp_fn(tf, _ck_buffer, x))
        return
    fn = CHECKPOINT_CASES[case]
    ours = fn(pf, ck, x)
    if case.startswith("vmap"):
        inner = case.split("_", 1)[1]
        want = torch.stack([CHECKPOINT_CASES[inner](tf, _ck_buffer, xi) for xi in (x, -x)])
    else:
        want = fn(tf, _ck_buffer, x)
    assert_close(ours, want)


def _ck_sin_times(t):
    return t.sin() * t


@pytest.mark.parametrize("case", ["vmap_B1", "vmap_B3", "hooked", "vmap_B1_float32"])
def test_checkpoint_inside_jvp_differentiated_after_the_jvp_ended(device, case):
    """grad of jvp of a checkpointed f: the grad level's backward runs after the jvp level ended,
    when torch's forward AD has dropped the tangents, so checkpoint's recomputation computed (and
    saved) less than the first run and raised CheckpointError (plain torch does too when the
    backward follows its dual level; torch.func refuses checkpoint). The region's saved values
    are kept there instead. Oracle: d/dx of jvp(x sin x, 1) = 2 cos x - x sin x."""
    dtype = torch.float32 if case.endswith("float32") else torch.float64
    B = 1 if "B1" in case else 3
    x = torch.randn(B, 2, 1, dtype=dtype, device=device)

    def f(a):
        return checkpoint(_ck_sin_times, a, use_reentrant=False)

    def g(a):
        if case == "hooked":  # a hook on an intermediate: the grad level differentiates its wrappers
            a = a * 1.0
            a.register_hook(lambda t: t)
        return pf.jvp(f, (a,), (torch.ones_like(a),))[1].sum()

    got = pf.grad(g)(x) if case == "hooked" else pf.vmap(pf.grad(g))(x)
    assert_close(got, 2 * x.cos() - x * x.sin())


@pytest.mark.parametrize("compiled", [False, True])
def test_checkpoint_inside_vmap_differentiated_by_an_outer_vjp(device, compiled):
    """vjp of vmap of a checkpointed f: vjp_fn's backward runs after the vmap level ended; traced
    by pyfunctorch.compile (where the vjp level differentiates its wrappers) the recomputation met
    the ended level's wrappers (EscapedTensorError). Oracle: d/dx (x sin x) = sin x + x cos x."""
    import warnings

    x = torch.randn(2, 3, dtype=torch.float64, device=device)

    def run(a):
        out, fn = pf.vjp(pf.vmap(lambda t: checkpoint(_ck_sin_times, t, use_reentrant=False)), a)
        return out, fn(torch.ones_like(out))[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (checkpoint's and the compile fallback's notes)
        out, g = pf.compile(run)(x) if compiled else run(x)
    assert_close(out, x.sin() * x)
    assert_close(g, x.sin() + x * x.cos())


def test_checkpoint_recomputed_in_a_lower_levels_backward(device):
    """hessian of vjp of vjp of a checkpointed f: the region's saves at a lower level were
    recomputed in that level's backward, after the higher levels had ended, so the recomputation
    saved fewer tensors than the first run (CheckpointError; fuzzer seeds 5460, 314900). A save
    made under a higher live level is kept. Oracle: torch.func without checkpoint."""
    x = torch.randn(2, dtype=torch.float64, device=device)

    def make(ns, ck):
        def f(t):
            h = checkpoint(_ck_sin_times, t, use_reentrant=False) if ck else _ck_sin_times(t)
            return 1 / (h ** 2 + 1)

        def inner(a):
            out, fn = ns.vjp(f, a)
            return fn(torch.ones_like(out))[0]

        def vv(a):
            out, fn = ns.vjp(inner, a)
            return fn(torch.ones_like(out))[0].sum()

        return ns.hessian(vv)

    assert_close(make(pf, True)(x), make(tf, False)(x))


# -- 3b. a user's saved-tensor hooks that detach --------------------------------------
# torch calls a pack hook under no_grad and re-attaches the saved tensor's graph when it
# unpacks it, so in plain torch what the hook computes (a detach, a clone) changes no
# derivative (torch.func refuses saved-tensor hooks). Under nested levels the hook's ops must
# be recorded below the level that saves, and a detach inside the hook is autograd's own (cuts
# only that level): grad(grad(f)) through such a hook was 0.


def _detach_helper(t):
    return t.detach().clone()


class _PackObject:
    def __call__(self, t):
        return t.detach()


class _PackMethod:
    def pack(self, t):
        return _detach_helper(t)


_PACK_HOOKS = {
    "lambda": lambda t: t.detach(),
    "helper": lambda t: _detach_helper(t),
    "callable_object": _PackObject(),
    "bound_method": _PackMethod().pack,
    "clone": lambda t: t.clone(),
    "arithmetic": lambda t: t * 1.0,
}


def _hooked(pack, inner=_CK_INNER):
    def f(b):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return inner(b)

    return f


@pytest.mark.parametrize("hook", list(_PACK_HOOKS))
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_user_pack_hook_that_detaches_changes_no_derivative(case, hook):
    x = _x(3)
    fn = CHECKPOINT_CASES[case]
    assert_close(fn(pf, _hooked(_PACK_HOOKS[hook]), x), fn(tf, _CK_INNER, x))


@pytest.mark.parametrize("op", [torch.sin, torch.exp, torch.tanh, lambda a: a * a])
def test_user_pack_hook_grad_grad_matches_plain_autograd(op):
    # oracle: plain torch's double backward through the same hooks
    x = _x(4)
    f = _hooked(lambda t: t.detach(), lambda b: op(b).sum())
    xr = x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), xr)
    assert_close(pf.grad(lambda a: pf.grad(f)(a).sum())(x), g2)


@pytest.mark.parametrize("hook", ["lambda", "helper", "clone"])
@pytest.mark.parametrize("case", ["grad_grad", "hessian", "jacrev_grad", "vmap_grad"])
def test_user_pack_hook_pushed_around_the_transform(case, hook):
    x = _x(3)
    fn = CHECKPOINT_CASES[case]
    with torch.autograd.graph.saved_tensors_hooks(_PACK_HOOKS[hook], lambda t: t):
        ours = fn(pf, _CK_INNER, x)
        assert torch._C._autograd._top_saved_tensors_default_hooks(True)[0] is _PACK_HOOKS[hook]  # (ours popped)
    assert_close(ours, fn(tf, _CK_INNER, x))
    assert torch._C._autograd._top_saved_tensors_default_hooks(True) is None  # the transform's own push is gone


def test_user_pack_hook_around_plain_autograd_of_a_transform_result():
    # hooks pushed around: the saved tensors of the user's own graph (a closed-over weight)
    # are packed and unpacked by the user's hooks, and its backward matches plain autograd
    x = _x(3)
    packed = []

    def pack(t):
        packed.append(type(t))
        return t.clone()

    w = _x(3).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        g = pf.grad(lambda a: torch.sin(a * w).sum())(x)
    g.sum().backward()
    assert_close(w.grad, _plain_weight_grad_of_sin_grad(x, w))
    assert packed


def test_detach_in_the_function_under_hooks_still_detaches_every_level():
    # only a detach inside the pack hook is autograd's; the function's own cuts every level
    x = _x(3)
    f = lambda a: (a * a.detach() * a).sum()  # noqa: E731
    assert_close(pf.hessian(_hooked(lambda t: t.detach(), f))(x), tf.hessian(f)(x))


# -- 4. grad mode: no_grad / enable_grad / set_grad_enabled ------------------------------


def _inner_no_grad(L):
    def h(x):
        with torch.no_grad():
            c = L.grad(lambda y: y ** 3)(x)
        return c * x

    return h


def _inner_enable_grad(L):
    def h(x):
        with torch.no_grad():
            with torch.enable_grad():
                c = L.grad(lambda y: y ** 3)(x)
        return c * x

    return h


def _inner_set_grad_enabled(L):
    def h(x):
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            c = L.grad(lambda y: y ** 3)(x)
        finally:
            torch.set_grad_enabled(prev)
        return c * x

    return h


def _inner_no_grad_vjp(L):
    def h(x):
        with torch.no_grad():
            out, fn = L.vjp(lambda y: y ** 3, x)
            c = fn(torch.ones_like(x))[0]
        return (c * x + out).sum()

    return h


def _inner_no_grad_plain(L):
    def h(x):
        with torch.no_grad():
            c = x ** 2
        return c * x

    return h


@pytest.mark.parametrize("make", [_inner_no_grad, _inner_enable_grad, _inner_set_grad_enabled, _inner_no_grad_vjp,
                                  _inner_no_grad_plain])
def test_grad_mode_inside_the_function_as_torch_func(make):
    x = torch.tensor(1.5, dtype=DT)
    assert_close(pf.grad(make(pf))(x), tf.grad(make(tf))(x))


def test_inner_no_grad_value_is_the_constant():
    x = torch.tensor(1.5, dtype=DT)
    assert_close(pf.grad(_inner_no_grad(pf))(x), torch.tensor(6.75, dtype=DT))


OUTER_NO_GRAD = {
    "grad": lambda L, x: (L.grad(lambda a: (a ** 3).sum())(x),),
    "grad_and_value": lambda L, x: L.grad_and_value(lambda a: (a ** 3).sum())(x),
    "vjp": lambda L, x: (L.vjp(lambda a: a ** 3, x)[0], L.vjp(lambda a: a ** 3, x)[1](torch.ones_like(x))[0]),
    "jacrev": lambda L, x: (L.jacrev(lambda a: a ** 3)(x),),
    "vmap_grad": lambda L, x: (L.vmap(L.grad(lambda a: (a ** 3).sum()))(x[None]),),
    "hessian": lambda L, x: (L.hessian(lambda a: (a ** 3).sum())(x),),
}


@pytest.mark.parametrize("mode", ["no_grad", "set_grad_enabled_false"])
@pytest.mark.parametrize("case", list(OUTER_NO_GRAD))
def test_outer_no_grad_still_differentiates_results_detached(case, mode):
    base = _x(3)
    res = []
    for L in (tf, pf):
        x = base.clone().requires_grad_()
        ctx = torch.no_grad() if mode == "no_grad" else torch.set_grad_enabled(False)
        with ctx:
            res.append(OUTER_NO_GRAD[case](L, x))
    for ours, theirs in zip(res[1], res[0]):
        assert_close(ours.detach(), theirs.detach())
        assert ours.requires_grad == theirs.requires_grad


def test_vjp_fn_under_no_grad_gives_detached_result_and_outside_a_linked_one():
    base = _x(3)
    out = []
    for L in (tf, pf):
        x = base.clone().requires_grad_()
        _, fn = L.vjp(lambda a: a ** 3, x)
        with torch.no_grad():
            inside = fn(torch.ones_like(x))[0]
        outside = fn(torch.ones_like(x))[0]
        out.append((inside.requires_grad, outside.requires_grad))
    assert out[1] == out[0]


# -- 5. Tensor.backward inside vmap --------------------------------------------------------


def test_backward_in_vmap_shared_leaf_grad_is_per_example_as_the_loop():
    x = _x(4, 3)
    w = _x(3).requires_grad_()

    def f(xi):
        w.grad = None
        torch.sin(xi * w).sum().backward()
        return w.grad * 1

    ours = pf.vmap(f)(x)
    loop = torch.stack([f(xi) for xi in x])
    assert_close(ours, loop)


def test_backward_in_vmap_leaves_the_loops_accumulation_behind():
    x = _x(4, 3)
    w = _x(3).requires_grad_()
    w.grad = torch.ones(3, dtype=DT)

    def f(xi):
        (torch.sin(xi * w)).sum().backward()
        return xi * 2

    pf.vmap(f)(x)
    ours = w.grad.clone()
    w.grad = torch.ones(3, dtype=DT)
    for xi in x:
        f(xi)
    assert_close(ours, w.grad)
    assert type(ours) is torch.Tensor


def test_backward_in_vmap_batched_input_and_gradient_argument():
    x = _x(4, 3).requires_grad_()
    v = _x(4, 3)
    pf.vmap(lambda xi, vi: (torch.sin(xi).backward(vi), xi * 1)[1])(x, v)
    ours = x.grad.clone()
    x.grad = None
    for xi, vi in zip(x, v):
        torch.sin(xi).backward(vi)
    assert_close(ours, x.grad)


def test_backward_in_vmap_with_inputs_argument():
    x = _x(4, 3)
    w = _x(3).requires_grad_()
    b = _x(3).requires_grad_()

    def f(xi):
        w.grad = None
        (xi * w + b).pow(2).sum().backward(inputs=[w])
        return w.grad * 1

    ours = pf.vmap(f)(x)
    assert b.grad is None
    assert_close(ours, torch.stack([f(xi) for xi in x]))
    assert b.grad is None


def test_backward_in_vmap_with_data_dependent_fallback_as_the_loop():
    x = _x(4, 3)
    w = _x(3).requires_grad_()

    def f(xi):
        w.grad = None
        (xi * w).sum().backward()
        return w.grad * 2 if xi.sum() > 0 else w.grad * 1

    assert_close(pf.vmap(f)(x), torch.stack([f(xi) for xi in x]))

    def g(xi):
        torch.sin(xi * w).sum().backward()
        return xi * 2 if xi.sum() > 0 else xi

    w.grad = None
    pf.vmap(g)(x)
    ours = w.grad.clone()
    w.grad = None
    for xi in x:
        g(xi)
    assert_close(ours, w.grad)


def test_backward_in_vmap_restores_grad_when_the_function_raises():
    x = _x(4, 3)
    w = _x(3).requires_grad_()
    before = torch.full((3,), 7.0, dtype=DT)
    w.grad = before.clone()

    def f(xi):
        (xi * w).sum().backward()
        raise KeyError("boom")

    with pytest.raises(KeyError):
        pf.vmap(f)(x)
    assert_close(w.grad, before)


# -- 6. in-place writes into tensors created inside the function ------------------------

INPLACE_CASES = {
    "clone_add_": lambda x, y: x.clone().add_(y).pow(2).sum(),
    "clone_mul_": lambda x, y: (x.clone().mul_(y) ** 2).sum(),
    "clone_view_copy_": lambda x, y: _view_copy(x.clone(), y),
    "new_zeros": lambda x, y: (x.new_zeros(3).add_(y) ** 2).sum(),
    "new_empty_copy_": lambda x, y: (x.new_empty(3).copy_(y) * x).sum(),
    "zeros_like": lambda x, y: (torch.zeros_like(x).add_(y) ** 2).sum(),
    "detach_clone": lambda x, y: (x.detach().clone().mul_(y) ** 2).sum(),
    "nondiff_arg_add_": lambda x, y: (x.add_(y) ** 2).sum(),
}


def _view_copy(buf, y):
    buf[1:].copy_(y[:2] * 3)
    return (buf * y).sum()


@pytest.mark.parametrize("case", list(INPLACE_CASES))
def test_inplace_write_into_tensor_made_inside_as_torch_func(case):
    f = INPLACE_CASES[case]
    x0, y = _x(3), _x(3)
    x1, x2 = x0.clone(), x0.clone()
    assert_close(pf.grad(f, argnums=1)(x1, y), tf.grad(f, argnums=1)(x2, y))
    assert_close(x1, x2)  # the same (possibly mutated) argument afterwards


@pytest.mark.parametrize("case", ["clone_add_", "clone_mul_", "new_zeros"])
def test_inplace_write_into_tensor_made_inside_jacrev_vjp(case):
    f = INPLACE_CASES[case]
    x, y = _x(3), _x(3)
    assert_close(pf.jacrev(f, argnums=1)(x, y), tf.jacrev(f, argnums=1)(x, y))
    assert_close(pf.vmap(pf.grad(f, argnums=1))(x.expand(2, 3), torch.stack([y, -y])),
                 tf.vmap(tf.grad(f, argnums=1))(x.expand(2, 3), torch.stack([y, -y])))


def test_inplace_write_with_kwargs_tensor():
    x, y = _x(3), _x(3)
    f = lambda y, *, base: (base.clone().mul_(y) ** 2).sum()  # noqa: E731
    assert_close(pf.grad(f)(y, base=x), tf.grad(f)(y, base=x))


def test_inplace_write_into_clone_of_captured_tensor_as_torch_func():
    W = _x(3)
    f = lambda y: (W.clone().add_(y) ** 2).sum()  # noqa: E731
    y = _x(3)
    before = W.clone()
    assert_close(pf.grad(f)(y), tf.grad(f)(y))
    assert_close(pf.jacrev(lambda y: W.clone().mul_(y))(y), tf.jacrev(lambda y: W.clone().mul_(y))(y))
    assert_close(W, before)


def test_inplace_write_into_clone_of_captured_weight_keeps_its_graph():
    y = _x(3)
    grads = []
    for L in (tf, pf):
        W = _x(3).requires_grad_() if not grads else grads[0][1].detach().clone().requires_grad_()
        g = L.grad(lambda v: (W.clone().mul_(v) ** 2).sum())(y)
        g.sum().backward()
        grads.append((W.grad, W))
    assert_close(grads[1][0], grads[0][0])


def test_clone_of_captured_tensor_stays_unbatched_in_vmap_as_torch_func():
    # vmap levels do not lift such clones: a batched write into one raises, as in torch.func
    W = _x(3)
    x = _x(4, 3)
    f = lambda xi: W.clone().add_(xi) * 2  # noqa: E731
    with pytest.raises(RuntimeError):
        tf.vmap(f)(x)
    with pytest.raises(RuntimeError, match="not batched"):
        pf.vmap(f)(x)
    g = lambda xi: (W.clone().add_(xi) ** 2).sum()  # noqa: E731  (inside grad: lifted there)
    with pytest.raises(RuntimeError):
        tf.vmap(tf.grad(g))(x)
    with pytest.raises(RuntimeError, match="not batched"):
        pf.vmap(pf.grad(g))(x)


def test_write_of_derivative_into_captured_tensor_raises_as_torch_func():
    W = _x(3)
    f = lambda y: (W.add_(y) ** 2).sum()  # noqa: E731
    with pytest.raises(RuntimeError):
        tf.grad(f)(_x(3))
    before = W.clone()
    with pytest.raises(RuntimeError, match="came from outside the function"):
        pf.grad(f)(_x(3))
    assert_close(W, before)


# -- 7. has_aux -------------------------------------------------------------------------

AUX_VALUES = {
    "int": lambda a: 3,
    "float": lambda a: 1.5,
    "none": lambda a: None,
    "str": lambda a: "tag",
    "bool": lambda a: True,
    "tuple_mixed": lambda a: (a * 2, 2),
    "tensor": lambda a: a * 2,
    "list": lambda a: [a[:1], a.sum()],
    "dict_nested": lambda a: {"u": [a.exp(), (a.cos(),)]},
    "empty_tuple": lambda a: (),
    "constant_tensor": lambda a: torch.ones(2, dtype=DT),
}

AUX_TRANSFORMS = {
    "grad": lambda L, f, g, x: L.grad(f, has_aux=True)(x)[1],
    "grad_and_value": lambda L, f, g, x: L.grad_and_value(f, has_aux=True)(x)[1][1],
    "vjp": lambda L, f, g, x: L.vjp(g, x, has_aux=True)[2],
    "jvp": lambda L, f, g, x: L.jvp(g, (x,), (torch.ones_like(x),), has_aux=True)[2],
    "jacrev": lambda L, f, g, x: L.jacrev(g, has_aux=True)(x)[1],
    "jacfwd": lambda L, f, g, x: L.jacfwd(g, has_aux=True)(x)[1],
    "vmap_grad": lambda L, f, g, x: L.vmap(L.grad(f, has_aux=True))(torch.stack([x, 2 * x]))[1],
    "grad_of_aux": lambda L, f, g, x: L.grad(lambda a: sum(t.sum() for t in torch.utils._pytree.tree_leaves(
        L.grad(f, has_aux=True)(a)[1])) + a.sum())(x),
}


def _outcome(fn):
    try:
        return "ok", fn()
    except RuntimeError as e:
        return "RuntimeError", e


@pytest.mark.parametrize("aux", list(AUX_VALUES))
@pytest.mark.parametrize("transform", list(AUX_TRANSFORMS))
def test_has_aux_matches_torch_func(transform, aux):
    make_aux = AUX_VALUES[aux]
    x = _x(3)
    f = lambda a: ((a ** 2).sum(), make_aux(a))  # noqa: E731
    g = lambda a: (a ** 2, make_aux(a))  # noqa: E731
    run = AUX_TRANSFORMS[transform]
    theirs = _outcome(lambda: run(tf, f, g, x))
    ours = _outcome(lambda: run(pf, f, g, x))
    assert ours[0] == theirs[0], (ours, theirs)
    if ours[0] == "ok":
        assert_close(ours[1], theirs[1])
    else:
        assert "aux" in str(ours[1])


@pytest.mark.parametrize("out", ["single", "triple", "list_pair"])
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp"])
def test_has_aux_output_must_be_a_tuple_pair_as_torch_func(transform, out):
    x = _x(3)
    make = {"single": lambda a: a.sum(), "triple": lambda a: (a.sum(), a, a), "list_pair": lambda a: [a.sum(), a]}[out]
    for L, err in ((tf, RuntimeError), (pf, ArgumentError)):
        with pytest.raises(err):
            if transform == "grad":
                L.grad(make, has_aux=True)(x)
            elif transform == "vjp":
                L.vjp(make, x, has_aux=True)
            else:
                L.jvp(make, (x,), (x,), has_aux=True)


# -- 8. exception classes ----------------------------------------------------------------

_f2 = lambda a, b: (a * b).sum()  # noqa: E731

ERROR_CASES = {
    # name: (call, the class pyfunctorch raised before, which must still catch it)
    "argnums_out_of_range": (lambda L, x: L.grad(_f2, argnums=2)(x, x), ValueError),
    "argnums_negative_out_of_range": (lambda L, x: L.grad(_f2, argnums=-3)(x, x), ValueError),
    "argnums_duplicate": (lambda L, x: L.grad(_f2, argnums=(0, 0))(x, x), ValueError),
    "argnums_float": (lambda L, x: L.grad(_f2, argnums=1.0)(x, x), TypeError),
    "argnums_list": (lambda L, x: L.grad(_f2, argnums=[0])(x, x), TypeError),
    "argnums_empty": (lambda L, x: L.grad(_f2, argnums=())(x, x), TypeError),
    "jacrev_argnums": (lambda L, x: L.jacrev(_f2, argnums=2)(x, x), ValueError),
    "jacfwd_argnums": (lambda L, x: L.jacfwd(_f2, argnums=2)(x, x), ValueError),
    "vjp_fn_structure": (lambda L, x: L.vjp(lambda a: (a, a), x)[1](x), ValueError),
    "vjp_fn_shape": (lambda L, x: L.vjp(lambda a: a, x)[1](torch.ones(4, dtype=DT)), ValueError),
    "jvp_primals_not_tuple": (lambda L, x: L.jvp(torch.sin, x, (x,)), TypeError),
    "jvp_tangents_structure": (lambda L, x: L.jvp(torch.sin, (x,), (x, x)), ValueError),
    "jvp_tangent_not_tensor": (lambda L, x: L.jvp(torch.sin, (x,), (1.0,)), TypeError),
    "jvp_output_not_tensor": (lambda L, x: L.jvp(lambda a: 1.0, (x,), (x,)), TypeError),
    "grad_non_scalar": (lambda L, x: L.grad(lambda a: a)(x), ValueError),
    "grad_output_not_tensor": (lambda L, x: L.grad(lambda a: 1.0)(x), TypeError),
    "grad_integer_input": (lambda L, x: L.grad(lambda a: a.sum())(torch.ones(2, dtype=torch.long)), TypeError),
    "vjp_output_not_tensor": (lambda L, x: L.vjp(lambda a: 1.0, x), TypeError),
    "jacrev_empty_output": (lambda L, x: L.jacrev(lambda a: ())(x), ValueError),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_argument_errors_are_runtime_errors_as_torch_func(case):
    call, old_class = ERROR_CASES[case]
    x = _x(3)
    with pytest.raises(RuntimeError):
        call(tf, x)
    with pytest.raises(RuntimeError) as info:
        call(pf, x)
    assert isinstance(info.value, old_class)
    assert isinstance(info.value, ArgumentError)


def test_vjp_fn_non_tensor_cotangent_is_a_type_error_as_torch_func():
    x = _x(3)
    with pytest.raises(TypeError):
        tf.vjp(lambda a: a, x)[1](1.0)
    with pytest.raises(ArgumentTypeError) as info:
        pf.vjp(lambda a: a, x)[1](1.0)
    assert isinstance(info.value, (RuntimeError, ValueError))


def test_errors_module_is_a_leaf():
    import ast
    import pathlib

    src = pathlib.Path(pf.__file__).with_name("errors.py").read_text()
    mods = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert mods <= {"__future__", "torch"}, mods


# -- 9. empty shapes ------------------------------------------------------------------------

EMPTY_JAC_CASES = {
    "slice0": (lambda a: a[:0], lambda: (_x(3),)),
    "zeros_0x2": (lambda a: a.sum() * torch.zeros(0, 2, dtype=DT), lambda: (_x(3),)),
    "empty_input": (lambda a: a * 2, lambda: (torch.zeros(0, dtype=DT),)),
    "empty_input_scalar_out": (lambda a: a.sum(), lambda: (torch.zeros(0, dtype=DT),)),
    "tuple_with_empty": (lambda a: (a[:0], a.sum()), lambda: (_x(3),)),
    "empty_pytree_input": (lambda a: a["u"] * 2, lambda: ({"u": torch.zeros(0, dtype=DT)},)),
}


@pytest.mark.parametrize("jac", ["jacrev", "jacfwd", "hessian"])
@pytest.mark.parametrize("case", list(EMPTY_JAC_CASES))
def test_jacobians_with_empty_shapes_as_torch_func(case, jac):
    f, make_args = EMPTY_JAC_CASES[case]
    args = make_args()
    ours = getattr(pf, jac)(f)(*args)
    theirs = getattr(tf, jac)(f)(*args)
    assert torch.utils._pytree.tree_structure(ours) == torch.utils._pytree.tree_structure(theirs)
    for o, t in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)):
        assert o.shape == t.shape
        assert_close(o, t)


_W34 = torch.randn(3, 4, dtype=DT)
BATCH0_FUNCS = {
    "sum": lambda a: (a ** 2).sum(),
    "mean": lambda a: (a ** 2).mean(),
    "matmul": lambda a: torch.tanh(a @ _W34).sum(),
    "linear": lambda a: F.linear(a, _W34.T).relu().sum(),
    "softmax": lambda a: a.softmax(0)[0],
    "logsumexp": lambda a: a.logsumexp(0),
    "index": lambda a: a[1] * a[0],
    "cumsum": lambda a: a.cumsum(0).sum(),
}


@pytest.mark.parametrize("name", list(BATCH0_FUNCS))
def test_vmap_grad_batch_size_zero_as_torch_func(name):
    f = BATCH0_FUNCS[name]
    x = torch.zeros(0, 3, dtype=DT)
    ours = pf.vmap(pf.grad(f))(x)
    theirs = tf.vmap(tf.grad(f))(x)
    assert ours.shape == theirs.shape == (0, 3)
    assert_close(pf.vmap(f)(x), tf.vmap(f)(x))


def test_vmap_grad_batch_size_zero_two_argnums():
    f = lambda a, b: (a * b).sum()  # noqa: E731
    x = torch.zeros(0, 3, dtype=DT)
    ours = pf.vmap(pf.grad(f, argnums=(0, 1)))(x, x)
    theirs = tf.vmap(tf.grad(f, argnums=(0, 1)))(x, x)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
