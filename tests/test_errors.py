"""Bad input gets a clear ValueError/TypeError before the user's function runs; exceptions
from the user's function propagate unchanged and leave no level behind; wrappers print
as their value."""

from __future__ import annotations

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import pyfunctorch as pf
from pyfunctorch import _core

from conftest import CallCounter, assert_close

DT = torch.float64


def _stack_is_empty():
    return _core.interpreter_stack() == []


def _transforms_still_work():
    """After an error: no level left behind, and every transform works normally."""
    assert _stack_is_empty()
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    assert_close(pf.vmap(torch.sin)(x), torch.sin(x))
    assert_close(pf.grad(lambda x: x.sin().sum())(x), x.cos())
    assert_close(pf.jvp(torch.exp, (x,), (torch.ones_like(x),))[1], x.exp())
    assert_close(pf.vmap(pf.grad(torch.sin))(x), x.cos())
    # torch's single forward-AD level was released
    with fwAD.dual_level():
        pass
    assert _stack_is_empty()


# ----------------------------------------------------------------------------------------
# vmap input validation: raised before the function runs
# ----------------------------------------------------------------------------------------

X = torch.randn(3, 4, dtype=DT)
Y = torch.randn(5, 4, dtype=DT)


def _body(*args, **kwargs):
    return torch.utils._pytree.tree_leaves(args)[0] * 2


VMAP_BAD_INPUTS = [
    # (id, in_dims, args, exception, message regex)
    ("in_dims_too_short", (0,), (X, X), ValueError, r"in_dims.*1.*2 positional"),
    ("in_dims_too_long", (0, 0, 0), (X, X), ValueError, r"in_dims.*3.*2 positional"),
    ("in_dims_nested_length", ((0, 0),), ((X,),), ValueError, r"in_dims.*structure|length"),
    ("in_dims_tuple_for_tensor", ((0, 0),), (X,), ValueError, r"in_dims.*tuple"),
    ("in_dims_dict_keys", ({"b": 0},), ({"a": X},), ValueError, r"in_dims.*keys"),
    ("in_dims_dict_for_tuple", ({"a": 0},), ((X,),), ValueError, r"in_dims.*dict"),
    ("in_dims_list_top_level", [0], (X,), ValueError, r"in_dims.*tuple"),
    ("in_dims_float", 0.5, (X,), ValueError, r"in_dims.*int"),
    ("in_dims_str", ("0",), (X,), ValueError, r"in_dims.*int"),
    ("bdim_out_of_range", 2, (X,), ValueError, r"out of range.*\(3, 4\)"),
    ("bdim_out_of_range_negative", -3, (X,), ValueError, r"out of range"),
    ("bdim_out_of_range_nested", ((0, 5),), ((X, X),), ValueError, r"out of range"),
    ("batch_scalar_tensor", 0, (torch.tensor(1.0),), ValueError, r"out of range|0-dim|scalar"),
    ("different_batch_sizes", 0, (X, Y), ValueError, r"(?s)different batch sizes.*3.*5"),
    ("different_batch_sizes_in_dims", (1, 0), (X, X), ValueError, r"different batch sizes"),
    ("no_batched_input_none", None, (X,), ValueError, r"no input is batched|at least one"),
    ("no_batched_input_all_none", (None, None), (X, X), ValueError, r"no input is batched|at least one"),
    ("no_tensor_inputs", 0, (3,), ValueError, r"tensor"),
    ("batch_a_non_tensor", (0, 0), (X, 2.0), ValueError, r"(?i)float.*tensor|tensor.*None"),
]


@pytest.mark.parametrize("case", VMAP_BAD_INPUTS, ids=[c[0] for c in VMAP_BAD_INPUTS])
def test_vmap_bad_in_dims_raise_before_running(case):
    _, in_dims, args, exc, msg = case
    f = CallCounter(_body)
    with pytest.raises(exc, match=msg):
        pf.vmap(f, in_dims=in_dims)(*args)
    assert f.calls == 0
    _transforms_still_work()


def test_vmap_no_args_at_all():
    f = CallCounter(lambda: torch.ones(2))
    with pytest.raises(ValueError, match="batch"):
        pf.vmap(f)()
    assert f.calls == 0


