"""Pairwise-distance and attention rules: cdist, pdist and scaled dot-product attention (batch folded into N)."""

from __future__ import annotations

import torch

from .. import _core
from ..errors import RandomnessError
from ._registry import batch_rule, batch_size_of, materialize, pad_to_rank

aten = torch.ops.aten


# -- cdist, attention ------------------------------------------------------------------------


def _flat_lead(t, lead):
    """Expand ``t``'s leading dims to ``lead`` and flatten them into one."""
    return t.expand(tuple(lead) + t.shape[-2:]).reshape((-1,) + t.shape[-2:])


@batch_rule(aten._cdist_forward.default)
def cdist_forward(op, args, kwargs, dims):
    x1, x2 = args[0], args[1]
    B = batch_size_of(args, dims)
    x1, x2 = materialize(x1, dims[0], B), materialize(x2, dims[1], B)
    r = max(x1.dim(), x2.dim())
    x1, x2 = pad_to_rank(x1, 0, r - 1), pad_to_rank(x2, 0, r - 1)
    lead = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    out = op(_flat_lead(x1, lead), _flat_lead(x2, lead), *args[2:], **kwargs)
    return out.reshape(tuple(lead) + out.shape[-2:]), 0


@batch_rule(aten._cdist_backward.default)
def cdist_backward(op, args, kwargs, dims):
    grad, x1, x2, p, cdist = args
    B = batch_size_of(args, dims)
    grad, cdist = materialize(grad, dims[0], B), materialize(cdist, dims[4], B)
    lead = grad.shape[:-2]
    x1 = pad_to_rank(materialize(x1, dims[1], B), 0, len(lead) + 1)
    x2 = pad_to_rank(materialize(x2, dims[2], B), 0, len(lead) + 1)
    out = op(_flat_lead(grad, lead), _flat_lead(x1, lead), _flat_lead(x2, lead), p, _flat_lead(cdist, lead))
    return out.reshape(tuple(lead) + out.shape[-2:]), 0


def _check_pdist(x, p):
    if x.dim() != 3:
        raise RuntimeError(f"pdist only supports 2D tensors, got: {x.dim() - 1}D")
    if p < 0:
        raise RuntimeError("pdist only supports non-negative p values")


@batch_rule(aten._pdist_forward.default)
def pdist_forward(op, args, kwargs, dims):
    # the pairs i < j of each example's cdist, row-major (the order pdist lists them in);
    # compute_mode 2: the direct formula, never the matmul shortcut for p=2
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
    _check_pdist(x, p)
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    return aten._cdist_forward.default(x, x, p, 2)[:, i, j], 0


@batch_rule(aten._pdist_backward.default)
def pdist_backward(op, args, kwargs, dims):
    # pdist(x)[k] = cdist(x, x)[i_k, j_k]: x gets the gradient of both of its roles, which is
    # cdist's backward (w.r.t. x1) of the symmetric grad G + G^T over the symmetric distances
    grad, x, p, dist = args
    B = batch_size_of(args, dims)
    grad, x, dist = (materialize(t, d, B) for t, d in zip((grad, x, dist), (dims[0], dims[1], dims[3])))
    _check_pdist(x, p)
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    g = _sym_from_pairs(grad, n, i, j)
    d = _sym_from_pairs(dist, n, i, j)
    return aten._cdist_backward.default(g, x.contiguous(), x.contiguous(), p, d), 0


def _sym_from_pairs(v, n, i, j):
    """``(B, n(n-1)/2)`` values of the pairs i < j -> the symmetric ``(B, n, n)`` matrix (zero
    diagonal)."""
    B = v.shape[0]
    flat = v.new_zeros((B, n * n))
    idx = torch.cat([i * n + j, j * n + i]).expand(B, -1)
    return flat.scatter(1, idx, torch.cat([v, v], 1)).reshape(B, n, n)


