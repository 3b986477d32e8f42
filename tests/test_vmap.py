"""vmap against its definition (a Python loop over the batch) and against torch.func.vmap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyfunctorch import vmap

from conftest import assert_close, loop_vmap

DT = torch.float64


# ----------------------------------------------------------------------------------------
# in_dims
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dim", [0, 1, 2, -1, -2, -3])
def test_in_dims_int_and_negative(device, in_dim):
    x = torch.randn(2, 3, 4, dtype=DT, device=device)
    f = lambda t: torch.sin(t).sum(0) * t.mean()  # noqa: E731
    assert_close(vmap(f, in_dims=in_dim)(x), loop_vmap(f, in_dims=in_dim)(x))
    assert_close(vmap(f, in_dims=in_dim)(x), tf.vmap(f, in_dims=in_dim)(x))


def test_in_dims_none_for_some_args(device):
    x = torch.randn(5, 3, dtype=DT, device=device)
    w = torch.randn(3, 2, dtype=DT, device=device)
    b = torch.randn(2, dtype=DT, device=device)
    f = lambda x, w, b: torch.tanh(x @ w + b)  # noqa: E731
    got = vmap(f, in_dims=(0, None, None))(x, w, b)
    assert_close(got, loop_vmap(f, in_dims=(0, None, None))(x, w, b))
    assert_close(got, torch.tanh(x @ w + b))


def test_in_dims_second_arg_only(device):
    x = torch.randn(3, dtype=DT, device=device)
    y = torch.randn(3, 6, dtype=DT, device=device)
    f = lambda x, y: torch.dot(x, y)  # noqa: E731
    got = vmap(f, in_dims=(None, 1))(x, y)
    assert got.shape == (6,)
    assert_close(got, x @ y)


def test_in_dims_list_for_list_argument(device):
    xs = [torch.randn(4, 3, dtype=DT, device=device), torch.randn(3, 4, dtype=DT, device=device)]
    f = lambda xs: xs[0] * xs[1]  # noqa: E731
    got = vmap(f, in_dims=([0, 1],))(xs)
    assert_close(got, loop_vmap(f, in_dims=([0, 1],))(xs))


def test_in_dims_nested_tuple_pytree(device):
    a = torch.randn(4, 3, dtype=DT, device=device)
    b = torch.randn(3, 4, dtype=DT, device=device)
    c = torch.randn(3, dtype=DT, device=device)

    def f(pair, c):
        (a, (b,)) = pair
        return a.exp() - b * c

    in_dims = ((0, (1,)), None)
    got = vmap(f, in_dims=in_dims)((a, (b,)), c)
    assert_close(got, loop_vmap(f, in_dims=in_dims)((a, (b,)), c))
    assert_close(got, tf.vmap(f, in_dims=in_dims)((a, (b,)), c))


def test_in_dims_dict_pytree(device):
    d = {"w": torch.randn(3, 2, dtype=DT, device=device), "x": torch.randn(2, 5, dtype=DT, device=device), "s": torch.randn((), dtype=DT, device=device)}

    def f(d):
        return torch.sigmoid(d["w"] @ d["x"]) * d["s"]

    # keys in a different order from the input: matching is by key, not position
    in_dims = ({"x": 1, "s": None, "w": None},)
    got = vmap(f, in_dims=in_dims)(d)
    assert got.shape == (5, 3)
    assert_close(got, loop_vmap(f, in_dims=in_dims)(d))
    # torch.func matches dict in_dims by position in its flattening, so give it the input's order
    assert_close(got, tf.vmap(f, in_dims=({"w": None, "x": 1, "s": None},))(d))


def test_in_dims_prefix_applies_to_whole_subtree(device):
    args = ({"a": torch.randn(3, 2, dtype=DT, device=device), "b": [torch.randn(3, dtype=DT, device=device), torch.randn(3, 2, 2, dtype=DT, device=device)]}, torch.randn(2, dtype=DT, device=device))

    def f(tree, y):
        return tree["a"] * y + tree["b"][0] + tree["b"][1].sum(-1)

    got = vmap(f, in_dims=(0, None))(*args)
    assert_close(got, loop_vmap(f, in_dims=(0, None))(*args))
    # a prefix one level deeper
    in_dims = ({"a": 0, "b": 0}, None)
    assert_close(vmap(f, in_dims=in_dims)(*args), got)


def test_non_tensor_args_with_none_in_dims(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    f = lambda x, n, s: x.pow(n) * (2.0 if s == "double" else 1.0)  # noqa: E731
    got = vmap(f, in_dims=(0, None, None))(x, 3, "double")
    assert_close(got, 2 * x**3)


def test_kwargs_are_passed_unbatched(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    scale = torch.randn(3, dtype=DT, device=device)  # would be batched along 0 (size 3 != 4) if it were
    seen = []

    def f(x, *, scale, power=1):
        seen.append(tuple(scale.shape))
        return x * scale**power

    got = vmap(f)(x, scale=scale, power=2)
    assert_close(got, x * scale**2)
    assert seen == [(3,)]


def test_kwarg_tensor_same_size_as_batch_not_batched(device):
    x = torch.randn(3, 3, dtype=DT, device=device)
    m = torch.randn(3, 3, dtype=DT, device=device)
    got = vmap(lambda x, m: m @ x)(x, m=m)
    assert_close(got, (m @ x.T).T)


# ----------------------------------------------------------------------------------------
# out_dims, output pytrees, non-tensor outputs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dim", [0, 1, 2, -1, -2, -3])
def test_out_dims_int_and_negative(device, out_dim):
    x = torch.randn(3, 2, 4, dtype=DT, device=device)
    f = lambda t: t.cos() * 2  # noqa: E731
    got = vmap(f, out_dims=out_dim)(x)
    assert_close(got, loop_vmap(f, out_dims=out_dim)(x))
    assert_close(got, tf.vmap(f, out_dims=out_dim)(x))


def test_outputs_tuple_list_dict_pytree(device):
    x = torch.randn(4, 3, dtype=DT, device=device)

    def f(x):
        return (x.sin(), [x.sum(), {"a": x.outer(x), "b": x.exp()}])

    out_dims = (1, [0, {"a": -1, "b": 0}])
    got = vmap(f, out_dims=out_dims)(x)
    assert isinstance(got, tuple) and isinstance(got[1], list) and isinstance(got[1][1], dict)
    assert_close(got, loop_vmap(f, out_dims=out_dims)(x))
    assert_close(got, tf.vmap(f, out_dims=out_dims)(x))


def test_out_dims_prefix_int_for_tuple_output(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    f = lambda x: (x * 2, {"y": x + 1})  # noqa: E731
    assert_close(vmap(f, out_dims=1)(x), loop_vmap(f, out_dims=1)(x))


def test_single_output_with_one_tuple_out_dims(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    assert_close(vmap(torch.sin, out_dims=(1,))(x), torch.sin(x).T)


def test_non_tensor_outputs_with_out_dims_none(device):
    x = torch.randn(4, 3, dtype=DT, device=device)

    def f(x):
        return x * 2, 7, "tag", None, x.shape[-1]

    got = vmap(f, out_dims=(0, None, None, None, None))(x)
    assert_close(got[0], 2 * x)
    assert got[1:] == (7, "tag", None, 3)


def test_unbatched_output_with_out_dims_none_is_returned_as_is(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    w = torch.randn(2, dtype=DT, device=device)
    got = vmap(lambda x: (x.sum(), w * 3), out_dims=(0, None))(x)
    assert_close(got, (x.sum(1), w * 3))


def test_unbatched_output_with_int_out_dim_is_broadcast(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    w = torch.randn(2, dtype=DT, device=device)
    f = lambda x: w * 3  # noqa: E731
    got = vmap(f, out_dims=1)(x)
    assert got.shape == (2, 4)
    assert_close(got, loop_vmap(f, out_dims=1)(x))


def test_new_tensor_created_inside_is_broadcast(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    got = vmap(lambda x: (torch.ones(2, dtype=DT, device=device), torch.zeros_like(x) + 1))(x)
    assert_close(got, (torch.ones(4, 2, dtype=DT, device=device), torch.ones(4, 3, dtype=DT, device=device)))


def test_batch_size_one_and_output_is_plain_tensor(device):
    x = torch.randn(1, 3, dtype=DT, device=device)
    got = vmap(torch.exp)(x)
    assert type(got) is torch.Tensor
    assert_close(got, x.exp())


# ----------------------------------------------------------------------------------------
# chunk_size
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 100])
def test_chunk_size_equals_unchunked(device, chunk_size):
    x = torch.randn(5, 3, dtype=DT, device=device)
    y = torch.randn(3, 5, dtype=DT, device=device)
    w = torch.randn(3, 3, dtype=DT, device=device)

    def f(x, y, w):
        h = torch.tanh(w @ x) * y
        return {"h": h, "s": h.sum()}, 4

    in_dims = (0, 1, None)
    out_dims = ({"h": 1, "s": 0}, None)
    got = vmap(f, in_dims=in_dims, out_dims=out_dims, chunk_size=chunk_size)(x, y, w)
    want = vmap(f, in_dims=in_dims, out_dims=out_dims)(x, y, w)
    assert_close(got, want)
    assert_close(got, loop_vmap(f, in_dims=in_dims, out_dims=out_dims)(x, y, w))


def test_chunk_size_calls_function_per_chunk(device):
    x = torch.randn(7, 2, dtype=DT, device=device)
    calls = []

    def f(x):
        calls.append(1)
        return x * 2

    assert_close(vmap(f, chunk_size=3)(x), 2 * x)
    assert len(calls) == 3  # 3 + 3 + 1


# ----------------------------------------------------------------------------------------
# nested vmap
# ----------------------------------------------------------------------------------------


def test_nested_vmap_outer_product(device):
    x = torch.randn(3, dtype=DT, device=device)
    y = torch.randn(4, dtype=DT, device=device)
    got = vmap(vmap(torch.mul, in_dims=(None, 0)), in_dims=(0, None))(x, y)
    assert_close(got, torch.outer(x, y))


def test_nested_vmap_mixed_and_negative_in_dims(device):
    a = torch.randn(5, 3, dtype=DT, device=device)
    b = torch.randn(3, 2, 5, dtype=DT, device=device)
    f = lambda a, b: torch.exp(a) * b  # noqa: E731
    inner = vmap(f, in_dims=(0, -1))
    got = vmap(inner, in_dims=(-1, 0))(a, b)
    want = loop_vmap(loop_vmap(f, in_dims=(0, -1)), in_dims=(-1, 0))(a, b)
    assert got.shape == (3, 5, 2)
    assert_close(got, want)
    assert_close(got, tf.vmap(tf.vmap(f, in_dims=(0, -1)), in_dims=(-1, 0))(a, b))


def test_nested_vmap_same_tensor_batched_twice(device):
    x = torch.randn(2, 3, 4, dtype=DT, device=device)
    f = lambda t: t.softmax(-1)  # noqa: E731
    got = vmap(vmap(f, in_dims=1, out_dims=-1), in_dims=-1, out_dims=1)(x)
    want = loop_vmap(loop_vmap(f, in_dims=1, out_dims=-1), in_dims=-1, out_dims=1)(x)
    assert_close(got, want)


def test_triple_nested_vmap_matmul(device):
    x = torch.randn(2, 3, 4, 5, dtype=DT, device=device)
    w = torch.randn(5, 2, dtype=DT, device=device)
    f = lambda v: v @ w  # noqa: E731
    got = vmap(vmap(vmap(f)))(x)
    assert_close(got, x @ w)


def test_nested_vmap_inner_closure_over_outer_batched(device):
    x = torch.randn(3, 4, dtype=DT, device=device)
    y = torch.randn(5, 4, dtype=DT, device=device)

    def outer(xi):
        return vmap(lambda yj: torch.dot(xi, yj.sin()))(y)

    assert_close(vmap(outer)(x), x @ y.sin().T)


# ----------------------------------------------------------------------------------------
# closures, in-place ops
# ----------------------------------------------------------------------------------------


def test_closure_over_unbatched_tensors(device):
    w = torch.randn(4, 3, dtype=DT, device=device)
    b = torch.randn(4, dtype=DT, device=device)
    x = torch.randn(6, 3, dtype=DT, device=device)
    f = lambda x: torch.relu(w @ x + b).sum() / b.norm()  # noqa: E731
    assert_close(vmap(f)(x), loop_vmap(f)(x))


def test_inplace_add_mutates_callers_tensor(device):
    # functorch docs: vmap(Tensor.add_)(x, y) mutates x
    x = torch.randn(3, dtype=DT, device=device)
    y = torch.randn(3, dtype=DT, device=device)
    x0 = x.clone()
    out = vmap(torch.Tensor.add_, in_dims=(0, 0))(x, y)
    assert_close(x, x0 + y)
    assert_close(out, x0 + y)


def test_inplace_on_nonzero_batch_dim_mutates_caller(device):
    x = torch.randn(3, 4, dtype=DT, device=device)
    y = torch.randn(4, 3, dtype=DT, device=device)
    x0 = x.clone()

    def f(a, b):
        a.mul_(b)
        a.add_(1.0)
        return a

    out = vmap(f, in_dims=(1, 0))(x, y)
    want = x0 * y.T + 1
    assert_close(x, want)
    assert_close(out, want.T)


def test_inplace_with_unbatched_other_operand(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    y = torch.randn(3, dtype=DT, device=device)
    x0 = x.clone()
    vmap(lambda a: a.sub_(y).mul_(2))(x)
    assert_close(x, (x0 - y) * 2)


def test_inplace_on_local_copy_does_not_mutate_input(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    x0 = x.clone()

    def f(a):
        b = a.clone()
        b.mul_(3)
        return b

    assert_close(vmap(f)(x), 3 * x0)
    assert_close(x, x0)


def test_inplace_into_unbatched_tensor_raises(device):
    x = torch.randn(4, 3, dtype=DT, device=device)
    buf = torch.zeros(3, dtype=DT, device=device)
    with pytest.raises(RuntimeError, match="(?i)batched"):
        vmap(lambda a: buf.add_(a))(x)


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((4,), (4,)), ((4,), (4, 3)), ((3, 4), (4,)), ((3, 4), (4, 2)), ((2, 3, 4), (4,)), ((4,), (2, 4, 3)), ((1,), (1, 3))],
)
@pytest.mark.parametrize("out_dim", [0, -1])
def test_matmul_all_rank_combinations(device, a_shape, b_shape, out_dim):
    """torch.matmul decomposes differently per rank (1-D @ 2-D goes through an in-place squeeze_)."""
    a = torch.randn((3,) + a_shape, dtype=DT, device=device)
    b = torch.randn(b_shape, dtype=DT, device=device)
    f = lambda a: torch.matmul(a, b)  # noqa: E731
    got = vmap(f, out_dims=out_dim)(a)
    assert_close(got, loop_vmap(f, out_dims=out_dim)(a))
    # the per-example shape seen inside the function is the loop's
    seen = []
    vmap(lambda a: seen.append(tuple(torch.matmul(a, b).shape)) or a)(a)
    assert seen == [tuple(torch.matmul(a[0], b).shape)]


@pytest.mark.parametrize(
    "name,f",
    [
        ("squeeze_", lambda t: t.unsqueeze(0).clone().squeeze_(0)),
        ("unsqueeze_", lambda t: t.clone().unsqueeze_(-1)),
        ("t_", lambda t: t.clone().t_()),
        ("transpose_", lambda t: t.clone().transpose_(0, 1)),
        ("swapdims_", lambda t: t.clone().swapdims_(0, 1)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_inplace_view_ops_update_per_example_shape(device, name, f):
    x = torch.randn(3, 2, 4, dtype=DT, device=device)
    seen = []

    def g(t):
        out = f(t)
        seen.append(tuple(out.shape))
        return out

    got = vmap(g, out_dims=-1)(x)
    assert seen == [tuple(f(x[0]).shape)], name
    assert_close(got, loop_vmap(f, out_dims=-1)(x))


# ----------------------------------------------------------------------------------------
# a representative set of ops vs the loop
# ----------------------------------------------------------------------------------------

OPS = {
    "dot": (lambda a, b: torch.dot(a, b), [(4,), (4,)]),
    "mv": (lambda a, b: a @ b, [(3, 4), (4,)]),
    "mm": (lambda a, b: a @ b, [(3, 4), (4, 2)]),
    "bmm": (lambda a, b: torch.bmm(a, b), [(2, 3, 4), (2, 4, 2)]),
    "matmul_bcast": (lambda a, b: torch.matmul(a, b), [(2, 3, 4), (4, 2)]),
    "cat": (lambda a, b: torch.cat([a, b], dim=-1), [(3, 2), (3, 4)]),
    "stack": (lambda a, b: torch.stack([a, b], dim=1), [(3, 2), (3, 2)]),
    "where": (lambda a, b: torch.where(a > 0, a, b), [(3, 4), (4,)]),
    "softmax": (lambda a, b: F.softmax(a, dim=0) * b, [(3, 4), (4,)]),
    "log_softmax": (lambda a, b: F.log_softmax(a @ b, dim=-1), [(3, 4), (4, 5)]),
    "norm": (lambda a, b: a.norm(dim=-1) + b.abs().amax(), [(3, 4), (4,)]),
    "var_mean": (lambda a, b: a.var(0) + b.mean(), [(3, 4), (4,)]),
    "cumsum": (lambda a, b: a.cumsum(1) * b, [(3, 4), (4,)]),
    "permute_reshape": (lambda a, b: a.permute(2, 0, 1).reshape(-1) + b.flatten(), [(2, 3, 2), (2, 6)]),
    "expand": (lambda a, b: a.unsqueeze(1).expand(3, 4) + b, [(3,), (4,)]),
    "slice_select": (lambda a, b: a[1:, ::2] * b[0], [(3, 4), (2,)]),
    "transpose_contig": (lambda a, b: a.t().contiguous().view(-1) - b, [(3, 4), (12,)]),
    "clamp_pow": (lambda a, b: a.clamp(-0.5, 0.5) ** 2 + b.pow(3), [(3, 4), (4,)]),
    "div_rsub": (lambda a, b: 1 - a / (1 + b**2), [(3, 4), (4,)]),
    "linear": (lambda a, b: F.linear(a, b), [(3, 4), (5, 4)]),
    "prod": (lambda a, b: a.prod(-1) + b.sum(), [(3, 4), (4,)]),
    "max_dim": (lambda a, b: a.max(dim=1).values + b.min(), [(3, 4), (4,)]),
    "sort": (lambda a, b: a.sort(dim=-1).values * b, [(3, 4), (4,)]),
    "logsumexp": (lambda a, b: a.logsumexp(0) + b, [(3, 4), (4,)]),
    "einsum": (lambda a, b: torch.einsum("ij,jk->ik", a, b), [(3, 4), (4, 2)]),
    "squeeze_unsqueeze": (lambda a, b: a.unsqueeze(0).squeeze(0).unsqueeze(-1) * b, [(3, 4), (4, 1)]),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("in_dims", [(0, 0), (1, None), (None, -1)])
def test_ops_against_loop(device, name, in_dims):
    f, shapes = OPS[name]
    B = 3
    args = []
    for s, d in zip(shapes, in_dims):
        t = torch.randn(s, dtype=DT, device=device)
        if d is not None:
            t = torch.stack([torch.randn(s, dtype=DT, device=device) for _ in range(B)], dim=d % (len(s) + 1))
        args.append(t)
    got = vmap(f, in_dims=in_dims)(*args)
    assert_close(got, loop_vmap(f, in_dims=in_dims)(*args))


# single-input ops of many families (rules, decompositions and the loop fallback), x: (3, 4)
_IDX = torch.tensor([0, 2])
UNARY_OPS = {
    "roll": lambda a: a.roll(1, 0),
    "diag_embed": lambda a: torch.diag_embed(a),
    "tril": lambda a: a.tril(),
    "repeat": lambda a: a.repeat(2, 1),
    "flip": lambda a: a.flip(0),
    "unfold": lambda a: a.unfold(1, 2, 1),
    "index_select": lambda a: a.index_select(1, _IDX),
    "gather": lambda a: a.gather(1, torch.zeros(3, 2, dtype=torch.long)),
    "getitem_tensor_index": lambda a: a[:, _IDX],
    "masked_fill": lambda a: a.masked_fill(torch.ones(3, 4, dtype=torch.bool).triu(), 0.0),
    "scatter_add_into_new": lambda a: torch.zeros(3, 4, dtype=a.dtype).scatter_add(1, torch.zeros(3, 4, dtype=torch.long), a),
    "index_add_into_new": lambda a: torch.zeros(3, 4, dtype=a.dtype).index_add(0, torch.tensor([0, 0, 1]), a),
    "constant_pad_nd": lambda a: torch.constant_pad_nd(a, (1, 1)),
    "F.pad_constant": lambda a: F.pad(a, (1, 0, 0, 2)),
    "F.pad_reflect": lambda a: F.pad(a, (1, 1), mode="reflect"),
    "F.pad_replicate": lambda a: F.pad(a, (2, 2), mode="replicate"),
    "max_pool1d": lambda a: F.max_pool1d(a, 2),
    "avg_pool1d": lambda a: F.avg_pool1d(a, 2),
    "im2col": lambda a: F.unfold(a[None, None], 2),
    "interpolate": lambda a: F.interpolate(a[None], scale_factor=2),
    "layer_norm": lambda a: F.layer_norm(a, (4,)),
    "embedding": lambda a: F.embedding(torch.tensor([0, 2, 1]), a),
    "conv1d": lambda a: F.conv1d(a[None], torch.ones(2, 3, 2, dtype=a.dtype)),
    "kron": lambda a: torch.kron(a, a[:2, :2]),
    "cdist": lambda a: torch.cdist(a, a),
    "logcumsumexp": lambda a: a.logcumsumexp(1),
    "diff": lambda a: a.diff(dim=1),
    "renorm_dim0": lambda a: a.renorm(2, 0, 1.0),
    "renorm_dim1": lambda a: a.renorm(2, 1, 0.5),
    "std": lambda a: a.std(1),
    "topk": lambda a: a.topk(2).values,
    "median": lambda a: a.median(1).values,
    "trace": lambda a: a[:, :3].trace(),
    "linalg_norm": lambda a: torch.linalg.norm(a, ord="fro"),
    "addcmul": lambda a: torch.addcmul(a, a, a.flip(1), value=0.5),
    "lerp": lambda a: torch.lerp(a, a.exp(), 0.3),
}


@pytest.mark.parametrize("name", sorted(UNARY_OPS))
@pytest.mark.parametrize("in_dim", [0, 1, -1])
def test_unary_ops_against_loop(name, in_dim):
    f = UNARY_OPS[name]
    x = torch.randn(3, 4, dtype=DT)
    xb = torch.stack([torch.randn(3, 4, dtype=DT) for _ in range(2)], dim=in_dim % 3)
    got = vmap(f, in_dims=in_dim)(xb)
    assert_close(got, loop_vmap(f, in_dims=in_dim)(xb))
    assert f(x).shape == got.shape[1:]


# ----------------------------------------------------------------------------------------
# hypothesis: random shapes, in_dims, out_dims, containers and op chains vs the loop
# ----------------------------------------------------------------------------------------


def _insert_bdim(t, d, B):
    """A batch of B examples shaped like t, batch dim at (normalized) d."""
    r = t.dim()
    dd = d % (r + 1)
    return torch.stack([torch.randn_like(t) for _ in range(B)], dim=dd)


_W = torch.randn(16, 3, dtype=DT, generator=torch.Generator().manual_seed(1))


def _apply(op, h, others):
    """One step of a random op chain. Every branch depends on shapes only (never values),
    so per-example and batched execution take the same path."""
    name, k = op
    if name in ("add", "mul", "sub", "maximum", "where", "divsafe", "atan2"):
        if not others:
            return h
        a = others[k % len(others)]
        try:
            torch.broadcast_shapes(h.shape, a.shape)
        except RuntimeError:
            return h
        if name == "add":
            return h + a
        if name == "mul":
            return h * a
        if name == "sub":
            return a - h
        if name == "maximum":
            return torch.maximum(h, a)
        if name == "where":
            return torch.where(a > 0, h, a)
        if name == "divsafe":
            return h / (1.5 + a.abs())
        return torch.atan2(h, a)
    if name == "sin":
        return torch.sin(h)
    if name == "tanh":
        return torch.tanh(h)
    if name == "exp":
        return torch.exp(torch.tanh(h))
    if name == "square":
        return h * h
    if name == "relu":
        return F.relu(h)
    if name == "abs":
        return h.abs()
    if name == "scalar":
        return 2.5 * h - 1
    if name == "sum":
        return h.sum(dim=k % h.dim()) if h.dim() else h
    if name == "mean_keep":
        return h.mean(dim=k % h.dim(), keepdim=True) if h.dim() else h
    if name == "amax":
        return h.amax(dim=-1) if h.dim() else h
    if name == "softmax":
        return h.softmax(dim=k % h.dim()) if h.dim() else h
    if name == "transpose":
        return h.transpose(0, -1) if h.dim() >= 2 else h
    if name == "reshape":
        return h.reshape(-1) if h.dim() != 1 else h.reshape(1, -1)
    if name == "unsqueeze":
        return h.unsqueeze(k % (h.dim() + 1)) if h.dim() < 3 else h
    if name == "flip":
        return h.flip(-1) if h.dim() else h
    if name == "matmul":
        if h.dim() == 0 or h.shape[-1] > _W.shape[0]:
            return h
        w = _W[: h.shape[-1]].to(h.device)
        return h @ w
    if name == "matmul_other":
        if h.dim() == 0:
            return h
        for a in others:
            if a.dim() == 1 and a.shape[0] == h.shape[-1]:
                return h @ a
            if a.dim() >= 2 and a.shape[-2] == h.shape[-1]:
                try:
                    torch.broadcast_shapes(h.shape[:-2], a.shape[:-2])
                except RuntimeError:
                    continue
                return h @ a
        return h
    if name == "cat_self":
        return torch.cat([h, h.sin()], dim=-1) if h.dim() and h.shape[-1] <= 8 else h
    if name == "narrow":
        return h.narrow(-1, 0, max(1, h.shape[-1] - 1)) if h.dim() and h.shape[-1] > 0 else h
    raise AssertionError(name)


OP_NAMES = [
    "add", "mul", "sub", "maximum", "where", "divsafe", "atan2",
    "sin", "tanh", "exp", "square", "relu", "abs", "scalar",
    "sum", "mean_keep", "amax", "softmax", "transpose", "reshape", "unsqueeze", "flip",
    "matmul", "matmul_other", "cat_self", "narrow",
]  # fmt: skip

_shape = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


def _broadcastable_variant(draw, base):
    """A shape that broadcasts against ``base``: a suffix with some dims set to 1."""
    n = draw(st.integers(0, len(base)))
    suffix = base[len(base) - n :]
    return tuple(1 if draw(st.booleans()) else s for s in suffix)


@st.composite
def vmap_case(draw):
    B = draw(st.integers(1, 4))
    base = draw(_shape)
    nargs = draw(st.integers(1, 3))
    examples, dims = [], []
    for _ in range(nargs):
        shape = base if draw(st.booleans()) else _broadcastable_variant(draw, base)
        ex = torch.randn(shape, dtype=DT)
        d = draw(st.one_of(st.none(), st.integers(-(len(shape) + 1), len(shape))))
        examples.append(ex)
        dims.append(d)
    if all(d is None for d in dims):
        i = draw(st.integers(0, nargs - 1))
        r = examples[i].dim()
        dims[i] = draw(st.integers(-(r + 1), r))
    leaves = [ex if d is None else _insert_bdim(ex, d, B) for ex, d in zip(examples, dims)]
    # pack the leaves into a random container, with matching (full or prefix) in_dims
    container = draw(st.sampled_from(["flat", "tuple", "list", "dict", "nested"]))
    if container == "flat":
        args, in_dims = tuple(leaves), tuple(dims)
    elif container == "tuple":
        args, in_dims = (tuple(leaves),), (tuple(dims),)
    elif container == "list":
        args, in_dims = (list(leaves),), ([*dims],)
    elif container == "dict":
        keys = [f"k{i}" for i in range(nargs)]
        args = ({k: v for k, v in zip(keys, leaves)},)
        in_dims = ({k: d for k, d in zip(keys, dims)},)
    else:
        args = (leaves[0], {"rest": tuple(leaves[1:])})
        in_dims = (dims[0], {"rest": tuple(dims[1:])})
    # a prefix int covers a whole container when all of its leaves share it
    if container in ("tuple", "list", "dict") and len(set(dims)) == 1 and draw(st.booleans()):
        in_dims = (dims[0],)
    ops = draw(st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 5)), min_size=1, max_size=6))
    out_kind = draw(st.sampled_from(["tensor", "tuple", "dict_with_extras", "list_nested"]))
    return args, in_dims, ops, out_kind


def _chain_fn(ops, out_kind):
    def f(*args):
        leaves = torch.utils._pytree.tree_leaves(args)
        h = leaves[0]
        for op in ops:
            h = _apply(op, h, leaves[1:])
        if out_kind == "tensor":
            return h
        if out_kind == "tuple":
            return h, leaves[-1].cos()
        if out_kind == "dict_with_extras":
            return {"h": h, "n": 3, "const": _W[:2].sum(0)}
        return [h.sum(), (h, leaves[0])]

    return f


def _draw_out_dims(draw, out_example, out_kind):
    def d_for(t):
        r = t.dim() + 1
        return draw(st.integers(-r, r - 1))

    if out_kind == "tensor":
        return d_for(out_example)
    if out_kind == "tuple":
        if draw(st.booleans()):
            return draw(st.integers(-1, 0))  # an int prefix for the whole tuple
        return (d_for(out_example[0]), d_for(out_example[1]))
    if out_kind == "dict_with_extras":
        return {"h": d_for(out_example["h"]), "n": None, "const": draw(st.sampled_from([None, 0]))}
    return [d_for(out_example[0]), (d_for(out_example[1][0]), d_for(out_example[1][1]))]


def _run_vmap_case(data):
    args, in_dims, ops, out_kind = data.draw(vmap_case())
    f = _chain_fn(ops, out_kind)
    # one example's output tells the per-example output ranks (shape-only information)
    first = loop_vmap(lambda *a: a, in_dims=in_dims, out_dims=None)(*args)
    out_example = f(*first)
    out_dims = _draw_out_dims(data.draw, out_example, out_kind)
    want = loop_vmap(f, in_dims=in_dims, out_dims=out_dims)(*args)
    got = vmap(f, in_dims=in_dims, out_dims=out_dims)(*args)
    assert_close(got, want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_vmap_matches_loop(data):
    _run_vmap_case(data)


@pytest.mark.slow
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_vmap_matches_loop_exhaustive(data):
    _run_vmap_case(data)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_nested_vmap_matches_nested_loop(data):
    """Two vmap levels over the same random chain, each with its own random in_dims."""
    B1, B2 = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    base = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple))
    ex_a = torch.randn(base, dtype=DT)
    ex_b = torch.randn(_broadcastable_variant(data.draw, base), dtype=DT)
    r_a, r_b = ex_a.dim(), ex_b.dim()
    # inner dims: a always batched at the inner level, b maybe not
    ia = data.draw(st.integers(-(r_a + 1), r_a))
    ib = data.draw(st.one_of(st.none(), st.integers(-(r_b + 1), r_b)))
    a_in = _insert_bdim(ex_a, ia, B2)
    b_in = ex_b if ib is None else _insert_bdim(ex_b, ib, B2)
    oa = data.draw(st.integers(-(a_in.dim() + 1), a_in.dim()))
    ob = data.draw(st.one_of(st.none(), st.integers(-(b_in.dim() + 1), b_in.dim())))
    a = _insert_bdim(a_in, oa, B1)
    b = b_in if ob is None else _insert_bdim(b_in, ob, B1)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 5)), min_size=1, max_size=5))
    f = _chain_fn(ops, "tensor")
    od_inner = data.draw(st.integers(-1, 0))
    od_outer = data.draw(st.integers(-1, 0))
    got = vmap(vmap(f, in_dims=(ia, ib), out_dims=od_inner), in_dims=(oa, ob), out_dims=od_outer)(a, b)
    want = loop_vmap(loop_vmap(f, in_dims=(ia, ib), out_dims=od_inner), in_dims=(oa, ob), out_dims=od_outer)(a, b)
    assert_close(got, want)


def test_vmap_matches_torch_func_on_mlp(device):
    W1, W2 = torch.randn(5, 4, dtype=DT, device=device), torch.randn(2, 5, dtype=DT, device=device)
    x = torch.randn(6, 4, dtype=DT, device=device)

    def f(x):
        return F.log_softmax(W2 @ torch.tanh(W1 @ x), dim=-1)

    assert_close(vmap(f)(x), tf.vmap(f)(x))
    assert math.isfinite(float(vmap(f)(x).sum()))