@pytest.mark.parametrize("bad", ["differnt", "Different", None, 1])
def test_vmap_invalid_randomness_flag_raises_at_construction(bad):
    f = CallCounter(_body)
    with pytest.raises(ValueError, match=r"randomness.*'error'.*'different'.*'same'"):
        pf.vmap(f, randomness=bad)
    assert f.calls == 0


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2"])
def test_vmap_invalid_chunk_size(bad):
    f = CallCounter(_body)
    with pytest.raises((ValueError, TypeError), match="chunk_size"):
        pf.vmap(f, chunk_size=bad)(X)
    assert f.calls == 0


def test_nested_vmap_inner_bad_in_dims_does_not_leave_outer_level():
    def outer(x):
        return pf.vmap(lambda a: a, in_dims=5)(x)

    with pytest.raises(ValueError, match="out of range"):
        pf.vmap(outer)(X)
    _transforms_still_work()


# ----------------------------------------------------------------------------------------
# vmap output validation (necessarily after the function ran): clear errors, clean stack
# ----------------------------------------------------------------------------------------

VMAP_BAD_OUTPUTS = [
    ("out_dims_too_long", lambda a: (a, a), (0, 0, 0), ValueError, r"out_dims.*(structure|length)"),
    ("out_dims_tuple_for_dict", lambda a: {"x": a}, (0, 0), ValueError, r"out_dims"),
    ("out_dims_dict_keys", lambda a: {"x": a}, {"y": 0}, ValueError, r"out_dims.*keys"),
    ("out_dims_out_of_range", lambda a: a, 3, ValueError, r"out_dim.*out of range"),
    ("out_dims_out_of_range_neg", lambda a: a, -3, ValueError, r"out_dim.*out of range"),
    ("non_tensor_output_str", lambda a: "s", 0, ValueError, r"(?s)str.*None"),
    ("non_tensor_output_none", lambda a: (a, None), 0, ValueError, r"(?s)NoneType.*None"),
    ("batched_output_with_none", lambda a: a * 2, None, ValueError, r"(?i)out_dims.*None.*batch"),
    ("out_dims_float", lambda a: a, 0.5, ValueError, r"out_dims.*int"),
]


@pytest.mark.parametrize("case", VMAP_BAD_OUTPUTS, ids=[c[0] for c in VMAP_BAD_OUTPUTS])
def test_vmap_bad_out_dims(case):
    _, f, out_dims, exc, msg = case
    with pytest.raises(exc, match=msg):
        pf.vmap(f, out_dims=out_dims)(X)
    _transforms_still_work()


def test_vmap_bad_out_dims_with_chunks():
    with pytest.raises(ValueError, match="out_dims"):
        pf.vmap(lambda a: (a, a), out_dims=(0, 0, 0), chunk_size=2)(X)
    _transforms_still_work()


# ----------------------------------------------------------------------------------------
# argnums / grad validation
# ----------------------------------------------------------------------------------------

ARGNUM_CASES = [
    ("out_of_range", 2, ValueError, r"argnums.*2.*out of range.*2 positional"),
    ("out_of_range_negative", -3, ValueError, r"argnums.*-3.*out of range"),
    ("tuple_out_of_range", (0, 4), ValueError, r"out of range"),
    ("duplicate", (0, 0), ValueError, r"argnums.*same argument|duplicate"),
    ("duplicate_negative_alias", (1, -1), ValueError, r"argnums.*same argument|duplicate"),
    ("empty_tuple", (), (ValueError, TypeError), r"argnums"),
    ("float", 0.5, TypeError, r"argnums"),
    ("list", [0], (TypeError, ValueError), r"argnums"),
]


@pytest.mark.parametrize("transform", ["grad", "grad_and_value", "jacrev", "jacfwd", "hessian"])
@pytest.mark.parametrize("case", ARGNUM_CASES, ids=[c[0] for c in ARGNUM_CASES])
def test_argnums_invalid_before_running(transform, case):
    _, argnums, exc, msg = case
    f = CallCounter(lambda a, b: (a * b).sum())
    x = torch.randn(3, dtype=DT)
    with pytest.raises(exc, match=msg):
        getattr(pf, transform)(f, argnums=argnums)(x, x)
    assert f.calls == 0
    _transforms_still_work()


