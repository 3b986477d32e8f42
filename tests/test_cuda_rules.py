"""Batching rules of the CUDA-only aten ops (SDPA's efficient/flash/cuDNN kernels, the raw
attention kernels, the fused LSTM/GRU cells, cuDNN convolution and batch norm), tested
without a GPU on fake CUDA tensors: under ``FakeTensorMode`` ``torch.empty(..., device='cuda')``
makes tensors that run the ops' meta kernels. The oracle is the per-example loop (vmap's
definition) under the same fake mode: every output's shape, dtype and device must match.
Values are checked on a GPU by scripts/gpu_models.py (scripts/gpu_check.sh).

The randomness classification (a random-tagged op whose call draws nothing is not random) is
tested on CPU with real values too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import pyfunctorch as pf
from pyfunctorch.batched import api as _api
from pyfunctorch import random as _random

from conftest import assert_close, loop_vmap, no_fallback

aten = torch.ops.aten
B = 3


@pytest.fixture
def fake():
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        yield mode


def cuda(*shape, dtype=torch.float32):
    return torch.empty(shape, device="cuda", dtype=dtype)


def _meta_of(out):
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.dtype, out.device.type)
    if isinstance(out, (tuple, list)):
        return tuple(_meta_of(o) for o in out)
    return out


def tensors_only(f):
    """``f`` with its outputs reduced to the tensors (kernels also return None and ints)."""

    def g(*args):
        out = f(*args)
        return tuple(o for o in out if isinstance(o, torch.Tensor)) if isinstance(out, tuple) else out

    return g


def check_against_loop(f, *args, in_dims=0, strides=False):
    """vmap(f) vs the per-example loop, by shapes/dtypes/devices (and, optionally, the
    per-example strides of every batched output). Non-tensor outputs are dropped."""
    f = tensors_only(f)
    with no_fallback():
        got = pf.vmap(f, in_dims=in_dims)(*args)
    want = loop_vmap(f, in_dims=in_dims)(*args)
    assert _meta_of(got) == _meta_of(want)
    if strides:
        gl = torch.utils._pytree.tree_leaves(got)
        one = torch.utils._pytree.tree_leaves(f(*[a.select(0, 0) if d == 0 else a for a, d in
                                                  zip(args, in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args))]))
        for g, o in zip(gl, one):
            if isinstance(o, torch.Tensor) and o.dim() and g.dim() == o.dim() + 1:
                assert g.stride(-1) == 1 or o.stride(-1) != 1
    return got


# -- SDPA's CUDA kernels ------------------------------------------------------------------------

N, H, L, S, E = 2, 4, 8, 8, 16


def test_fake_cuda_tensors_exist(fake):
    x = cuda(2, 3)
    assert x.device.type == "cuda" and pf.vmap(lambda a: a * 2)(x).device.type == "cuda"


@pytest.mark.parametrize("bias", ["none", "batched", "shared", "broadcast"])
@pytest.mark.parametrize("causal", [False, True])
def test_efficient_attention_forward_and_backward(fake, bias, causal):
    q, k, v = cuda(B, N, H, L, E), cuda(B, N, H, S, E), cuda(B, N, H, S, E)
    b = {"none": None, "batched": cuda(B, N, H, L, S), "shared": cuda(N, H, L, S),
         "broadcast": cuda(1, H, L, S).expand(N, H, L, S)}[bias]
    bdim = 0 if bias == "batched" else None

    def fwd(q, k, v, b):
        return aten._scaled_dot_product_efficient_attention(q, k, v, b, True, 0.0, causal)

    out = check_against_loop(fwd, q, k, v, b, in_dims=(0, 0, 0, bdim), strides=True)
    o, lse, seed, offset = out
    g = cuda(B, N, H, L, E)

    def bwd(g, q, k, v, b, o, lse):
        return aten._scaled_dot_product_efficient_attention_backward(
            g, q, k, v, b, o, lse, seed.select(0, 0), offset.select(0, 0), 0.0, [True, True, True, b is not None], causal)

    check_against_loop(bwd, g, q, k, v, b, o, lse, in_dims=(0, 0, 0, 0, bdim, 0, 0))


def test_efficient_attention_bias_rows_are_aligned_in_the_folded_call():
    # the kernel needs bias rows aligned to 16 elements (torch's sdpa pads them): the folded
    # bias of a per-example (N, H, 5, 7) bias must keep that alignment
    from pyfunctorch.batching.attention import _MEM_EFF_ALIGN, _fold_bias

    for bias, d in [(torch.randn(B, N, H, 5, 7), 0), (torch.randn(N, H, 5, 7), None),
                    (torch.randn(1, H, 5, 7), None), (torch.randn(B, 1, H, 5, 7).expand(B, N, H, 5, 7), 0)]:
        folded = _fold_bias(bias, d, B, N, _MEM_EFF_ALIGN)
        assert folded.shape == (B * N, H, 5, 7)
        assert folded.stride(-1) == 1 and all(s % _MEM_EFF_ALIGN == 0 for s in folded.stride()[:-1])
        want = (bias if d is not None else bias.expand(N, H, 5, 7).expand(B, N, H, 5, 7)).reshape(B * N, H, 5, 7)
        assert torch.equal(folded, want)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_forward_and_backward(fake, causal):
    q, k, v = (cuda(B, N, H, L, E, dtype=torch.float16) for _ in range(3))

    def fwd(q, k, v):
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)

    out = check_against_loop(fwd, q, k, v)
    o, lse, rng, unused = out[:4]
    g = torch.empty_like(o)

    def bwd(g, q, k, v, o, lse):
        return aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, o, lse, None, None, L, S, 0.0, causal, rng.select(0, 0), unused.select(0, 0))

    check_against_loop(bwd, g, q, k, v, o, lse)


def test_cudnn_attention_forward_and_backward(fake):
    q, k, v = (cuda(B, N, H, L, E, dtype=torch.float16) for _ in range(3))
    bias = cuda(B, N, H, L, S, dtype=torch.float16)

    def fwd(q, k, v, b):
        return aten._scaled_dot_product_cudnn_attention(q, k, v, b, True, 0.0, False, False)

    out = check_against_loop(fwd, q, k, v, bias)
    o, lse, seed, offset = out[:4]

    def bwd(g, q, k, v, o, lse, b):
        return aten._scaled_dot_product_cudnn_attention_backward(
            g, q, k, v, o, lse, seed.select(0, 0), offset.select(0, 0), b, None, None, L, S, 0.0, False)

    check_against_loop(bwd, torch.empty_like(o), q, k, v, o, lse, bias)


def test_raw_efficient_and_flash_kernels(fake):
    # (B, M, H, K) layout: the vmap batch folds into B
    q, k, v = cuda(B, N, L, H, E), cuda(B, N, S, H, E), cuda(B, N, S, H, E)
    o, lse, seed, offset = check_against_loop(
        lambda q, k, v: aten._efficient_attention_forward(q, k, v, None, None, None, None, None, 0.0, 0, True), q, k, v)
    check_against_loop(
        lambda g, q, k, v, o, lse: aten._efficient_attention_backward(
            g, q, k, v, None, o, None, None, L, S, lse, 0.0, seed.select(0, 0), offset.select(0, 0), 0, False),
        torch.empty_like(o), q, k, v, o, lse)
    qh, kh, vh = (t.to(torch.float16) for t in (q, k, v))
    o, lse, rng, unused, _debug = check_against_loop(
        lambda q, k, v: aten._flash_attention_forward(q, k, v, None, None, L, S, 0.0, False, False), qh, kh, vh)
    check_against_loop(
        lambda g, q, k, v, o, lse: aten._flash_attention_backward(
            g, q, k, v, o, lse, None, None, L, S, 0.0, False, rng.select(0, 0), unused.select(0, 0)),
        torch.empty_like(o), qh, kh, vh, o, lse)


# -- random-tagged ops that draw nothing ----------------------------------------------------------


def test_efficient_attention_without_dropout_is_not_random_and_with_dropout_follows_randomness(fake, monkeypatch):
    q = cuda(B, N, H, L, E)
    f0 = lambda q: aten._scaled_dot_product_efficient_attention(q, q, q, None, False, 0.0, False)[0]  # noqa: E731
    assert pf.vmap(f0)(q).shape == (B, N, H, L, E)  # the default randomness='error' does not raise
    f1 = lambda q: aten._scaled_dot_product_efficient_attention(q, q, q, None, False, 0.1, False)[0]  # noqa: E731
    for randomness in ("error", "same"):
        with pytest.raises(RuntimeError, match="random"):
            pf.vmap(f1, randomness=randomness)(q)
    # 'different': the folded call draws for every example (the fake mode cannot draw vmap's seed)
    monkeypatch.setattr(_api, "draw_seed", lambda: _random.key(0))
    assert pf.vmap(f1, randomness="different")(q).shape == (B, N, H, L, E)


def test_random_tagged_ops_that_draw_nothing_run_under_randomness_error():
    x = torch.randn(B, 5)
    for f in (lambda x: aten.native_dropout(x, 0.0, True)[0], lambda x: aten.native_dropout(x, 0.5, False)[0]):
        assert_close(pf.vmap(f)(x), loop_vmap(f)(x))
    for f in (lambda x: aten.native_dropout(x, 0.5, True)[0], lambda x: aten._fused_dropout(x, 0.0)[0]):
        # (_fused_dropout's p is the probability of keeping an element: p=0 still draws)
        with pytest.raises(RuntimeError, match="random"):
            pf.vmap(f)(x)


def test_cpu_flash_attention_dropout_follows_the_randomness_flag():
    # (torch's CPU flash kernel itself rejects dropout > 0: only the flag is tested here)
    q = torch.randn(B, N, H, L, E)
    f = lambda q: aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.5)[0]  # noqa: E731
    for randomness in ("error", "same"):
        with pytest.raises(RuntimeError, match="random"):
            pf.vmap(f, randomness=randomness)(q)
    g = lambda q: aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0)[0]  # noqa: E731
    assert_close(pf.vmap(g)(q), loop_vmap(g)(q))


def test_grad_of_sdpa_without_dropout_under_randomness_error(device):
    # the original failure (per-sample grads of attention without dropout) on the kernels this
    # device picks; values against torch.func
    q = torch.randn(B, N, H, L, E, device=device)
    w = torch.randn(E, E, device=device)

    def loss(w, q):
        x = q @ w
        return F.scaled_dot_product_attention(x, x, x, dropout_p=0.0).square().sum()

    assert_close(pf.vmap(pf.grad(loss), in_dims=(None, 0))(w, q),
                 torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, q), rtol=1e-3, atol=1e-4)


# -- fused RNN cells, cuDNN convolution and batch norm ----------------------------------------------


@pytest.mark.parametrize("bias", ["shared"])
def test_fused_lstm_cell_forward_and_backward(fake, bias):
    # (torch's meta kernel of _thnn_fused_lstm_cell needs both biases, and _thnn_fused_gru_cell
    # has none: the other cases run on a GPU, in scripts/gpu_models.py)
    Hd = 6
    ig, hg, cx = cuda(B, N, 4 * Hd), cuda(B, N, 4 * Hd), cuda(B, N, Hd)
    bi = {"none": None, "shared": cuda(4 * Hd), "batched": cuda(B, 4 * Hd)}[bias]
    bd = 0 if bias == "batched" else None
    hy, cy, ws = check_against_loop(lambda a, b, c, d: aten._thnn_fused_lstm_cell(a, b, c, d, d),
                                    ig, hg, cx, bi, in_dims=(0, 0, 0, bd))
    # the bias gradient is per example (summed over that example's N only)
    out = check_against_loop(
        lambda gh, gc, cx, cy, ws: aten._thnn_fused_lstm_cell_backward_impl(gh, gc, cx, cy, ws, True),
        torch.empty_like(hy), torch.empty_like(cy), cx, cy, ws)
    assert out[2].shape == (B, 4 * Hd)


def test_cudnn_convolution_and_transpose_on_cpu_values():
    # no meta kernel: the rule (which calls aten.convolution) runs on CPU values here; the
    # oracle is the op's meaning, aten.convolution without a bias, per example
    x, w, wb, wt = torch.randn(B, 2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(B, 4, 3, 3, 3), torch.randn(3, 4, 3, 3)
    with no_fallback():
        got = pf.vmap(lambda x: aten.cudnn_convolution(x, w, [1, 1], [1, 1], [1, 1], 1, False, False, True))(x)
        got_b = pf.vmap(lambda x, w: aten.cudnn_convolution(x, w, [0, 0], [2, 2], [1, 1], 1, False, False, True))(x, wb)
        got_t = pf.vmap(lambda x: aten.cudnn_convolution_transpose(
            x, wt, [1, 1], [1, 1], [2, 2], [1, 1], 1, False, False, True))(x)
    assert_close(got, loop_vmap(lambda x: aten.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))(x))
    assert_close(got_b, loop_vmap(lambda x, w: aten.convolution(x, w, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1))(x, wb))
    assert_close(got_t, loop_vmap(lambda x: aten.convolution(x, wt, None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1))(x))


@pytest.mark.parametrize("training", [True, False])
def test_cudnn_batch_norm_forward_and_backward_on_cpu_values(training):
    # cudnn_batch_norm reaches vmap with wrappers on CUDA (torch's batch_norm picks it for a
    # CUDA input); vmap serves it through torch's decomposition, run here on CPU values. Oracle:
    # native_batch_norm (+ backward) per example, with per-example running stats
    C = 4
    x, w, b = torch.randn(B, 2, C, 5, 5), torch.randn(C), torch.randn(C)
    rm, rv = torch.randn(B, C), torch.rand(B, C) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    out = pf.vmap(lambda x, rm, rv: aten.cudnn_batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5))(x, rm, rv)
    want = loop_vmap(lambda x, rm, rv: aten.native_batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5))(x, rm2, rv2)
    assert_close(out[0], want[0])
    assert_close((rm, rv), (rm2, rv2))
    if training:
        g = torch.randn_like(x)
        got = pf.vmap(lambda g, x, sm, sv: aten.cudnn_batch_norm_backward(x, g, w, None, None, sm, sv, 1e-5, out[3]))(
            g, x, out[1], out[2])
        ref = loop_vmap(lambda g, x, sm, sv: aten.native_batch_norm_backward(
            g, x, w, None, None, sm, sv, True, 1e-5, [True, True, True]))(g, x, want[1], want[2])
        assert_close(got, ref)


def test_raw_efficient_kernel_with_variable_lengths_runs_per_example(fake):
    # cu_seqlens describe the packed problems of one call: no fold, one call per example
    q = cuda(B, 1, 8, H, E)
    cu = torch.empty(3, device="cuda", dtype=torch.int32)
    check_against_loop(
        lambda q: aten._efficient_attention_forward(q, q, q, None, cu, cu, 5, 5, 0.0, 0, True), q)


def test_fused_dropout_backward_kernel(fake):
    # _fused_dropout's backward: _masked_scale(grad, mask, 1/p), elementwise
    g, mask = cuda(B, 4, 5), cuda(B, 4, 5, dtype=torch.uint8)
    check_against_loop(lambda g, m: aten._masked_scale(g, m, 2.0), g, mask)
    check_against_loop(lambda g: aten._masked_scale(g, mask.select(0, 0), 2.0), g)


def test_sdpa_backend_choice_is_the_examples_choice():
    # (devices other than CPU/CUDA dispatch this op from SDPA; random-tagged with a dropout_p)
    q, m = torch.randn(B, N, H, L, E), torch.zeros(B, L, S, dtype=torch.bool)
    f = lambda q, m: q * aten._fused_sdp_choice(q, q, q, m, 0.0)  # noqa: E731
    with no_fallback():
        assert_close(pf.vmap(f)(q, m), loop_vmap(f)(q, m))
