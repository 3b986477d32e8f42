"""Embedding rules: embedding (per-example tables folded into one), its backward and renorm, and embedding_bag with its backward ops."""

from __future__ import annotations

import torch

from .. import _core
from ..errors import batched_write_error
from ._registry import (flat_examples, batch_rule, batch_size_of, materialize, rank, full_args, loop_examples,
                        plain_apply, shared_by_examples, differentiated)

aten = torch.ops.aten


# -- embedding -------------------------------------------------------------------------------


def _offsets(B, per, like, ndim):
    """``b * per`` for each example, shaped to broadcast against a ``(B, ...)`` tensor of rank ``ndim``."""
    return (torch.arange(B, device=like.device, dtype=like.dtype) * per).reshape((B,) + (1,) * (ndim - 1))


@batch_rule(aten.embedding.default)
def embedding(op, args, kwargs, dims):
    if dims[0] is None:
        return op(*args, **kwargs), 0  # a plain lookup of batched indices
    (w, idx, padding_idx, scale_grad_by_freq, sparse), dims = full_args(op, args, kwargs, dims)
    B, V = w.shape[0], w.shape[1]
    idx = materialize(idx, dims[1], B)
    if w.stride(0) == 0 and B > 1:  # one table for every example (a weight expanded along the batch)
        if shared_by_examples(w):  # differentiated per example (per-sample gradients)
            return _shared_embedding(w, idx, padding_idx, scale_grad_by_freq, sparse), 0
        if not w.requires_grad and type(w) is torch.Tensor:
            return op(w.select(0, 0), idx, padding_idx, scale_grad_by_freq, sparse), 0
    if padding_idx >= 0 and differentiated(w):
        # Differentiated (by torch's autograd on the physical batch, or by a level below): the
        # lookup in one table of B*V rows below could honour padding_idx for one example only --
        # the gradient of every other example's padding row would not be zero (grad of vmap of
        # an embedding with padding_idx was silently wrong). Each example's own call is exact in
        # every mode (reverse: no gradient into the padding row; forward AD: torch's tangent).
        return loop_examples(op, [w, idx, padding_idx, scale_grad_by_freq, sparse], [0, 0, None, None, None], B)
    # per-example tables: one table of B*V rows, example b's indices shifted by b*V. An index
    # outside [0, V) would land in another example's rows: send it past the end so that the
    # kernel raises its own "index out of range" (no data-dependent check needed)
    shifted = torch.where((idx < 0) | (idx >= V), B * V, idx + _offsets(B, V, idx, idx.dim()))
    return op(w.flatten(0, 1), shifted, padding_idx, scale_grad_by_freq, sparse), 0


class _SharedEmbedding(torch.autograd.Function):
    """``embedding`` of physical indices (B, *I) in a table (B, V, D) whose examples are one table
    (batch stride 0, a weight differentiated per example): the forward is one lookup in that table
    (no copy of B tables); the gradient of the table is each example's own, as the per-example
    backward of torch's kernel gives it (padding row untouched, counts per example)."""

    @staticmethod
    def forward(ctx, w, idx, padding_idx, scale_grad_by_freq, sparse):
        ctx.save_for_backward(idx)
        ctx.shape, ctx.padding_idx, ctx.scale, ctx.sparse = w.shape, padding_idx, scale_grad_by_freq, sparse
        return aten.embedding.default(w.select(0, 0), idx, padding_idx, scale_grad_by_freq, sparse)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        B, V = ctx.shape[0], ctx.shape[1]
        if ctx.padding_idx >= 0:  # (after the shift below each example has its own padding row)
            g = g.masked_fill((idx == ctx.padding_idx).unsqueeze(-1), 0)
        # (recording a graph when create_graph is on: embedding_dense_backward is differentiable in g)
        gw = aten.embedding_dense_backward.default(g, idx + _offsets(B, V, idx, idx.dim()), B * V, -1, ctx.scale)
        gw = gw.reshape(ctx.shape)
        if ctx.sparse:  # (torch's sparse gradient of each example's table)
            gw = gw.to_sparse(2)
        return gw, None, None, None, None


