"""Matrix products: mm, bmm, mv, dot and their add* forms, via broadcasting matmul."""

from __future__ import annotations

import torch

from ._registry import batch_rule, batch_size_of, materialize, non_out_overloads, pad_to_rank

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


# -- linear algebra that already treats leading dims as a batch -----------------------------
# These ops act on the last one or two dims and broadcast over any leading dims, so a batch
# dim in front is just one more batch dim. Multi-operand ones (solve ...) get every operand
# materialized: vector-vs-matrix right-hand sides are told apart by rank relative to A.
_BATCH_AGNOSTIC = [
    "_linalg_svd", "linalg_inv_ex", "_linalg_eigh", "linalg_eig", "_linalg_eigvals", "_linalg_det", "_linalg_slogdet",
    "linalg_cholesky_ex", "linalg_qr", "linalg_lu_factor_ex", "linalg_lu", "linalg_matrix_exp", "cholesky",
    "cholesky_inverse", "cholesky_solve", "triangular_solve", "linalg_solve_triangular", "linalg_lu_solve",
    "lu_unpack", "_linalg_solve_ex", "linalg_householder_product", "linalg_ldl_factor_ex",
    "geqrf", "ormqr", "linalg_pinv", "_linalg_eigvals", "linalg_matrix_power", "inverse", "logdet", "det",
    "slogdet", "linalg_tensorinv", "matrix_power", "linalg_vander",
]


def batch_agnostic(op, args, kwargs, dims):
    B = batch_size_of(args, dims)
    # contiguous: some kernels (matrix_exp) view their input assuming a dense batch
    args = [materialize(a, d, B).contiguous() if isinstance(a, torch.Tensor) else a for a, d in zip(args, dims)]
    return op(*args, **kwargs), 0


batch_rule(*non_out_overloads(*_BATCH_AGNOSTIC))(batch_agnostic)


@batch_rule(aten._linalg_check_errors.default)
def check_errors(op, args, kwargs, dims):
    info, api_name = args[0], args[1]
    op(info, api_name, is_matrix=False)  # raises with the same message for any failing example
    return None, None