def test_grad_integer_input_rejected_before_running():
    f = CallCounter(lambda a: a.sum())
    with pytest.raises(TypeError, match=r"(?i)floating point.*int64"):
        pf.grad(f)(torch.arange(3))
    assert f.calls == 0


def test_grad_non_tensor_input_rejected_before_running():
    f = CallCounter(lambda a: torch.tensor(a) * 2)
    with pytest.raises(TypeError, match=r"tensor"):
        pf.grad(f)(3.0)
    assert f.calls == 0


@pytest.mark.parametrize("transform", ["grad", "grad_and_value"])
def test_grad_of_non_scalar_output(transform):
    with pytest.raises(ValueError, match=r"(?s)scalar.*\(3, 4\)"):
        getattr(pf, transform)(lambda a: a * 2)(X)
    _transforms_still_work()


@pytest.mark.parametrize("transform", ["grad", "grad_and_value"])
def test_grad_of_integer_output(transform):
    with pytest.raises((TypeError, ValueError), match=r"(?i)(floating|float).*int64|int64.*float"):
        getattr(pf, transform)(lambda a: (a > 0).sum())(X)
    _transforms_still_work()


def test_vmap_python_number_output_is_stacked_like_the_loop():
    """A Python number returned for every example is stacked as the per-example path stacks
    numbers that differ between examples (whether vmap errors must not depend on the data).
    torch.func raises here."""
    x = torch.randn(3, 2)
    out, three, flag = pf.vmap(lambda a: (a.sum(), 3, True))(x)
    assert torch.equal(three, torch.tensor([3, 3, 3])) and torch.equal(flag, torch.tensor([True] * 3))
    got = pf.vmap(lambda a: (a, 2.5), out_dims=(0, 0))(x)[1]
    assert torch.equal(got, torch.full((3,), 2.5))
    assert pf.vmap(lambda a: (a, 2.5), out_dims=(0, None))(x)[1] == 2.5


def test_grad_of_non_tensor_output():
    with pytest.raises(TypeError, match=r"tensor.*float|float.*tensor"):
        pf.grad(lambda a: 3.0)(X)
    _transforms_still_work()


HAS_AUX_BAD = [
    ("tensor", lambda a: a.sum()),
    ("triple", lambda a: (a.sum(), a, a)),
    ("single", lambda a: (a.sum(),)),
]


@pytest.mark.parametrize("case", HAS_AUX_BAD, ids=[c[0] for c in HAS_AUX_BAD])
@pytest.mark.parametrize("transform", ["grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd"])
def test_has_aux_requires_a_pair(transform, case):
    _, f = case
    x = torch.randn(3, dtype=DT)
    with pytest.raises(ValueError, match=r"has_aux.*pair|pair.*has_aux"):
        if transform == "vjp":
            pf.vjp(f, x, has_aux=True)
        elif transform == "jvp":
            pf.jvp(f, (x,), (x,), has_aux=True)
        else:
            getattr(pf, transform)(f, has_aux=True)(x)
    _transforms_still_work()


def test_jvp_bad_tangents_before_running():
    f = CallCounter(lambda a: a * 2)
    x = torch.randn(3, dtype=DT)
    with pytest.raises(ValueError, match=r"tangent.*shape"):
        pf.jvp(f, (x,), (torch.randn(4, dtype=DT),))
    with pytest.raises((ValueError, TypeError), match=r"tangent"):
        pf.jvp(f, (x,), (x, x))
    with pytest.raises(TypeError, match=r"primals.*tuple"):
        pf.jvp(f, x, (x,))
    assert f.calls == 0
    _transforms_still_work()


def test_vjp_fn_bad_cotangent():
    x = torch.randn(3, dtype=DT)
    _, fn = pf.vjp(lambda a: a * 2, x)
    with pytest.raises(ValueError, match=r"cotangent.*shape|shape.*cotangent"):
        fn(torch.randn(4, dtype=DT))
    _transforms_still_work()


