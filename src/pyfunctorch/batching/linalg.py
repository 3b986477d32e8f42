"""Matrix products: mm, bmm, mv, dot and their add* forms, via broadcasting matmul."""

from __future__ import annotations

import torch

from ._registry import batch_rule, pad_to_rank

aten = torch.ops.aten


@batch_rule(aten.mm.default, aten.bmm.default)
def mm(op, args, kwargs, dims):
    # Logical shapes are exact for mm/bmm, so matmul's broadcasting over the leading batch
    # dim gives the per-example products. With only the right operand batched, matmul
    # would expand the left one into B small products: transpose so the batch folds
    # into the rows of one large product instead.
    a, b = args
    if dims[0] is None and dims[1] is not None:
        return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2), 0
    return torch.matmul(a, b), 0


@batch_rule(aten.mv.default)
def mv(op, args, kwargs, dims):
    a, v = args
    if dims[0] is None:  # unbatched matrix: one (B, k) @ (k, n) product
        return torch.matmul(v, a.transpose(-1, -2)), 0
    return torch.matmul(a, v.unsqueeze(-1)).squeeze(-1), 0


@batch_rule(aten.dot.default, aten.vdot.default)
def dot(op, args, kwargs, dims):
    a, b = args
    if op is aten.vdot.default:
        a = a.conj()
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1).squeeze(-1), 0


def _add_scaled(prod, bias, bias_dim, beta, alpha, out_rank):
    if alpha != 1:
        prod = prod * alpha
    if beta == 0:
        return prod  # torch ignores bias (even NaN) when beta == 0
    if bias_dim is not None:
        bias = pad_to_rank(bias, 0, out_rank)
    if beta != 1:
        bias = bias * beta
    return prod + bias


@batch_rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default, aten.addbmm.default, aten.addr.default)
def addmm(op, args, kwargs, dims):
    bias, a, b = args[:3]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    if op is aten.addmv.default:
        prod, out_rank = torch.matmul(a, b.unsqueeze(-1)).squeeze(-1), 1
    elif op is aten.addr.default:
        prod, out_rank = a.unsqueeze(-1) * b.unsqueeze(-2), 2
    elif op is aten.addbmm.default:
        prod, out_rank = torch.matmul(a, b).sum(-3), 2
    else:
        prod, out_rank = torch.matmul(a, b), (2 if op is aten.addmm.default else 3)
    if dims[1] is None and dims[2] is None:
        prod = prod.unsqueeze(0).expand((bias.shape[0],) + prod.shape)
    return _add_scaled(prod, bias, dims[0], beta, alpha, out_rank), 0