def _fold_mask(kwargs, B, N, kwarg_dims=None):
    """attn_mask for the folded call. Per example it is (L, S) or broadcasts against
    (N, H, L, S) as a 4-d tensor; after folding, N becomes B*N. A batched mask (B, *mask)
    gives every example its own."""
    m = kwargs.get("attn_mask")
    if m is None:
        return kwargs
    if kwarg_dims and kwarg_dims.get("attn_mask") is not None:
        if m.dim() == 3:  # (B, L, S)
            m = m[:, None, None]
        if m.dim() == 5:
            m = m.expand((B, N) + m.shape[2:]).flatten(0, 1)
        return dict(kwargs, attn_mask=m)  # (anything else: let the kernel raise its error)
    if m.dim() == 4 and m.shape[0] != 1:
        return dict(kwargs, attn_mask=m.unsqueeze(0).expand((B,) + m.shape).flatten(0, 1))
    return kwargs


def _check_attention_dropout(dropout_p):
    """Attention with dropout is random. A rule is not told which vmap level runs it, so follow
    every live vmap level, as random factories do: 'different' everywhere -> the fold draws
    independently per example; otherwise raise."""
    if not dropout_p:
        return
    modes = {i.randomness for i in _core.interpreter_stack() if i.kind == "vmap"}
    if modes - {"different"}:
        raise RandomnessError(
            "vmap: scaled_dot_product_attention with dropout_p > 0 is random; under vmap it needs "
            "randomness='different' (each example draws its own dropout mask). randomness='same' "
            "cannot be honoured with batched inputs. Or pass dropout_p=0 (e.g. model.eval())."
        )


def _attention_batch(args, dims, kwargs, kwarg_dims, n):
    """Batch size and per-example N of an attention call whose first ``n`` args are tensors."""
    B = batch_size_of([*args[:n], kwargs.get("attn_mask")], [*dims[:n], (kwarg_dims or {}).get("attn_mask")])
    q, d = args[0], dims[0]
    return B, q.shape[1] if d is not None else q.shape[0]


@batch_rule(aten._scaled_dot_product_flash_attention_for_cpu.default, batched_kwargs=True)
def sdpa_flash_cpu(op, args, kwargs, dims, kwarg_dims=None):
    # the kernel takes (N, H, L, E): the batch joins N
    _check_attention_dropout(args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0))
    B, N = _attention_batch(args, dims, kwargs, kwarg_dims, 3)
    q, k, v = (materialize(t, d, B).flatten(0, 1) for t, d in zip(args[:3], dims[:3]))
    out, lse = op(q, k, v, *args[3:], **_fold_mask(kwargs, B, N, kwarg_dims))
    return (out.reshape((B, -1) + out.shape[1:]), lse.reshape((B, -1) + lse.shape[1:])), 0


@batch_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, batched_kwargs=True)
def sdpa_flash_cpu_backward(op, args, kwargs, dims, kwarg_dims=None):
    B, N = _attention_batch(args, dims, kwargs, kwarg_dims, 6)
    ts = [materialize(t, d, B).flatten(0, 1) for t, d in zip(args[:6], dims[:6])]
    grads = op(*ts, *args[6:], **_fold_mask(kwargs, B, N, kwarg_dims))
    return tuple(g.reshape((B, -1) + g.shape[1:]) for g in grads), 0


# -- the CUDA attention kernels (efficient, flash, cuDNN) --------------------------------------
# Each takes the batch of attention problems in dim 0 (N of (N, H, L, E), or B of the raw
# kernels' (B, M, H, K)): the vmap batch folds into it, as for the CPU flash kernel. The
# table names, per op, the positions of the folded tensor arguments, of the attention bias, of
# the tensors that describe the whole call (philox seed/offset, rng_state: one folded call
# draws one seed, and its backward, folded the same way, replays it), of the variable-length
# arguments (cu_seqlens: folding is not defined for them; those calls run per example), and of
# the folded outputs. A debug attention mask (returned only when asked for) is folded when it
# has the batch of problems in dim 0. Dropout (dropout_p > 0) reaches a rule only under
# randomness='different' (see batched/interpreter.py: _OpInfo.resolve): the folded call draws
# independently for every example.