# ----------------------------------------------------------------------------------------
# randomness='error'
# ----------------------------------------------------------------------------------------

RANDOM_FNS = [
    ("randn", lambda a: a + torch.randn(())),
    ("rand_like", lambda a: torch.rand_like(a)),
    ("dropout", lambda a: F.dropout(a, p=0.5, training=True)),
    ("normal_", lambda a: a.clone().normal_()),
    ("bernoulli", lambda a: torch.bernoulli(torch.sigmoid(a))),
]


@pytest.mark.parametrize("case", RANDOM_FNS, ids=[c[0] for c in RANDOM_FNS])
def test_random_op_under_randomness_error(case):
    _, f = case
    with pytest.raises(RuntimeError, match=r"(?s)randomness.*'different'.*'same'") as ei:
        pf.vmap(f)(X)
    assert isinstance(ei.value, pf.RandomnessError)
    assert "randomness" in str(ei.value) and "error" in str(ei.value)
    _transforms_still_work()


def test_random_op_under_explicit_randomness_error_nested():
    def inner(a):
        return pf.vmap(lambda b: b * torch.rand(()), randomness="different")(a)

    with pytest.raises(pf.RandomnessError, match=r"randomness"):
        pf.vmap(inner, randomness="error")(torch.randn(2, 3, dtype=DT))
    _transforms_still_work()


# ----------------------------------------------------------------------------------------
# exceptions raised by the user's function propagate unchanged
# ----------------------------------------------------------------------------------------


class UserError(Exception):
    pass


def _raiser(err):
    def f(*args, **kwargs):
        # do some real work on the wrappers first, so levels are really in use
        leaves = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        _ = (leaves[0].sin() * 2).sum()
        raise err

    return f


def _run_under(transform, f):
    x = torch.randn(3, dtype=DT)
    xb = torch.randn(2, 3, dtype=DT)
    if transform == "vmap":
        return pf.vmap(f)(xb)
    if transform == "vmap_chunked":
        return pf.vmap(f, chunk_size=1)(xb)
    if transform == "grad":
        return pf.grad(f)(x)
    if transform == "grad_and_value":
        return pf.grad_and_value(f)(x)
    if transform == "vjp":
        return pf.vjp(f, x)
    if transform == "jvp":
        return pf.jvp(f, (x,), (x,))
    if transform == "linearize":
        return pf.linearize(f, x)
    if transform in ("jacrev", "jacfwd", "hessian"):
        return getattr(pf, transform)(f)(x)
    if transform == "vmap_grad_jvp":
        return pf.vmap(pf.grad(lambda a: pf.jvp(f, (a,), (a,))[1].sum()))(xb)
    if transform == "jvp_vmap_grad":
        return pf.jvp(pf.vmap(pf.grad(f)), (xb,), (xb,))
    if transform == "grad_grad":
        return pf.grad(pf.grad(f))(x[0])
    raise AssertionError(transform)


TRANSFORMS = [
    "vmap", "vmap_chunked", "grad", "grad_and_value", "vjp", "jvp", "linearize",
    "jacrev", "jacfwd", "hessian", "vmap_grad_jvp", "jvp_vmap_grad", "grad_grad",
]  # fmt: skip


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_user_exception_propagates_unchanged(transform):
    err = UserError("boom: the user's own message 123")
    with pytest.raises(UserError) as ei:
        _run_under(transform, _raiser(err))
    assert ei.value is err
    assert str(ei.value) == "boom: the user's own message 123"
    assert type(ei.value) is UserError
    _transforms_still_work()


@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp", "vmap_grad_jvp"])
@pytest.mark.parametrize("exc_type", [ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError])
def test_builtin_exceptions_propagate_unchanged(transform, exc_type):
    err = exc_type("from the user")
    with pytest.raises(exc_type) as ei:
        _run_under(transform, _raiser(err))
    assert ei.value is err
    _transforms_still_work()


def test_torch_error_inside_function_propagates_as_is():
    w = torch.randn(5, 2, dtype=DT)

    def f(a):
        return a @ w  # (3,) @ (5, 2): size mismatch

    with pytest.raises(RuntimeError, match=r"(?i)size|shape|match"):
        pf.vmap(f)(X[:, :3])
    _transforms_still_work()