_shared_embedding = plain_apply(_SharedEmbedding)


@batch_rule(aten.embedding_dense_backward.default)
def embedding_dense_backward(op, args, kwargs, dims):
    go, idx, num_weights, padding_idx, scale_grad_by_freq = args
    B = batch_size_of(args, dims)
    if dims[1] is None:
        # shared indices: the batch rides in the feature dim, (B, *I, D) -> (*I, B*D)
        D = go.shape[-1]
        out = op(go.movedim(0, -2).flatten(-2), idx, num_weights, padding_idx, scale_grad_by_freq)
        return out.reshape(num_weights, B, D), 1
    go = materialize(go, dims[0], B)
    if padding_idx >= 0:  # after shifting, each example has its own padding row: mask instead
        go = go.masked_fill((idx == padding_idx).unsqueeze(-1), 0)
    out = op(go, idx + _offsets(B, num_weights, idx, idx.dim()), B * num_weights, -1, scale_grad_by_freq)
    return out.reshape(B, num_weights, -1), 0


@batch_rule(aten.embedding_renorm_.default)
def embedding_renorm_(op, args, kwargs, dims):
    # Per example: each row of the table that the indices name (negative ones wrap) is scaled
    # by max_norm / (norm + 1e-7) if its norm exceeds max_norm. Gather the named rows, scale them
    # as the kernel does (the scale in double, applied in the table's dtype), scatter them back
    # (a row named twice gets the same value twice).
    w, idx, max_norm, norm_type = args
    if dims[0] is None:  # per-example indices would renorm one shared table differently
        raise batched_write_error(op)
    if w.dim() != 3:
        raise RuntimeError(f"embedding_renorm_: Expected 2-dimensional tensor, but got {w.dim() - 1}-dimensional tensor "
                           "for argument #1 'self'")
    if idx.dtype not in (torch.int64, torch.int32):
        raise RuntimeError("embedding_renorm_: Expected tensor for argument #2 'indices' to have one of the following "
                           f"scalar types: Long, Int; but got {idx.dtype} instead")
    B, V, D = w.shape
    idx = flat_examples(materialize(idx, dims[1], B), B).long()
    idx = torch.where(idx < 0, idx + V, idx).unsqueeze(-1).expand(B, idx.shape[1], D)
    rows = w.gather(1, idx)
    norm = torch.linalg.vector_norm(rows, norm_type, dim=-1, keepdim=True).double()
    scale = torch.where(norm > max_norm, max_norm / (norm + 1e-7), torch.ones((), dtype=norm.dtype, device=norm.device))
    w.scatter_(1, idx, rows * scale.to(w.dtype))
    return args[0], 0


# -- embedding_bag -------------------------------------------------------------------------------
# The bags of all examples become the bags of one call: example b's indices follow those of
# examples < b (its offsets shift by b*L), and a per-example table joins one table of B*V rows
# (its indices shift by b*V; padding entries point at one extra zero row, the folded call's
# padding_idx). The auxiliary outputs are made to look like the per-example kernel's:
#   offset2bag: empty on the kernel's 'sum' fast path (a float/half/bfloat16 table whose rows
#     are contiguous, per_sample_weights too, no padding_idx), else each index's bag;
#   bag_size:   the bag sizes (less padding) for 'mean'/'max'; for 'sum' the kernel leaves it
#     uninitialized (shaped like offsets in the forward-only op): zeros here;
#   max_indices: the argmax rows for 'max', else shaped like bag_size (a copy of it).


def _plain(*ts):
    """Whether reading these tensors' values is free (no outer vmap level would have to run
    the function per example)."""
    return not any(isinstance(t, _core.LevelTensor) for t in ts if t is not None)


def _loop_tuple(op, args, dims, B):
    """As ``_loop``, for ops that return a tuple of tensors."""
    outs = [op(*[a.select(0, b) if d is not None else a for a, d in zip(args, dims)]) for b in range(B)]
    return tuple(torch.stack(col) for col in zip(*outs)), 0