#: keyword tensors of the raw kernels that describe each problem of the batch (a fold would
#: need them repeated per example): such calls run per example
_PER_PROBLEM_KWARGS = ("seqlen_k", "seqused_k", "block_table", "alibi_slopes")
_MEM_EFF_ALIGN = 16  # elements: the efficient kernel's alignment of the bias rows (torch's pad_bias)


class _Spec:
    __slots__ = ("folded", "bias", "whole", "varlen", "outs", "debug", "align")

    def __init__(self, folded, outs, bias=None, whole=(), varlen=(), debug=None, align=0):
        self.folded, self.outs, self.bias = folded, outs, bias
        self.whole, self.varlen, self.debug, self.align = whole, varlen, debug, align


_CUDA_ATTENTION = {
    # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal)
    #   -> (output, log_sumexp, philox_seed, philox_offset)
    "_scaled_dot_product_efficient_attention": _Spec((0, 1, 2), (0, 1), bias=3, align=_MEM_EFF_ALIGN),
    # (grad_out, q, k, v, attn_bias, out, logsumexp, philox_seed, philox_offset, ...) -> (dq, dk, dv, dbias)
    "_scaled_dot_product_efficient_attention_backward": _Spec(
        (0, 1, 2, 3, 5, 6), (0, 1, 2, 3), bias=4, whole=(7, 8), align=_MEM_EFF_ALIGN),
    # (q, k, v, dropout_p, is_causal, return_debug_mask) -> (output, logsumexp, cum_seq_q,
    #   cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)
    "_scaled_dot_product_flash_attention": _Spec((0, 1, 2), (0, 1), debug=8),
    # (grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    #   is_causal, philox_seed, philox_offset) -> (dq, dk, dv)
    "_scaled_dot_product_flash_attention_backward": _Spec(
        (0, 1, 2, 3, 4, 5), (0, 1, 2), whole=(12, 13), varlen=(6, 7)),
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask)
    #   -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug)
    "_scaled_dot_product_cudnn_attention": _Spec((0, 1, 2), (0, 1), bias=3, debug=8),
    # (grad_out, q, k, v, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q,
    #   cum_seq_k, max_q, max_k, dropout_p, is_causal) -> (dq, dk, dv)
    "_scaled_dot_product_cudnn_attention_backward": _Spec(
        (0, 1, 2, 3, 4, 5), (0, 1, 2), bias=8, whole=(6, 7), varlen=(9, 10)),
    # raw kernels, (B, M, H, K) layout: (q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    #   max_seqlen_k, dropout_p, custom_mask_type, compute_log_sumexp)
    #   -> (output, logsumexp, philox_seed, philox_offset, max_seqlen_batch_q, max_seqlen_batch_k)
    "_efficient_attention_forward": _Spec((0, 1, 2), (0, 1), bias=3, varlen=(4, 5), align=_MEM_EFF_ALIGN),
    # (grad_out, q, k, v, bias, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    #   logsumexp, dropout_p, philox_seed, philox_offset, ...) -> (dq, dk, dv, dbias)
    "_efficient_attention_backward": _Spec(
        (0, 1, 2, 3, 5, 10), (0, 1, 2, 3), bias=4, whole=(12, 13), varlen=(6, 7), align=_MEM_EFF_ALIGN),
    # (q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask)
    #   -> (output, softmax_logsumexp, rng_state, unused, debug_attn_mask)
    "_flash_attention_forward": _Spec((0, 1, 2), (0, 1), varlen=(3, 4), debug=4),
    # (grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
    #   is_causal, rng_state, unused) -> (dq, dk, dv)
    "_flash_attention_backward": _Spec((0, 1, 2, 3, 4, 5), (0, 1, 2), whole=(12, 13), varlen=(6, 7)),
}


