"""vmap's fast path for F.linear (every nn.Linear): a user's call on tensors batched at the
bottom level runs on the physical values before torch's dispatcher. Checked against the
per-example loop (vmap's definition), differentiated around vmap against the loop's
gradients, and shown to skip the dispatcher where it applies and to leave it where not."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pyfunctorch
from pyfunctorch import grad, vmap

from conftest import assert_close, loop_vmap

B, N, IN, OUT = 4, 3, 5, 6


def _args(device, dtype, batched, bias, x_shape=(N, IN), b_shape=(OUT,)):
    """(args, in_dims) of F.linear with the batched ones (x, w, b) given a leading batch dim."""
    shapes = [x_shape, (OUT, IN), b_shape]
    args, in_dims = [], []
    for shape, is_batched in zip(shapes[: 3 if bias else 2], batched):
        t = torch.randn(((B,) if is_batched else ()) + tuple(shape), device=device, dtype=torch.float64).to(dtype)
        args.append(t)
        in_dims.append(0 if is_batched else None)
    return args, tuple(in_dims)


_PATTERNS = [p for p in itertools.product([True, False], repeat=3) if any(p)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("bias, batched", [(bias, p) for bias in (True, False) for p in _PATTERNS if bias or any(p[:2])],
                         ids=lambda v: v if isinstance(v, bool) else "".join("xwb"[i] if b else "-" for i, b in enumerate(v)))
def test_linear_matches_the_loop(device, dtype, bias, batched):
    args, in_dims = _args(device, dtype, batched, bias)
    got = vmap(F.linear, in_dims=in_dims)(*args)
    assert_close(got, loop_vmap(F.linear, in_dims=in_dims)(*args))


@pytest.mark.parametrize("x_shape, b_shape", [((IN,), (OUT,)), ((2, N, IN), (OUT,)), ((N, IN), (N, OUT)),
                                              ((N, IN), ()), ((1, IN), (1, OUT))])
@pytest.mark.parametrize("batched", [(True, False, False), (True, True, True), (False, True, True)],
                         ids=["x", "xwb", "wb"])
def test_other_ranks_match_the_loop(device, x_shape, b_shape, batched):
    # inputs of other ranks and biases that broadcast per example: torch's linear takes other
    # paths (matmul, a broadcast bias): the dispatcher and the rules, as without the fast path
    if batched[2] and len(b_shape) != 1:
        batched = batched[:2] + (False,)
    args, in_dims = _args(device, torch.float64, batched, True, x_shape, b_shape)
    got = vmap(F.linear, in_dims=in_dims)(*args)
    assert_close(got, loop_vmap(F.linear, in_dims=in_dims)(*args))


def test_batch_dims_elsewhere_and_nested_levels_match_the_loop(device):
    x = torch.randn(N, B, IN, device=device, dtype=torch.float64)
    w = torch.randn(OUT, IN, B, device=device, dtype=torch.float64)
    b = torch.randn(OUT, device=device, dtype=torch.float64)
    assert_close(vmap(F.linear, in_dims=(1, 2, None))(x, w, b), loop_vmap(F.linear, in_dims=(1, 2, None))(x, w, b))
    xs = torch.randn(2, B, N, IN, device=device, dtype=torch.float64)
    ws = torch.randn(B, OUT, IN, device=device, dtype=torch.float64)
    inner = lambda x, w: vmap(F.linear, in_dims=(0, 0))(x, w)  # noqa: E731
    assert_close(vmap(inner, in_dims=(0, None))(xs, ws),
                 torch.stack([torch.stack([F.linear(xs[i, j], ws[j]) for j in range(B)]) for i in range(2)]))


@pytest.mark.parametrize("batched", [(True, False, False), (False, True, True), (True, True, True)],
                         ids=["shared layer", "ensemble", "all batched"])
def test_differentiated_around_vmap_matches_the_loop(device, batched):
    # an ensemble trained through vmap, or a model over a batch, by plain autograd: the fast
    # path's products are recorded by autograd as the rules' are
    args, in_dims = _args(device, torch.float64, batched, True)
    args = [a.requires_grad_() for a in args]
    got = torch.autograd.grad(vmap(F.linear, in_dims=in_dims)(*args).square().sum(), args)
    want = torch.autograd.grad(loop_vmap(F.linear, in_dims=in_dims)(*args).square().sum(), args)
    assert_close(got, want)


def test_transforms_inside_and_around(device):
    x = torch.randn(B, N, IN, device=device, dtype=torch.float64)
    w = torch.randn(OUT, IN, device=device, dtype=torch.float64)
    b = torch.randn(OUT, device=device, dtype=torch.float64)
    # per-sample gradients (the linear is called on the grad level's wrappers)
    f = lambda w, b, x: F.linear(x, w, b).tanh().sum()  # noqa: E731
    got = vmap(grad(f, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    want = [torch.stack(g) for g in zip(*[torch.autograd.grad(f(w.requires_grad_(), b.requires_grad_(), x[i]), (w, b))
                                          for i in range(B)])]
    assert_close(list(got), want)
    # a grad level inside vmap over a captured batched input (the grad level is on top)
    g = lambda x: grad(lambda w: F.linear(x, w, b).sin().sum())(w.detach())  # noqa: E731
    assert_close(vmap(g)(x), loop_vmap(g)(x))
    # grad around vmap (the vmap level is not the bottom one)
    h = lambda w: vmap(F.linear, in_dims=(0, None, None))(x, w, b).cos().sum()  # noqa: E731
    wr = w.detach().requires_grad_()
    assert_close(grad(h)(w.detach()), torch.autograd.grad(loop_vmap(F.linear, in_dims=(0, None, None))(x, wr, b).cos().sum(), wr)[0])


@pytest.mark.parametrize("batched, bias", [((True, False, False), True), ((False, True, True), True),
                                           ((True, True, True), True), ((False, True, False), True),
                                           ((True, True, False), False), ((False, True, False), False)],
                         ids=["shared layer", "ensemble", "all batched", "ensemble, shared bias", "x and w",
                              "ensemble, no bias"])
def test_nn_linear_skips_the_dispatcher(count_dispatch, batched, bias):
    # the mechanism: a float linear on a 2-D input per example at the bottom level
    args, in_dims = _args("cpu", torch.float32, batched, bias)
    got = vmap(F.linear, in_dims=in_dims)(*args)
    assert count_dispatch == []
    assert_close(got, loop_vmap(F.linear, in_dims=in_dims)(*args))


@pytest.mark.parametrize("case", ["per-example bias, shared weight", "bfloat16", "1-D input", "batch dim 1",
                                  "empty batch"])
def test_other_linears_take_the_dispatcher(count_dispatch, case):
    dtype, x_shape, batched, in_dims = torch.float64, (N, IN), (True, False, True), None
    if case == "bfloat16":
        dtype, batched = torch.bfloat16, (True, False, False)
    elif case == "1-D input":
        x_shape, batched = (IN,), (True, False, False)
    args, dims = _args("cpu", dtype, batched, True, x_shape)
    if case == "batch dim 1":
        args[0], dims = args[0].transpose(0, 1), (1, None, 0)
    elif case == "empty batch":
        args, dims = [args[0][:0], args[1], args[2][:0]], dims
    in_dims = in_dims or dims
    got = vmap(F.linear, in_dims=in_dims)(*args)
    assert count_dispatch != []
    assert_close(got, loop_vmap(F.linear, in_dims=in_dims)(*args) if case != "empty batch"
                 else torch.empty(0, N, OUT, dtype=dtype))


def test_errors_are_torch_s_own(device):
    x = torch.randn(B, N, IN, device=device)
    w = torch.randn(OUT, IN + 1, device=device)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch|must match"):
        vmap(F.linear, in_dims=(0, None))(x, w)
    with pytest.raises(RuntimeError):
        vmap(F.linear, in_dims=(0, None))(x, torch.randn(OUT, IN, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        F.linear(x[0], w)