def _bag_fast_path(dtype, row_stride, pad, psw_stride):
    """Whether the CPU kernel takes its 'sum' fast path (which leaves offset2bag empty)."""
    return (dtype in (torch.float32, torch.float16, torch.bfloat16) and row_stride == 1 and pad < 0
            and (psw_stride is None or psw_stride == 1))


@batch_rule(aten._embedding_bag_forward_only.default, aten._embedding_bag.default)
def embedding_bag(op, args, kwargs, dims):
    args, dims = full_args(op, args, kwargs, dims)
    w, idx, off, sgbf, mode, sparse, psw, ilo, pad = args
    wd, id_, od, pd = dims[0], dims[1], dims[2], dims[6]
    B = batch_size_of(args, dims)
    if rank(idx, id_) != 1 or rank(off, od) != 1 or rank(w, wd) != 2:
        return _loop_tuple(op, args, dims, B)  # (2-d indices, or inputs the kernel rejects)
    if sgbf and (differentiated(w) or differentiated(psw)):
        # scale_grad_by_freq, differentiated on the physical batch (per-sample gradients, or a
        # level around vmap): the folded call's gradient was not each example's (silently wrong);
        # each example's own call is exact. (The differentiable kernel: see `call` below.)
        return _loop_tuple(aten._embedding_bag.default, args, dims, B)
    V, D = w.shape[-2], w.shape[-1]
    itype = torch.promote_types(idx.dtype, off.dtype)
    idx = materialize(idx, id_, B).to(itype)
    off = materialize(off, od, B).to(itype)
    L, n_off = idx.shape[1], off.shape[1]
    nb = n_off - 1 if ilo else n_off
    if nb < 0 or (ilo and n_off == 0):
        return _loop_tuple(op, args, dims, B)  # (raises as per example)
    if _plain(off) and n_off:
        first, last = off[:, 0], off[:, -1]
        if bool((first != 0).any()):
            bad = int(first[first != 0][0])
            raise RuntimeError("offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start "
                               f"from position 0. However, got {bad}")
        if bool((last > L).any()):
            raise RuntimeError(f"offsets[-1] can not be greater than input's length {L} but got offsets[-1] of "
                               f"{int(last.max())}")
        if ilo and bool((last != L).any()):
            # the kernel's paths disagree on where the last bag ends then: run it per example
            return _loop_tuple(op, args, dims, B)
    elif n_off:  # offsets batched at an outer level: check them without reading them in Python
        first, last = off[:, 0], off[:, -1]
        torch._assert_async((first == 0).all(), "embedding_bag: offsets[0] has to be 0, i.e., the first sequence in "
                                                "the mini-batch has to start from position 0")
        torch._assert_async((last <= L).all(), f"embedding_bag: offsets[-1] can not be greater than input's length {L}")
        if ilo:
            torch._assert_async((last == L).all(), "embedding_bag under nested vmap: include_last_offset=True needs "
                                                   f"offsets[-1] == len(input) ({L}) in every example")
    # the per-example 'sum' fast path (it decides the shape of offset2bag)
    fast = _bag_fast_path(w.dtype, w.stride(2) if wd is not None else w.stride(1), pad,
                          None if psw is None else (psw.stride(1) if pd is not None else psw.stride(0)))
    ar = torch.arange(B, device=idx.device, dtype=itype).reshape(B, 1)
    if wd is not None:
        if _plain(idx) and idx.numel() and bool(((idx < 0) | (idx >= V)).any()):
            bad = idx[(idx < 0) | (idx >= V)][0]
            raise IndexError(f"embedding_bag: Expected idx >= 0 && idx < num_embeddings but found idx to be {int(bad)}")
        table = w.reshape(B * V, D)
        flat_idx = idx + ar * V
        rows = B * V
    else:
        table, flat_idx, rows = w, idx, V
    pad_f = pad
    psw_f = None if psw is None else materialize(psw, pd, B).reshape(-1)
    if pad >= 0 and wd is not None:  # each example's padding row -> one shared zero row
        table = torch.cat([table, table.new_zeros((1, D))])
        flat_idx = torch.where(idx == pad, torch.full((), rows, dtype=itype, device=idx.device), flat_idx)
        pad_f = rows
    elif mode == 0 and not fast and _bag_fast_path(table.dtype, table.stride(1), pad_f,
                                                     None if psw_f is None else psw_f.stride(0)):
        # keep the folded call off the fast path too (offset2bag): a padding row nobody names
        table = torch.cat([table, table.new_zeros((1, D))])
        pad_f = rows
    if wd is not None and not _plain(idx):
        # (under an outer vmap the check above cannot read the indices: an out-of-range one
        # would name another example's row, so send it past the table's end, where the
        # kernel raises)
        flat_idx = torch.where((idx < 0) | (idx >= V), table.shape[0], flat_idx)
    flat_off = (off[:, :nb] + ar * L).reshape(-1)
    call = op
    if op is aten._embedding_bag_forward_only.default and (differentiated(table) or differentiated(psw_f)):
        # F.embedding_bag picks the forward-only kernel for tensors that do not require grad, as
        # this level's wrappers do not; their physical values carry a lower level's derivative
        # (grad around vmap), which that kernel refuses ("Autograd not support dtype: Long"):
        # the differentiable kernel, same values (this rule shapes the outputs as op's)
        call = aten._embedding_bag.default
    out, o2b, bag_size, max_idx = call(table, flat_idx.reshape(-1), flat_off, sgbf, mode, sparse, psw_f, False, pad_f)
    out = out.reshape(B, nb, D)
    if mode == 0 and fast:
        o2b = o2b.new_zeros((B, 0))
    else:
        o2b = o2b.reshape(B, L) - ar * nb
    if mode == 0:
        n = n_off if op is aten._embedding_bag_forward_only.default else nb
        bag_size = torch.zeros((B, n), dtype=itype, device=idx.device)
    else:
        bag_size = bag_size.reshape(B, nb)
    if mode == 2:
        max_idx = max_idx.reshape(B, nb, D)
        if wd is not None:  # back to per-example rows (an empty bag keeps its 0)
            shift = (ar * V).reshape(B, 1, 1)
            max_idx = torch.where(max_idx >= shift, max_idx - shift, max_idx)
    else:
        max_idx = bag_size.clone()
    return (out, o2b, bag_size, max_idx), 0


