"""Loss rules: nll_loss, the margin losses and CTC loss.

Served by exact ``torch._decomp`` decompositions instead (all their sub-ops have
rules): mse_loss, binary_cross_entropy (+backward, also with weights),
binary_cross_entropy_with_logits, smooth_l1_loss, huber_loss (+backwards),
soft_margin_loss, multilabel_soft_margin_loss. kl_div, l1_loss and cross_entropy
(log_softmax + nll_loss) are CompositeImplicit.
"""

from __future__ import annotations

import torch

from .. import _core

from ._registry import (flat_examples, batch_rule, batch_size_of, check_example, materialize, rank, full_args, loop_examples,
                        plain_apply)

aten = torch.ops.aten


# -- nll_loss ----------------------------------------------------------------------------------
# Computed on the physical tensors with gather/scatter: per-example reductions ('mean' divides
# by each example's own total weight) and batched class weights come out directly.


def _target_of_1d_input(op, args, dims, xi, ti):
    """torch takes a 1-D target of size 1 for a 1-D input (one example of C scores) as the
    0-D target; another size is its error (raised by the kernel on the first example)."""
    x, target = args[xi], args[ti]
    if rank(x, dims[xi]) != 1 or rank(target, dims[ti]) != 1:
        return target
    if target.shape[-1] != 1:
        check_example(op, args, {}, dims, kernel=True)
    return target.squeeze(-1)


def _nll_parts(x, xd, target, td, weight, wd, ignore_index, B):
    x = materialize(x, xd, B)
    target = materialize(target, td, B)
    cdim = 1 if x.dim() == 2 else 2  # physical class dim: logical (C,) or (N, C, ...)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    if weight is None:
        wt = valid.to(x.dtype)
    else:
        if wd is None:
            wt = weight.index_select(0, safe.reshape(-1)).reshape(safe.shape)
        else:
            wt = weight.gather(1, flat_examples(safe, B)).reshape(safe.shape)
        wt = wt * valid
    return x, safe, wt, cdim, valid


def _per_example_sum(t):
    return flat_examples(t).sum(1)


def _nll_forward(x, safe, wt, reduction, cdim):
    loss = -x.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim) * wt
    if reduction == 0:  # none
        return loss, torch.zeros((), dtype=x.dtype, device=x.device)
    total = _per_example_sum(wt)
    out = _per_example_sum(loss)
    if reduction == 1:  # mean
        out = out / total
    return out, total


