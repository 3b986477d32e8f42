"""vmap's pointwise fast paths against the per-example loop and torch.func: a user's pointwise
call taken before torch's dispatcher (BatchedTensor.__torch_function__), the pointwise rule's
own fast path, and the activations' backward kernels on broadcast operands."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf

import pyfunctorch
from pyfunctorch import grad, jacfwd, jacrev, jvp, vmap
from pyfunctorch.batched import tensor as batched_tensor
from pyfunctorch.batching.pointwise import USER_POINTWISE

from conftest import assert_close, loop_vmap, run_in_threads

DT = torch.float64


# ----------------------------------------------------------------------------------------
# pointwise rule: the fast path and the activations' backward kernels
# ----------------------------------------------------------------------------------------

aten = torch.ops.aten


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op, extra", [
    (aten.gelu_backward.default, ()), (aten.gelu_backward.default, {"approximate": "tanh"}),
    (aten.tanh_backward.default, ()), (aten.sigmoid_backward.default, ()),
    (aten.threshold_backward.default, (0.0,)), (aten.silu_backward.default, ()),
])
@pytest.mark.parametrize("in_dims", [(0, None), (None, 0), (1, None), (0, 0)])
def test_activation_backward_kernels_with_broadcast_operands(device, dtype, op, extra, in_dims):
    # run on broadcast operands where the kernel takes them (no copy of the unbatched one),
    # on operands of one shape where it refuses (oneDNN's gelu_backward, float32/bfloat16)
    g = torch.randn(4, 5, 3, dtype=dtype, device=device)
    y = torch.randn(4, 5, 3, dtype=dtype, device=device)
    g0 = g if in_dims[0] is not None else g[0]
    y0 = y if in_dims[1] is not None else y[0]
    if in_dims[0] == 1:
        g0 = g.transpose(0, 1)[:, :, :]
    kw = extra if isinstance(extra, dict) else {}
    pos = () if kw else extra
    f = lambda a, b: op(a, b, *pos, **kw)  # noqa: E731
    got = vmap(f, in_dims=in_dims)(g0, y0)
    assert_close(got, loop_vmap(f, in_dims=in_dims)(g0, y0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("op", [aten.gelu_backward.default, aten.tanh_backward.default])
def test_activation_backward_with_an_expanded_unbatched_gradient(device, dtype, op):
    """An unbatched gradient that is an expanded (stride-0) value, broadcast against a batched
    operand of another rank: oneDNN's gelu_backward (CPU, float32/bfloat16) crashed the process
    with a segmentation fault on such operands instead of raising (fuzzer seed 301444:
    vmap(vmap(hessian(gelu chain)))). Such a kernel gets operands of one shape. Oracle: the loop."""
    g = torch.randn(1, dtype=dtype, device=device).expand(6, 2, 3)
    y = torch.randn(3, 1, 1, 2, 3, dtype=dtype, device=device)
    f = lambda a, b: op(a, b)  # noqa: E731
    # (the elementwise definition: the kernel on one shape -- the loop itself must not pass it the
    # expanded gradient, or the oracle crashes the same way)
    one_shape = lambda a, b: op(*(t.contiguous() for t in torch.broadcast_tensors(a, b)))  # noqa: E731
    assert_close(vmap(f, in_dims=(None, 0))(g, y), loop_vmap(one_shape, in_dims=(None, 0))(g, y))


def test_vmap_vmap_hessian_of_gelu_float32(device):
    """The composition the fuzzer found (seed 301444), against torch.func."""
    def f(x):
        return torch.nn.functional.gelu(torch.tanh(x).log_softmax(0))

    x = torch.randn(3, 2, 2, 3, device=device)
    want = tf.vmap(tf.vmap(tf.hessian(f), in_dims=1), in_dims=0, out_dims=-2)(x)
    got = vmap(vmap(pyfunctorch.hessian(f), in_dims=1, chunk_size=1), in_dims=0, out_dims=-2)(x)
    assert_close(got, want)


@pytest.mark.parametrize("a_dt, b_dt", [(torch.float32, torch.float32), (torch.int64, torch.float32),
                                        (torch.float32, torch.float64), (torch.int32, torch.int64),
                                        (torch.bool, torch.int64)])
@pytest.mark.parametrize("b_shape", [(), (3,), (2, 3)])
def test_binary_pointwise_fast_path_matches_the_loop(device, a_dt, b_dt, b_shape):
    # batched logically-0-dim or 2-dim self, unbatched 0-dim / dimensioned / batched other:
    # broadcasting and type promotion as per example (fast path when the dtypes agree)
    for a_shape in [(5,), (5, 2, 3)]:
        a = (torch.randn(a_shape, device=device) * 5).to(a_dt)
        b = (torch.randn(b_shape, device=device) * 5).to(b_dt)
        bb = (torch.randn((5,) + b_shape, device=device) * 5).to(b_dt)
        for f in (torch.add, torch.mul, torch.maximum, lambda x, y: x * 2.5, lambda x, y: x + 3):
            for in_dims, args in (((0, None), (a, b)), ((0, 0), (a, bb)), ((None, 0), (a[0], bb))):
                if in_dims == (0, 0) and len(a_shape) != len(b_shape) + 1 and b_shape:
                    continue
                try:
                    want = loop_vmap(f, in_dims=in_dims)(*args)
                except RuntimeError:
                    continue
                got = vmap(f, in_dims=in_dims)(*args)
                assert got.dtype == want.dtype
                assert_close(got, want)


@pytest.mark.parametrize("b_shape", [(), (4,), (1, 4), (3, 1), (3, 4), (2, 3, 4), (5, 1, 1, 4)])
@pytest.mark.parametrize("a_shape", [(), (4,), (1, 4), (3, 4)])
def test_broadcasting_rule_with_unbatched_operands_of_any_rank(device, a_shape, b_shape):
    # the rule's fast path runs the op as it is when the unbatched operand has fewer dims than
    # the batched one's physical rank; otherwise it pads. In place only into batched self.
    a = torch.randn((6,) + a_shape, device=device)
    b = torch.randn(b_shape, device=device)
    outs = (aten.add.Tensor, aten.mul.Tensor, aten.atan2.default, aten.tanh_backward.default,
            lambda x, y: aten.where.self(y > 0, x, y), lambda x, y: aten.lerp.Tensor(x, y, y))
    for op in outs:
        for in_dims, args in (((0, None), (a, b)), ((None, 0), (b, a))):
            f = lambda x, y: op(x, y)  # noqa: E731
            try:
                want = loop_vmap(f, in_dims=in_dims)(*args)
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    vmap(f, in_dims=in_dims)(*args)
                continue
            assert_close(vmap(f, in_dims=in_dims)(*args), want)
    for op in (aten.add_.Tensor, aten.mul_.Tensor):
        f = lambda x, y: op(x.clone(), y)  # noqa: E731
        try:
            want = loop_vmap(f, in_dims=(0, None))(a, b)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                vmap(f, in_dims=(0, None))(a, b)
            continue
        assert_close(vmap(f, in_dims=(0, None))(a, b), want)


# ----------------------------------------------------------------------------------------
# a user's pointwise call on tensors batched at one level: before torch's dispatcher
# ----------------------------------------------------------------------------------------


def test_user_pointwise_call_skips_the_dispatcher(count_dispatch):
    # the mechanism: a chain of pointwise calls on tensors batched in front at one level
    x = torch.randn(6, 4, 3)
    y = torch.randn(6, 4, 3)
    f = lambda a, b: torch.sin(a * 1.5 + b).exp() - b.cos() / 2  # noqa: E731
    got = vmap(f)(x, y)
    assert count_dispatch == []
    assert_close(got, loop_vmap(f)(x, y))


@pytest.mark.parametrize("case", ["batch dim 1", "ranks differ", "dtypes differ", "unbatched tensor",
                                  "keyword argument", "wrapper requires grad"])
def test_other_calls_take_the_dispatcher(count_dispatch, case):
    x = torch.randn(5, 3, dtype=DT)
    if case == "batch dim 1":
        f, args, in_dims = (lambda a: torch.sin(a)), (x.t(),), 1
    elif case == "ranks differ":
        f, args, in_dims = (lambda a, b: a * b), (x, torch.randn(5, 2, 3, dtype=DT)), 0
    elif case == "dtypes differ":
        f, args, in_dims = (lambda a, b: a * b), (x, torch.randn(5, 3)), 0
    elif case == "unbatched tensor":
        f, args, in_dims = (lambda a, b: a * b), (x, torch.randn(3, dtype=DT)), (0, None)
    elif case == "keyword argument":
        f, args, in_dims = (lambda a: torch.add(a, a, alpha=2)), (x,), 0
    else:
        def f(a):  # autograd records on the wrapper itself, as on each example
            a = a.detach().requires_grad_()
            y = (a * a).sin()
            return y.detach() + y.requires_grad
        args, in_dims = (x,), 0
    got = vmap(f, in_dims=in_dims)(*args)
    assert count_dispatch != []
    assert_close(got, loop_vmap(f, in_dims=in_dims)(*args))


def _same(got, want):
    assert type(got) is torch.Tensor and got.dtype == want.dtype
    torch.testing.assert_close(got, want, equal_nan=True)


_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool, torch.complex64, torch.bfloat16]
_SCALARS = [2, 2.5, True, 1 + 2j, -3]


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "pow", "maximum", "remainder", "atan2", "eq",
                                  "lt", "logical_and", "bitwise_and", "floor_divide", "hypot", "copysign"])
def test_binary_user_calls_match_the_loop(device, dtype, name):
    # every way of calling (torch.f, method, operator), with tensors and Python scalars:
    # dtype and value as per example, or the example's error
    x = (torch.randn(4, 2, 3, device=device) * 4).to(dtype)
    y = (torch.randn(4, 2, 3, device=device) * 4 + 0.5).to(dtype)
    fn = getattr(torch, name)
    calls = [lambda a, b: fn(a, b), lambda a, b: getattr(a, name)(b)]
    calls += [lambda a, b, s=s: fn(a, s) for s in _SCALARS]
    calls += [lambda a, b, s=s: fn(s, a) for s in _SCALARS if name in ("add", "mul", "pow", "sub")]
    for f in calls:
        try:
            want = loop_vmap(f)(x, y)
        except (RuntimeError, TypeError) as e:
            with pytest.raises(type(e)):
                vmap(f)(x, y)
            continue
        _same(vmap(f)(x, y), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128, torch.int64, torch.float16])
@pytest.mark.parametrize("name", ["sin", "exp", "log1p", "sigmoid", "tanh", "relu", "abs", "neg", "sqrt",
                                  "reciprocal", "sgn", "square", "ceil", "logical_not", "nan_to_num"])
def test_unary_user_calls_match_the_loop(device, dtype, name):
    x = (torch.randn(4, 3, device=device) * 3).to(dtype)
    fn = getattr(torch, name)
    for f in (lambda a: fn(a), lambda a: getattr(a, name)(), lambda a: fn(a.conj()) if a.is_complex() else fn(-a)):
        try:
            want = loop_vmap(f)(x)
        except (RuntimeError, TypeError) as e:
            with pytest.raises(type(e)):
                vmap(f)(x)
            continue
        _same(vmap(f)(x), want)


def test_activation_and_clamp_calls_with_positional_scalars(device):
    x = torch.randn(6, 5, dtype=DT, device=device)
    F = torch.nn.functional
    for f in (lambda a: a.clamp(-0.5, 0.5), lambda a: torch.clamp(a, None, 0.3), lambda a: F.leaky_relu(a, 0.2),
              lambda a: F.gelu(a), lambda a: F.softplus(a), lambda a: F.hardtanh(a, -0.1, 0.2),
              lambda a: torch.lerp(a, a.sin(), 0.3), lambda a: torch.addcmul(a, a, a.cos())):
        assert_close(vmap(f)(x), loop_vmap(f)(x))
        assert_close(vmap(f)(x), tf.vmap(f)(x))


def _user_callables(name):
    F = torch.nn.functional
    found = [getattr(torch, name, None), getattr(torch.Tensor, name, None), getattr(F, name, None),
             getattr(torch._C._nn, name, None)]  # (F's Python wrappers pass keywords: the dispatcher)
    if name.startswith("special_"):
        found.append(getattr(torch.special, name[len("special_"):], None))
    return [fn for fn in found if callable(fn)]


_CALL_PATTERNS = [  # (how many batched tensors, the call's arguments made from them)
    (1, lambda a: (a,)), (2, lambda a, b: (a, b)), (1, lambda a: (a, 0.7)), (1, lambda a: (a, 2)),
    (1, lambda a: (1, a)), (2, lambda a, b: (a, b, b)), (2, lambda a, b: (a, b, 0.3)), (1, lambda a: (a, 0.7, 2.0)),
    (2, lambda a, b: (a, b, 1)),
]


@pytest.mark.parametrize("name", USER_POINTWISE)
def test_every_fast_call_matches_the_loop_and_skips_the_dispatcher(name, count_dispatch):
    # the whole table: each op called the ways it accepts (1-3 tensors, Python scalars; a
    # positional `inplace` of F's wrappers included), on float and, where float is refused,
    # integer inputs; equal to the loop (results and what it wrote into the inputs), and at
    # least one form taken before the dispatcher (no aten op reached the vmap level)
    fast = ran = 0
    for dtype in (torch.float64, torch.int64, torch.bool):
        x = torch.rand(4, 3, dtype=torch.float64).add(0.5).mul(3).to(dtype)
        y = torch.rand(4, 3, dtype=torch.float64).sub(0.5).to(dtype)
        for fn in _user_callables(name):
            for n, make in _CALL_PATTERNS:
                f = lambda *t, fn=fn, make=make: fn(*make(*t))  # noqa: E731
                loop_ins = tuple(t.clone() for t in (x, y)[:n])
                try:
                    want = loop_vmap(f)(*loop_ins)
                except Exception:
                    continue
                if not isinstance(want, torch.Tensor):
                    continue
                ins = tuple(t.clone() for t in (x, y)[:n])
                count_dispatch.clear()
                _same(vmap(f)(*ins), want)
                for a, b in zip(ins, loop_ins):
                    _same(a, b)
                ran += 1
                fast += not count_dispatch
        if ran:
            break
    assert ran and fast, f"{name}: ran {ran} forms, {fast} before the dispatcher"


_F_CALLS = [
    lambda a: F.relu(a), lambda a: F.relu6(a * 4), lambda a: F.silu(a), lambda a: F.mish(a), lambda a: F.hardswish(a),
    lambda a: F.hardsigmoid(a), lambda a: F.selu(a), lambda a: F.celu(a, 0.5), lambda a: F.elu(a, 0.7),
    lambda a: F.leaky_relu(a, 0.2), lambda a: F.leaky_relu(a), lambda a: F.hardtanh(a, -0.3, 0.4),
    lambda a: F.threshold(a, 0.1, -2.0), lambda a: torch.nn.ReLU()(a), lambda a: torch.nn.SiLU()(a),
]
F = torch.nn.functional


@pytest.mark.parametrize("k", range(len(_F_CALLS)))
def test_functional_wrappers_skip_the_dispatcher(device, k, count_dispatch):
    # torch.nn.functional's Python wrappers (nn.ReLU -> F.relu(x, inplace=False)) reach
    # __torch_function__ with keywords: out of place, they run as the C function they call
    f = _F_CALLS[k]
    x = torch.randn(5, 4, 3, dtype=DT, device=device)
    got = vmap(f)(x)
    assert count_dispatch == []
    assert_close(got, loop_vmap(f)(x))
    assert_close(got, tf.vmap(f)(x))


@pytest.mark.parametrize("f", [lambda a: F.relu(a, inplace=True), lambda a: F.leaky_relu(a, 0.2, True),
                               lambda a: F.hardtanh(a, -0.3, 0.4, True), lambda a: F.elu(a, 0.7, inplace=True)])
def test_functional_wrappers_in_place_take_the_dispatcher(f, count_dispatch):
    x = torch.randn(5, 3, dtype=DT)
    xl = x.clone()
    want = loop_vmap(f)(xl)
    got = vmap(f)(x)
    assert count_dispatch != []
    assert_close(got, want)
    assert_close(x, xl)  # written in place, as each example is


def _chain(x, w):
    return (torch.sin(x * w) + x.exp() * 0.5 - (x * x).tanh()).sigmoid()


@pytest.mark.parametrize("composition", ["vmap(grad)", "grad(vmap)", "vmap(vmap)", "jacrev(vmap)", "jacfwd(vmap)",
                                         "vmap(jvp)", "jvp(vmap)", "vmap(jacrev)"])
def test_compositions_through_the_fast_path_match_torch_func(device, composition):
    xs = torch.randn(3, 4, 5, dtype=DT, device=device)
    w = torch.randn(5, dtype=DT, device=device)
    t = torch.randn(5, dtype=DT, device=device)
    def run(m):
        if composition == "vmap(grad)":
            return m.vmap(m.grad(lambda x: _chain(x, w).sum()))(xs[0])
        if composition == "grad(vmap)":
            return m.grad(lambda w: m.vmap(lambda x: _chain(x, w))(xs[0]).sum())(w)
        if composition == "vmap(vmap)":
            return m.vmap(m.vmap(lambda x: _chain(x, w)))(xs)
        if composition == "jacrev(vmap)":
            return m.jacrev(lambda w: m.vmap(lambda x: _chain(x, w))(xs[0]))(w)
        if composition == "jacfwd(vmap)":
            return m.jacfwd(lambda w: m.vmap(lambda x: _chain(x, w))(xs[0]))(w)
        if composition == "vmap(jvp)":
            return m.vmap(lambda x: m.jvp(lambda x: _chain(x, w), (x,), (t,)))(xs[0])
        if composition == "jvp(vmap)":
            return m.jvp(lambda x: m.vmap(lambda r: _chain(r, w))(x), (xs[0],), (xs[1],))
        return m.vmap(m.jacrev(lambda x: _chain(x, w)))(xs[0])
    assert_close(run(pyfunctorch), run(tf))


def test_grad_of_a_captured_batched_tensor_records_through_the_fast_path(device):
    # inside vmap, grad over w: x (batched, captured) * w is a grad-level op; .sin() of it is
    # a pointwise call on a tensor batched at the vmap level whose value the grad level tracks
    xs = torch.randn(4, 3, dtype=DT, device=device)
    w = torch.randn(3, dtype=DT, device=device)
    f = lambda x: grad(lambda w: ((x * w).sin() * 2.0).exp().sum())(w)  # noqa: E731
    assert_close(vmap(f)(xs), tf.vmap(tf.grad(lambda w, x: ((x * w).sin() * 2.0).exp().sum()), in_dims=(None, 0))(w, xs))


def test_inference_mode_inside_vmap(device):
    xs = torch.randn(4, 3, device=device)

    def f(x):
        with torch.inference_mode():
            y = x * 2 + 1
        return y.sin()
    got = vmap(f)(xs)
    assert_close(got, loop_vmap(f)(xs))


def test_a_user_tensor_subclass_keeps_its_own_handler(device):
    calls = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    xs = torch.randn(4, 3, device=device)
    c = torch.randn(3, device=device).as_subclass(Logged)
    got = vmap(lambda x: x * c)(xs)
    assert "mul" in calls
    assert_close(got, xs * c.as_subclass(torch.Tensor))


def test_escaped_tensor_in_a_pointwise_call_raises():
    leak = []
    vmap(lambda x: leak.append(x * 2) or x)(torch.randn(3, 2))
    with pytest.raises(pyfunctorch.EscapedTensorError):
        leak[0].sin()


# ----------------------------------------------------------------------------------------
# hold_entry_points: torch's patched entry points kept for a loop of transform calls
# ----------------------------------------------------------------------------------------


def test_hold_entry_points_keeps_plain_torch_unchanged_and_restores_it(device):
    originals = (torch.randn, torch.zeros, torch.Tensor.clone, torch.Tensor.detach, torch.Tensor.normal_)
    xs = torch.randn(5, 3, device=device)
    f = lambda x: (x * 2 + torch.ones(3, device=x.device)).sin()  # noqa: E731
    want_vmap = loop_vmap(f)(xs)
    want_grad = tf.vmap(tf.grad(lambda x: f(x).sum()))(xs)
    torch.manual_seed(3)
    want_plain = (torch.randn(4, device=device), torch.zeros(2, 2), xs.clone().normal_())
    with pyfunctorch.hold_entry_points():
        for _ in range(3):
            assert_close(vmap(f)(xs), want_vmap)
            assert_close(vmap(grad(lambda x: f(x).sum()))(xs), want_grad)
        assert torch.randn is not originals[0]  # held between the calls ...
        torch.manual_seed(3)  # ... and plain torch outside any transform is torch's
        got_plain = (torch.randn(4, device=device), torch.zeros(2, 2), xs.clone().normal_())
        d = xs.detach()
        assert type(d) is torch.Tensor and d.data_ptr() == xs.data_ptr()
        with pyfunctorch.hold_entry_points():  # nested blocks
            assert_close(vmap(f)(xs), want_vmap)
        assert torch.randn is not originals[0]
    for g, w in zip(got_plain, want_plain):
        assert torch.equal(g, w)
    assert (torch.randn, torch.zeros, torch.Tensor.clone, torch.Tensor.detach, torch.Tensor.normal_) == originals


def test_hold_entry_points_with_randomness_and_threads():
    def work():
        x = torch.randn(4, 3)
        for _ in range(10):
            out = vmap(lambda a: a + torch.randn(()), randomness="different")(x)
            assert out.shape == (4, 3) and not torch.equal(out[0] - x[0], out[1] - x[1])
            with pytest.raises(pyfunctorch.RandomnessError):
                vmap(lambda a: a + torch.randn(()))(x)

    with pyfunctorch.hold_entry_points():
        errors = run_in_threads(work, 3)
    assert errors == []
    from pyfunctorch import _patching
    assert _patching._patch_users == 0