def _fold_bag_indices(idx, B, V, pad, itype):
    """Example b's indices into a table of B*V rows (+ one dump row, B*V, for padding entries):
    (flat indices, number of rows, padding_idx of the folded call)."""
    ar = torch.arange(B, device=idx.device, dtype=itype).reshape(B, 1)
    flat = idx.to(itype) + ar * V
    if pad < 0:
        return flat.reshape(-1), B * V, -1
    flat = torch.where(idx == pad, torch.full((), B * V, dtype=itype, device=idx.device), flat)
    return flat.reshape(-1), B * V + 1, B * V


def _fold_bag_offsets(off, B, L, nb, itype):
    ar = torch.arange(B, device=off.device, dtype=itype).reshape(B, 1)
    return (off.to(itype)[:, :nb] + ar * L).reshape(-1)


def _fold_offset2bag(o2b, B, nb):
    if o2b.shape[1] == 0:  # (the 'sum' fast path left it empty: the backward rebuilds it from the offsets)
        return o2b.reshape(-1)
    ar = torch.arange(B, device=o2b.device, dtype=o2b.dtype).reshape(B, 1)
    return (o2b + ar * nb).reshape(-1)


@batch_rule(aten._embedding_bag_backward.default, aten._embedding_bag_dense_backward.default)
def embedding_bag_backward(op, args, kwargs, dims):
    # The grad of each example's table: one table of B*V rows, as the forward folds it.
    args, dims = full_args(op, args, kwargs, dims)
    dense = op is aten._embedding_bag_dense_backward.default
    if dense:
        grad, idx, o2b, bag_size, max_idx, V, sgbf, mode, psw, pad = args
        off, sparse = None, False
        od = None
        gd, id_, o2d, bsd, mid, pd = dims[0], dims[1], dims[2], dims[3], dims[4], dims[8]
    else:
        grad, idx, off, o2b, bag_size, max_idx, V, sgbf, mode, sparse, psw, pad = args
        gd, id_, od, o2d, bsd, mid, pd = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[10]
    B = batch_size_of(args, dims)
    if sparse or rank(idx, id_) != 1 or rank(grad, gd) != 2:
        return loop_examples(op, args, dims, B)  # (sparse gradients; inputs the kernel rejects)
    grad = materialize(grad, gd, B)
    nb, D = grad.shape[1], grad.shape[2]
    idx = materialize(idx, id_, B)
    itype = idx.dtype if off is None else torch.promote_types(idx.dtype, off.dtype)
    L = idx.shape[1]
    o2b = materialize(o2b, o2d, B)
    if dense and o2b.shape[1] == 0 and L:
        return loop_examples(op, args, dims, B)  # (no offsets to rebuild offset2bag from)
    if sgbf and mode != 2:
        psw = None if psw is None else materialize(psw, pd, B)
        bag_size = materialize(bag_size, bsd, B)
        o2b = _bag_of_index(o2b, None if off is None else materialize(off, od, B), B, L, nb)
        return _bag_grad_by_freq(grad, idx, o2b, bag_size, V, mode, psw, pad), 0
    flat_idx, rows, pad_f = _fold_bag_indices(idx, B, V, pad, itype)
    bag_size = materialize(bag_size, bsd, B).reshape(-1)
    max_idx = materialize(max_idx, mid, B)
    if mode == 2:  # argmax rows of example b's table
        ar = torch.arange(B, device=max_idx.device, dtype=max_idx.dtype).reshape((B,) + (1,) * (max_idx.dim() - 1))
        max_idx = max_idx + ar * V
    max_idx = max_idx.reshape((-1,) + tuple(max_idx.shape[2:]))
    psw_f = None if psw is None else materialize(psw, pd, B).reshape(-1)
    o2b_f = _fold_offset2bag(o2b, B, nb)
    g = grad.reshape(B * nb, D)
    if dense:
        out = op(g, flat_idx, o2b_f, bag_size, max_idx, rows, sgbf, mode, psw_f, pad_f)
    else:
        off_f = _fold_bag_offsets(materialize(off, od, B), B, L, nb, itype)
        out = op(g, flat_idx, off_f, o2b_f, bag_size, max_idx, rows, sgbf, mode, False, psw_f, pad_f)
    return out[: B * V].reshape(B, V, D), 0