def _nll_input_grad(g, x, safe, wt, valid, reduction, total, cdim):
    """The gradient of the physical input, as the kernel computes it (``g``: of each
    per-element loss for reduction 'none', of each example's loss otherwise)."""
    r = safe.dim()  # physical rank of the per-element losses
    if reduction != 0:
        g = g.reshape((-1,) + (1,) * (r - 1))
        if reduction == 1:
            g = g / total.reshape((-1,) + (1,) * (r - 1))
    val = -(wt * g).to(x.dtype)
    # ignored targets get no gradient even where grad_output is nan (an all-ignored 'mean'
    # batch has total weight 0): the kernel skips them rather than multiplying by weight 0
    val = torch.where(valid, val.expand(safe.shape), torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.zeros_like(x).scatter(cdim, safe.unsqueeze(cdim), val.unsqueeze(cdim))


class _PhysicalNll(torch.autograd.Function):
    """The rule's forward where torch's autograd records the physical batch (per-sample
    gradients: batching/physical_ad.py), with the kernel's gradient: differentiating the
    forward's own arithmetic gives nan, not 0, for ignored targets of an example whose
    targets are all ignored ('mean': 0 / 0)."""

    @staticmethod
    def forward(x, safe, wt, valid, reduction, cdim):
        return _nll_forward(x, safe, wt, reduction, cdim)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (split from forward: transforms apply it through their levels)
        x, safe, wt, valid, reduction, cdim = inputs
        ctx.save_for_backward(x, safe, wt, valid, output[1])
        ctx.reduction, ctx.cdim = reduction, cdim
        ctx.safe, ctx.wt = safe, wt  # (for jvp)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def jvp(ctx, x_t, *_):
        # linear in x (the total weight does not depend on it): the tangent is the loss of the
        # tangent, as torch's forward-AD formula for nll_loss
        return _nll_forward(x_t, ctx.safe, ctx.wt, ctx.reduction, ctx.cdim)[0], None

    @staticmethod
    def backward(ctx, g, _g_total):
        x, safe, wt, valid, total = ctx.saved_tensors
        return _nll_input_grad(g, x, safe, wt, valid, ctx.reduction, total, ctx.cdim), None, None, None, None, None


_physical_nll = plain_apply(_PhysicalNll)


@batch_rule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_forward(op, args, kwargs, dims):
    x, target, weight, reduction, ignore_index = args
    B = batch_size_of(args, dims)
    target = _target_of_1d_input(op, args, dims, 0, 1)
    x, safe, wt, cdim, valid = _nll_parts(x, dims[0], target, dims[1], weight, dims[2], ignore_index, B)
    if x.requires_grad and not wt.requires_grad and type(x) is torch.Tensor and torch.is_grad_enabled():
        out, total = _physical_nll(x, safe, wt, valid, reduction, cdim)
    elif getattr(getattr(x, "_interp", None), "kind", None) == "grad" and not isinstance(wt, _core.LevelTensor):
        # differentiated by a grad level around vmap: the same (its Function through the levels'
        # own apply; the arithmetic's 0 / 0 gave nan or inf gradients there too)
        out, total = _PhysicalNll.apply(x, safe, wt, valid, reduction, cdim)
    else:
        out, total = _nll_forward(x, safe, wt, reduction, cdim)
    return (out, total), ([0, None] if reduction == 0 else 0)


@batch_rule(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)
def nll_loss_backward(op, args, kwargs, dims):
    go, x, target, weight, reduction, ignore_index, total_weight = args
    B = batch_size_of(args, dims)
    target = _target_of_1d_input(op, args, dims, 1, 2)
    x, safe, wt, cdim, valid = _nll_parts(x, dims[1], target, dims[2], weight, dims[3], ignore_index, B)
    if reduction == 0 and dims[0] is None:
        go = go.unsqueeze(0)
    return _nll_input_grad(go, x, safe, wt, valid, reduction, total_weight, cdim), 0


# -- multi_margin_loss, multilabel_margin_loss ----------------------------------------------
# Per-sample losses of a logical (N, C) or (C,) input: fold the batch into N, call the kernel
# with reduction='none' and reduce per example. (torch._decomp's multilabel_margin_loss_forward
# disagrees with the kernel, so it must not serve these ops.)




def _rows(t, d, B, C):
    """Materialize ``t`` and flatten a logical ``(N, C)``/``(C,)`` (or ``(N,)``/``()`` if C is None) batch."""
    t = materialize(t, d, B)
    return t.reshape(-1, C) if C is not None else t.reshape(-1)


def _margin_shapes(x, d, B):
    """(physical shape, number of classes C, physical shape of per-row losses) of a logical
    ``(N, C)``, ``(C,)`` or ``()`` input (a 0-dim input is one row of one class)."""
    shape = materialize(x, d, B).shape
    if rank(x, d) == 0:
        return shape, 1, shape
    return shape, shape[-1], shape[:-1]


def _reduce_rows(loss, B, reduction):
    """Per-row losses ``(B*N,)`` -> per-example losses for ``reduction``."""
    loss = flat_examples(loss, B)
    if reduction == 1:
        return loss.mean(1)
    if reduction == 2:
        return loss.sum(1)
    return loss


def _row_grads(go, d, B, n, reduction):
    """The grad of each row's loss, ``(B*n,)``, from the per-example grad_output."""
    go = materialize(go, d, B)
    if reduction == 0:
        return go.reshape(-1)
    g = go.reshape(B, 1).expand(B, n)
    return (g / n if reduction == 1 else g).reshape(-1)




@batch_rule(aten.multi_margin_loss.default)
def multi_margin_loss(op, args, kwargs, dims):
    args, dims = full_args(op, args, kwargs, dims)
    x, target, p, margin, weight, reduction = args
    B = batch_size_of(args, dims)
    if dims[4] is not None:  # per-example class weights: no single kernel call takes them
        return loop_examples(op, args, dims, B)
    _, C, lead = _margin_shapes(x, dims[0], B)
    loss = op(_rows(x, dims[0], B, C), _rows(target, dims[1], B, None), p, margin, weight, 0)
    loss = _reduce_rows(loss, B, reduction)
    return (loss.reshape(lead) if reduction == 0 else loss), 0


@batch_rule(aten.multi_margin_loss_backward.default)
def multi_margin_loss_backward(op, args, kwargs, dims):
    args, dims = full_args(op, args, kwargs, dims)
    go, x, target, p, margin, weight, reduction = args
    B = batch_size_of(args, dims)
    if dims[5] is not None:
        return loop_examples(op, args, dims, B)
    shape, C, _ = _margin_shapes(x, dims[1], B)
    xr = _rows(x, dims[1], B, C)
    g = _row_grads(go, dims[0], B, xr.shape[0] // B, reduction)
    gi = op(g, xr, _rows(target, dims[2], B, None), p, margin, weight, 0)
    return gi.reshape(shape), 0


@batch_rule(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss_forward(op, args, kwargs, dims):
    x, target, reduction = args
    B = batch_size_of(args, dims)
    shape, C, lead = _margin_shapes(x, dims[0], B)
    loss, is_target = op(_rows(x, dims[0], B, C), _rows(target, dims[1], B, C), 0)
    loss = _reduce_rows(loss, B, reduction)
    return (loss.reshape(lead) if reduction == 0 else loss, is_target.reshape(shape)), 0


@batch_rule(aten.multilabel_margin_loss_backward.default)
def multilabel_margin_loss_backward(op, args, kwargs, dims):
    go, x, target, reduction, is_target = args
    B = batch_size_of(args, dims)
    shape, C, _ = _margin_shapes(x, dims[1], B)
    xr = _rows(x, dims[1], B, C)
    g = _row_grads(go, dims[0], B, xr.shape[0] // B, reduction)
    gi = op(g, xr, _rows(target, dims[2], B, C), 0, _rows(is_target, dims[4], B, C))
    return gi.reshape(shape), 0

# -- CTC loss ----------------------------------------------------------------------------------------
# Each example's (T, N, C) log-probs join the N sequences of one kernel call, (T, B*N, C); the
# targets (padded (N, S) or concatenated (sum of lengths,)) and lengths follow in the same
# (example, sequence) order.


def _ctc_fold(args, dims, B, lp_pos):
    """Folded (log_probs, targets, input_lengths, target_lengths) and N.

    With per-example target lengths the kernel sizes log_alpha (N, T, 2*max_len+1) by the
    longest target of the whole batch rather than of each example: log_alpha is only read
    by the backward (which folds the same way), and the losses do not depend on it."""
    lp, tg, il, tl = args[lp_pos:lp_pos + 4]
    ld, td, ild, tld = dims[lp_pos:lp_pos + 4]
    lp = materialize(lp, ld, B)  # (B, T, N, C)
    N = lp.shape[2]
    lp = lp.movedim(0, 1).flatten(1, 2)
    tg = materialize(tg, td, B).flatten(0, 1)  # (B, N, S) -> (B*N, S); (B, L) -> (B*L,)
    if isinstance(il, torch.Tensor):
        il = materialize(il, ild, B).reshape(-1)
        tl = materialize(tl, tld, B).reshape(-1)
    else:
        il, tl = list(il) * B, list(tl) * B
    return lp, tg, il, tl, N


@batch_rule(aten._ctc_loss.default, aten._ctc_loss.Tensor)
def ctc_loss(op, args, kwargs, dims):
    args, dims = full_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    lp, tg, il, tl, N = _ctc_fold(args, dims, B, 0)
    nll, alpha = op(lp, tg, il, tl, *args[4:])
    return (nll.reshape(B, N), alpha.reshape((B, N) + alpha.shape[1:])), 0


@batch_rule(aten._ctc_loss_backward.default, aten._ctc_loss_backward.Tensor)
def ctc_loss_backward(op, args, kwargs, dims):
    args, dims = full_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    lp, tg, il, tl, N = _ctc_fold(args, dims, B, 1)
    grad, nll, alpha = (materialize(t, d, B).flatten(0, 1) for t, d in zip(
        (args[0], args[5], args[6]), (dims[0], dims[5], dims[6])))
    out = op(grad, lp, tg, il, tl, nll, alpha, *args[7:])
    return out.reshape((out.shape[0], B, N) + out.shape[2:]), 1
