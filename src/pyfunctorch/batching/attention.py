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