def _bag_of_index(o2b, off, B, L, nb):
    """Each index's bag, ``(B, L)``: offset2bag, or (where the forward left it empty) counted
    from the offsets."""
    if o2b.shape[1] == L:
        return o2b
    pos = torch.arange(L, device=off.device, dtype=off.dtype).expand(B, L).contiguous()
    return aten.searchsorted.Tensor(off[:, :nb].contiguous(), pos, right=True) - 1


_FREQ_OF_SORTED_POSITION: dict = {}  # device type -> whether its kernel has the quirk below


def _freq_of_sorted_position(device) -> bool:
    """Whether this device's kernel scales group number ``i`` by the frequency of
    ``sorted_indices[i]`` (torch 2.13's CPU kernel) instead of the group's own frequency (torch
    2.15's): asked of the kernel itself, once per device type, on indices [3, 1, 3, 5, 1, 3]
    (row 3 gets 1.5 with the quirk, 1.0 without)."""
    quirk = _FREQ_OF_SORTED_POSITION.get(device.type)
    if quirk is None:
        kw = dict(device=device)
        idx = torch.tensor([3, 1, 3, 5, 1, 3], **kw)
        o2b = torch.tensor([0, 0, 1, 1, 2, 2], **kw)
        size = torch.full((3,), 2, **kw)
        out = aten._embedding_bag_dense_backward.default(
            torch.ones((3, 1), dtype=torch.float64, **kw), idx, o2b, size, torch.zeros(3, dtype=torch.long, **kw),
            6, True, 0, None, -1)
        quirk = _FREQ_OF_SORTED_POSITION[device.type] = bool(out[3, 0] != 1)
    return quirk