def test_exception_in_vjp_fn_call_leaves_no_level():
    x = torch.randn(3, dtype=DT)
    _, fn = pf.vjp(lambda a: a.exp(), x)
    err = UserError("in vmap(vjp_fn)")

    def g(v):
        fn(v)
        raise err

    with pytest.raises(UserError) as ei:
        pf.vmap(g)(torch.eye(3, dtype=DT))
    assert ei.value is err
    _transforms_still_work()


def test_interpreter_stack_is_empty_after_successful_transforms():
    x = torch.randn(3, dtype=DT)
    pf.vmap(pf.grad(lambda a: pf.jvp(torch.sin, (a,), (a,))[1].sum()))(torch.randn(2, 3, dtype=DT))
    pf.hessian(lambda a: a.sin().sum())(x)
    assert _stack_is_empty()


def test_interpreter_stack_inside_transforms():
    seen = []

    def f(a):
        seen.append([i.kind for i in _core.interpreter_stack()])
        return a.sum()

    pf.vmap(pf.grad(f))(torch.randn(2, 3, dtype=DT))
    assert seen == [["vmap", "grad"]]
    assert _stack_is_empty()


# ----------------------------------------------------------------------------------------
# what a user sees when printing a tensor inside a transform
# ----------------------------------------------------------------------------------------

_VALS = torch.tensor([[1.25, 2.5, -3.75], [4.125, 5.5, 6.0625]], dtype=torch.float32)
_INTERNALS = re.compile(r"_value|_interp|Interpreter\(|object at 0x|0x[0-9a-f]{6,}|__torch_dispatch__|LevelTensor")


def _capture_repr(run):
    reprs = []

    def f(a):
        reprs.append((repr(a), str(a), f"{a}"))
        return a.sum() if a.dim() <= 1 else a

    run(f)
    return reprs[0]


@pytest.mark.parametrize(
    "kind,run",
    [
        ("vmap", lambda f: pf.vmap(f)(_VALS)),
        ("grad", lambda f: pf.grad(f)(_VALS[0])),
        ("jvp", lambda f: pf.jvp(f, (_VALS[0],), (_VALS[0],))),
    ],
    ids=["vmap", "grad", "jvp"],
)
def test_wrapper_repr_shows_value_and_transform(kind, run):
    for text in _capture_repr(run):
        assert kind in text.lower(), text
        for digits in ("1.2500", "2.5000", "3.7500"):
            assert digits in text, text
        assert not _INTERNALS.search(text), text


def test_wrapper_repr_nested_shows_innermost_transform_and_values():
    reprs = []

    def f(a):
        reprs.append(repr(a))
        return a.sum()

    pf.vmap(pf.grad(f))(_VALS)
    (text,) = reprs
    assert "grad" in text.lower()
    assert "1.2500" in text and "6.0625" in text
    assert not _INTERNALS.search(text), text


def test_wrapper_repr_of_intermediate_results():
    reprs = []

    def f(a):
        b = a * 2
        reprs.append(repr(b))
        return b

    pf.vmap(f)(_VALS)
    assert "vmap" in reprs[0].lower() and "2.5000" in reprs[0] and "8.2500" in reprs[0]


def test_print_inside_transform_does_not_raise(capsys):
    pf.vmap(lambda a: print(a) or a)(_VALS)
    pf.grad(lambda a: print(a) or a.sum())(_VALS[0])
    out = capsys.readouterr().out
    assert "vmap" in out.lower() and "grad" in out.lower()
    assert not _INTERNALS.search(out)


def test_import_on_an_untested_torch_says_what_to_do():
    import warnings

    from pyfunctorch._compat import check_torch

    with pytest.warns(RuntimeWarning, match="not been tested"):
        check_torch("2.16.0+cu132")
    with pytest.warns(RuntimeWarning, match="torch 2.13 or newer"):
        check_torch("2.11.0+cu130")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for v in ("2.13.0+cpu", "2.13.1", "2.14.1+cu130", "2.15.0", "not-a-version"):
            check_torch(v)