def _fold(t, d, B):
    """``(B, n, ...)`` (or an unbatched ``(n, ...)``, the same for every example) ->
    ``(B*n, ...)``, last dim contiguous as the kernels require."""
    t = materialize(t, d, B).flatten(0, 1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _fold_bias(bias, d, B, n, align):
    """The attention bias of the folded call: per example it has ``n`` problems (or 1,
    broadcast); folded, ``B*n`` -- by a stride-0 expand where it is the same for all. The
    efficient kernel wants its rows aligned: pad as torch's sdpa front end does."""
    if d is None and bias.shape[0] == 1:
        bias = bias.expand((B * n,) + bias.shape[1:])
    else:
        bias = materialize(bias, d, B)
        bias = bias.expand((B, n) + bias.shape[2:]).flatten(0, 1)
    if bias.stride(-1) != 1 or (align and any(s % align for s in bias.stride()[:-1])):
        S = bias.shape[-1]
        pad = (-S) % align if align else 0
        if pad:  # rows of a padded buffer; the kernel never reads the padding (left unset)
            bias = torch.cat([bias, bias.new_empty(bias.shape[:-1] + (pad,))], -1).narrow(-1, 0, S)
        else:
            bias = bias.contiguous()
    return bias


def _per_example(op, args, kwargs, dims, B):
    """One call per example (variable-length batches, or batched seeds): every tensor output
    is stacked, other outputs are the first example's."""
    outs = [op(*[a.select(0, b) if d is not None else a for a, d in zip(args, dims)], **kwargs) for b in range(B)]
    stacked = []
    for i, o in enumerate(outs[0]):
        if isinstance(o, torch.Tensor):
            stacked.append(torch.stack([out[i] for out in outs]))
        else:
            stacked.append(o)
    return tuple(stacked), tuple(0 if isinstance(o, torch.Tensor) else None for o in stacked)


def _dropout_p(op, args, kwargs):
    for i, a in enumerate(op._schema.arguments):
        if a.name == "dropout_p":
            return args[i] if i < len(args) else kwargs.get("dropout_p", a.default_value)
    return 0.0


def _cuda_attention_rule(spec):
    def rule(op, args, kwargs, dims):
        args, dims = list(args), list(dims)
        B = batch_size_of(args, dims)
        if any(i < len(args) and (dims[i] is not None or args[i] is not None) for i in spec.varlen) or \
                any(i < len(args) and dims[i] is not None for i in spec.whole) or \
                any(kwargs.get(k) is not None for k in _PER_PROBLEM_KWARGS):
            return _per_example(op, args, kwargs, dims, B)
        _check_attention_dropout(_dropout_p(op, args, kwargs))
        if spec.bias is not None and spec.bias < len(args) and args[spec.bias] is not None:
            first, d = args[spec.folded[0]], dims[spec.folded[0]]  # all folded args share n
            n = first.shape[1] if d is not None else first.shape[0]
            args[spec.bias] = _fold_bias(args[spec.bias], dims[spec.bias], B, n, spec.align)
        for i in spec.folded:
            args[i] = _fold(args[i], dims[i], B)
        out = list(op(*args, **kwargs))
        out_dims = [None] * len(out)
        BN = args[spec.folded[0]].shape[0]
        for i in spec.outs + ((spec.debug,) if spec.debug is not None else ()):
            o = out[i]
            if isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == BN and (i != spec.debug or o.numel()):
                out[i] = o.reshape((B, BN // B) + o.shape[1:])
                out_dims[i] = 0
        return tuple(out), out_dims

    return rule


for _name, _spec in _CUDA_ATTENTION.items():
    _packet = getattr(aten, _name, None)
    if _packet is not None and hasattr(_packet, "default"):
        batch_rule(_packet.default)(_cuda_attention_rule(_spec))


if hasattr(aten, "_fused_sdp_choice"):

    @batch_rule(aten._fused_sdp_choice.default, batched_kwargs=True)
    def fused_sdp_choice(op, args, kwargs, dims, kwarg_dims=None):
        # which kernel SDPA takes depends on shapes, dtypes and flags, the same for every
        # example: ask for example 0 (devices whose SDPA dispatches this op, not a C++ stub)
        one = [a.select(0, 0) if d is not None else a for a, d in zip(args, dims)]
        kw = {k: (v.select(0, 0) if (kwarg_dims or {}).get(k) is not None else v) for k, v in kwargs.items()}
        return op(*one, **kw), None