def _bag_grad_by_freq(grad, idx, bag, bag_size, V, mode, psw, pad):
    """The table gradient of 'sum'/'mean' bags with scale_grad_by_freq, ``(B, V, D)``, computed
    by hand: torch 2.13's CPU kernel walks the sorted indices in groups of equal values and
    divides group number ``i`` by the frequency of ``sorted_indices[i]`` (not of the group's own
    value), which no fold of the examples into one call reproduces; torch 2.15's divides by the
    group's own frequency. Which one the device's kernel does is asked of the kernel
    (``_freq_of_sorted_position``). Same arithmetic: the scale in double (per-sample weight /
    frequency / bag size), applied in the gradient's dtype."""
    B, nb, D = grad.shape
    L = idx.shape[1]
    idx = idx.long()
    srt = idx.sort(1).values
    first = torch.ones((B, 1), dtype=torch.bool, device=idx.device)
    group = torch.cat([first, srt[:, 1:] != srt[:, :-1]], 1).long().cumsum(1) - 1  # group of sorted[k]
    where = aten.searchsorted.Tensor(srt.contiguous(), idx.contiguous())  # first sorted position of idx[j]
    # sorted[group of idx[j]] where the kernel has the quirk, else idx[j]'s own value
    key = srt.gather(1, group.gather(1, where)) if _freq_of_sorted_position(idx.device) else idx
    counts = torch.zeros((B, V), dtype=torch.float64, device=idx.device).scatter_add(
        1, idx, torch.ones((), dtype=torch.float64, device=idx.device).expand(B, L))
    scale = 1.0 / counts.gather(1, key)
    if psw is not None:
        scale = psw.to(torch.float64) * scale
    bag = bag.long()
    if mode == 1:
        size = flat_examples(bag_size, B).gather(1, bag.clamp(0, max(nb - 1, 0))).to(torch.float64)
        scale = torch.where(size != 0, scale / size, scale)
    keep = idx != pad
    contrib = grad.gather(1, bag.clamp(0, max(nb - 1, 0)).unsqueeze(-1).expand(B, L, D))
    contrib = torch.where(keep.unsqueeze(-1), contrib * scale.to(grad.dtype).unsqueeze(-1),
                          torch.zeros((), dtype=grad.dtype, device=grad.device))
    ar = torch.arange(B, device=idx.device).reshape(B, 1)
    out = torch.zeros((B * V, D), dtype=grad.dtype, device=grad.device)
    return out.index_add(0, (idx + ar * V).reshape(-1), contrib.reshape(B * L, D)).reshape(B, V, D)


@batch_rule(aten._embedding_bag_per_sample_weights_backward.default)
def embedding_bag_per_sample_weights_backward(op, args, kwargs, dims):
    # per index: grad[bag] . weight[index] (0 for padding): fold the bags and the tables
    args, dims = full_args(op, args, kwargs, dims)
    grad, w, idx, off, o2b, mode, pad = args
    gd, wd, id_, od, o2d = dims[:5]
    B = batch_size_of(args, dims)
    if rank(idx, id_) != 1 or rank(grad, gd) != 2 or rank(w, wd) != 2:
        return loop_examples(op, args, dims, B)
    grad = materialize(grad, gd, B)
    nb, D = grad.shape[1], grad.shape[2]
    idx = materialize(idx, id_, B)
    itype = torch.promote_types(idx.dtype, off.dtype)
    L = idx.shape[1]
    if wd is not None:
        V = w.shape[1]
        flat_idx, rows, pad_f = _fold_bag_indices(idx, B, V, pad, itype)
        table = w.reshape(B * V, D)
        if rows > B * V:
            table = torch.cat([table, table.new_zeros((1, D))])
    else:
        table, flat_idx, pad_f = w, idx.to(itype).reshape(-1), pad
    off_f = _fold_bag_offsets(materialize(off, od, B), B, L, nb, itype)
    o2b_f = _fold_offset2bag(materialize(o2b, o2d, B), B, nb)
    out = op(grad.reshape(B * nb, D), table, flat_idx, off_f, o2b_f, mode, pad_f)
    return out.reshape(B, L), 0
