"""Matrix products (mm, bmm, mv, dot and their add* forms, via broadcasting matmul), linalg_cross,
and linear algebra that batches over leading dims (svd, solve, lstsq, pinv, ldl_solve ...)."""

from __future__ import annotations

import math
import warnings

import torch

from .. import _core
from ..errors import PerformanceWarning
from ._registry import (
    flat_examples,
    full_args,
    batch_rule,
    batch_size_of,
    materialize,
    non_out_overloads,
    per_example_checked,
    plain_apply,
    shared_by_examples,
    per_example_signal,
    pad_to_rank,
    rank,
)

aten = torch.ops.aten

def _products_valid(op, args, dims) -> bool:
    """The examples of mm/bmm/mv/dot are certainly valid: the logical ranks the op takes, matching
    inner sizes, one dtype and device (anything else goes to the per-example check)."""
    if len(args) != 2:
        return False
    a, b = args
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dtype is not b.dtype \
            or a.device != b.device:
        return False
    ra, rb = a.dim() - (dims[0] is not None), b.dim() - (dims[1] is not None)
    if (ra, rb) != _PRODUCT_RANKS[op]:
        return False
    if ra == 3 and a.shape[-3] != b.shape[-3]:
        return False
    return a.shape[-1] == b.shape[-1 if rb == 1 else -2]


_PRODUCT_RANKS = {aten.mm.default: (2, 2), aten.bmm.default: (3, 3), aten.mv.default: (2, 1),
                  aten.dot.default: (1, 1), aten.vdot.default: (1, 1)}


class _SharedRight(torch.autograd.Function):
    """``a @ b`` for physical ``a`` (B, n, k) and ``b`` (B, k, m) whose examples are one matrix
    (batch stride 0): the forward is one (B*n, k) @ (k, m) product instead of B small ones;
    the gradient of ``b`` is per example, as if each example had its own copy."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.matmul(a, b[0])

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[0]:
            # (recording a graph: through the expanded ``b``, so that its derivative is per example too)
            ga = torch.matmul(g, (b if torch.is_grad_enabled() else b[0]).transpose(-1, -2))
        if ctx.needs_input_grad[1]:
            if b.stride(-2) == 1 and b.stride(-1) != 1:  # (b a transposed weight, as F.linear's: its
                # gradient in the weight's own layout, ~20% faster at 100 MB and what torch.func returns)
                gb = torch.matmul(g.transpose(-1, -2), a).transpose(-1, -2)
            else:
                gb = torch.matmul(a.transpose(-1, -2), g)
        return ga, gb


def matmul_batched(a, b):
    """``torch.matmul(a, b)`` of two physical operands batched in front; a right operand whose
    examples share one matrix and that requires grad is multiplied once (``_SharedRight``):
    per-sample gradients of a layer's weight then cost one product forward, as without them."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] and type(a) is torch.Tensor \
            and shared_by_examples(b):
        # (a shared left operand keeps the batched product: computed as a transposed product its
        # result would have another per-example layout than the loop's, which views can refuse)
        return _shared_right(a, b)
    return torch.matmul(a, b)


_shared_right = plain_apply(_SharedRight)


@batch_rule(aten.mm.default, aten.bmm.default)
@per_example_checked(valid=_products_valid)  # (matmul would broadcast over an example's extra dims)
def mm(op, args, kwargs, dims):
    # Logical shapes are exact for mm/bmm, so matmul's broadcasting over the leading batch
    # dim gives the per-example products. With only the right operand batched, matmul
    # would expand the left one into B small products: transpose so the batch folds
    # into the rows of one large product instead.
    a, b = args
    if dims[0] is None and dims[1] is not None:
        return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2), 0
    if dims[0] is not None and dims[1] is not None:
        return matmul_batched(a, b), 0
    return torch.matmul(a, b), 0


@batch_rule(aten.mv.default)
@per_example_checked(valid=_products_valid)  # (matmul would broadcast over an example's extra dims)
def mv(op, args, kwargs, dims):
    a, v = args
    if dims[0] is None:  # unbatched matrix: one (B, k) @ (k, n) product
        return torch.matmul(v, a.transpose(-1, -2)), 0
    return torch.matmul(a, v.unsqueeze(-1)).squeeze(-1), 0


@batch_rule(aten.dot.default, aten.vdot.default)
@per_example_checked(valid=_products_valid)  # (matmul would broadcast over an example's extra dims)
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


_C_TYPE = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
           torch.bfloat16: "c10::BFloat16", torch.int64: "int64_t", torch.int32: "int", torch.int16: "int16_t",
           torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "bool"}


def _coeff(v, name, dtype, op):
    """``alpha``/``beta`` as the kernel computing in ``dtype`` reads them (``Scalar::to<T>``):
    integral types truncate a float toward zero (``addmm(int, beta=0.2)`` ignores the bias),
    bool reads any number as true/false, a complex with an imaginary part does not convert to
    a real type. ``addr`` refuses floats for integral results and bools for non-bool results."""
    if (type(v) is int and dtype is not torch.bool) or (type(v) is float and dtype.is_floating_point):
        return v
    integral = not (dtype.is_floating_point or dtype.is_complex)
    if op is aten.addr.default:
        if isinstance(v, bool) and dtype is not torch.bool:
            raise RuntimeError(f"Boolean {name} only supported for Boolean results.")
        if integral and not isinstance(v, int):
            raise RuntimeError(f"For integral input tensors, argument {name} must not be a floating point number.")
    if isinstance(v, complex) and not dtype.is_complex:
        if v.imag != 0:
            raise RuntimeError(f"value cannot be converted to type {_C_TYPE.get(dtype, dtype)} without overflow")
        v = v.real
    if dtype is torch.bool:
        return bool(v)
    if integral and not isinstance(v, int):
        if not math.isfinite(v):
            raise RuntimeError(f"value cannot be converted to type {_C_TYPE.get(dtype, dtype)} without overflow")
        return int(v)  # toward zero, as static_cast
    return v


#: (op, dtype, device type) -> whether the rule's rounding reproduces that kernel bit for bit
_ROUNDING_MATCHES: dict = {}
_PROBE_SHAPES = {  # (bias, a, b) of one example, for the ops whose kernels round in their own order
    aten.addmv.default: [(6,), (6, 8), (8,)], aten.addbmm.default: [(6, 7), (4, 6, 8), (4, 8, 7)],
    aten.addr.default: [(6, 7), (6,), (7,)],
}


def _rounding_matches(op, dtype, device) -> bool:
    """Whether the rule below rounds as this torch's ``op`` kernel does in a low-precision dtype
    on this device. The rule mimics how the kernels accumulate and round (that differs between
    ops, devices and torch releases); one probe per (op, dtype, device) compares it with the
    kernel on random inputs, and where they differ the rule runs the kernel per example
    (addmm and baddbmm: one float32 product rounded once, as every kernel does, never probed)."""
    if op not in _PROBE_SHAPES:
        return True
    key = (op, dtype, device.type)
    ok = _ROUNDING_MATCHES.get(key)
    if ok is not None:
        return ok
    _ROUNDING_MATCHES[key] = True  # (the probe runs the rule itself)
    try:
        from torch.utils._python_dispatch import _disable_current_modes

        g = torch.Generator().manual_seed(0)
        # plain tensors, outside every transform level and dispatch mode
        with _core.lowered(0), _disable_current_modes(), torch.no_grad():
            t = [torch.randn((3,) + s, generator=g).to(device=device, dtype=dtype) for s in _PROBE_SHAPES[op]]
            got, _ = addmm(op, t, {"beta": 0.3, "alpha": 0.7}, [0, 0, 0])
            want = torch.stack([op(*(x[i] for x in t), beta=0.3, alpha=0.7) for i in range(3)])
            ok = bool(torch.equal(got, want))
    except Exception:  # noqa: BLE001 - no probe possible (a fake or meta device): trust the rule
        ok = True
    if not ok:
        warnings.warn(f"pyfunctorch.vmap: {op} in {dtype} on {device.type} runs once per example (its kernel "
                      "rounds differently from the batched computation)", PerformanceWarning, stacklevel=2)
    _ROUNDING_MATCHES[key] = ok
    return ok


@batch_rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default, aten.addbmm.default, aten.addr.default)
@per_example_checked  # (matmul would broadcast over an example's extra dims)
def addmm(op, args, kwargs, dims):
    bias, a, b = args[:3]
    if op is aten.addr.default:  # promotes its operands (as 2-D tensors: a 0-dim bias counts too)
        dtype = torch.promote_types(bias.dtype, torch.promote_types(a.dtype, b.dtype))
    elif bias.dtype == a.dtype == b.dtype:
        dtype = a.dtype
    else:  # torch's own error
        return loop_examples(op, args, dims, kwargs, batch_size_of(args, dims))
    if dtype in (torch.float16, torch.bfloat16) and not _rounding_matches(op, dtype, a.device):
        return loop_examples(op, args, dims, kwargs, batch_size_of(args, dims))
    beta = _coeff(kwargs.get("beta", args[3] if len(args) > 3 else 1), "beta", dtype, op)
    alpha = _coeff(kwargs.get("alpha", args[4] if len(args) > 4 else 1), "alpha", dtype, op)
    if dtype in (torch.float16, torch.bfloat16) and op is not aten.addr.default:
        # torch's kernels accumulate in float32 and round alpha * (a @ b) + beta * bias once
        # (addmm, baddbmm exactly; addmv, addbmm to a rounding): so does the rule
        bias, a, b = bias.float(), a.float(), b.float()
    if op is aten.addmv.default:
        prod, out_rank = torch.matmul(a, b.unsqueeze(-1)).squeeze(-1), 1
    elif op is aten.addr.default:  # (alpha * a) * b as the kernel computes it
        if dtype in (torch.float16, torch.bfloat16):  # the kernel rounds alpha, beta to the dtype
            alpha, beta = (float(torch.tensor(c, dtype=dtype)) if isinstance(c, float) else c for c in (alpha, beta))
        prod, out_rank = (a * alpha if alpha != 1 else a).unsqueeze(-1) * b.unsqueeze(-2), 2
        alpha = 1
    elif op is aten.addbmm.default and dtype in (torch.float16, torch.bfloat16) and a.shape[-3] > 0:
        # the kernel is one addmm_ per inner batch, rounding the running sum each time
        prods = torch.matmul(a, b)
        out = _add_scaled(prods.select(-3, 0), bias, dims[0], beta, alpha, 2).to(dtype)
        for k in range(1, prods.shape[-3]):
            out = (out.float() + alpha * prods.select(-3, k)).to(dtype)
        return out, 0
    elif op is aten.addbmm.default:
        prod, out_rank = torch.matmul(a, b).sum(-3), 2
    elif dims[1] is not None and dims[2] is not None:
        prod, out_rank = matmul_batched(a, b), (2 if op is aten.addmm.default else 3)
    else:
        prod, out_rank = torch.matmul(a, b), (2 if op is aten.addmm.default else 3)
    if dims[1] is None and dims[2] is None:
        prod = prod.unsqueeze(0).expand((bias.shape[0],) + prod.shape)
    out = _add_scaled(prod, bias, dims[0], beta, alpha, out_rank)
    return (out if out.dtype == dtype else out.to(dtype)), 0


@batch_rule(aten.linalg_cross.default)
@per_example_checked
def linalg_cross(op, args, kwargs, dims):
    # elementwise over every dim but ``dim``, broadcasting: an unbatched operand gets a size-1
    # batch dim (the ranks must match), ``dim`` counts from the end or moves past the batch dim.
    # (The kernel itself, not the decomposition: that one rounds after each product in
    # bfloat16/float16 where the kernel rounds once.)
    a, b = args
    r = rank(a, dims[0])
    d = kwargs.get("dim", -1)
    if r != rank(b, dims[1]) or not -r <= d < r:
        return loop_examples(op, args, dims, kwargs, batch_size_of(args, dims))  # torch's own error
    a = a if dims[0] is not None else a.unsqueeze(0)
    b = b if dims[1] is not None else b.unsqueeze(0)
    return op(a, b, dim=d if d < 0 else d + 1), 0


# -- linear algebra that already treats leading dims as a batch -----------------------------
# These ops act on the last one or two dims and broadcast over any leading dims, so a batch
# dim in front is just one more batch dim. Multi-operand ones (solve ...) get every operand
# materialized: vector-vs-matrix right-hand sides are told apart by rank relative to A.
_BATCH_AGNOSTIC = [
    "_linalg_svd", "linalg_inv_ex", "_linalg_eigh", "linalg_eig", "_linalg_eigvals", "_linalg_det", "_linalg_slogdet",
    "linalg_cholesky_ex", "linalg_qr", "linalg_lu_factor_ex", "linalg_lu", "linalg_matrix_exp", "cholesky",
    "cholesky_inverse", "cholesky_solve", "triangular_solve", "linalg_solve_triangular", "linalg_lu_solve",
    "lu_unpack", "_linalg_solve_ex", "linalg_householder_product", "linalg_ldl_factor_ex",
    "geqrf", "ormqr", "_linalg_eigvals", "linalg_matrix_power", "inverse", "logdet", "det",
    "slogdet", "linalg_tensorinv", "matrix_power", "linalg_vander",
]


def batch_agnostic(op, args, kwargs, dims):
    B = batch_size_of(args, dims)
    # contiguous: some kernels (matrix_exp) view their input assuming a dense batch
    args = [materialize(a, d, B).contiguous() if isinstance(a, torch.Tensor) else a for a, d in zip(args, dims)]
    return op(*args, **kwargs), 0


# (checked per example: the op would read the batch dim as one of its own batch dims)
batch_rule(*non_out_overloads(*_BATCH_AGNOSTIC))(per_example_checked(batch_agnostic))


@batch_rule(aten._linalg_check_errors.default)
def check_errors(op, args, kwargs, dims):
    info, api_name = args[0], args[1]
    op(info, api_name, is_matrix=False)  # raises with the same message for any failing example
    return None, None


# -- helpers for the solvers below -------------------------------------------------------------


def _per_example_signal(op, msg):
    return per_example_signal(msg)


def loop_examples(op, args, dims, kwargs, B):
    """``op`` once per example, stacked: for the rare inputs where one batched call cannot
    give the per-example results (and to raise torch's own error for bad per-example shapes)."""
    outs = []
    for i in range(B):
        outs.append(op(*[a.select(0, i) if d is not None else a for a, d in zip(args, dims)], **kwargs))
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    cols = list(zip(*outs))
    if any(len({tuple(t.shape) for t in col}) > 1 for col in cols):
        shapes = sorted({tuple(tuple(t.shape) for t in o) for o in outs})[:3]
        raise _per_example_signal(op, f"vmap: {op} returned tensors of different shapes for different examples "
                                      f"({shapes}...); a batched tensor needs one shape.")
    return tuple(torch.stack(col) for col in cols), 0


def _fold_rhs(b, vector):
    """A batched right-hand side ``(B, *, m, k)`` (``(B, *, m)`` if ``vector``) as the
    columns of one unbatched ``(*, m, k*B)`` (``(*, m, B)``): one solve with a shared matrix."""
    b = b.movedim(0, -1)
    return b if vector else b.flatten(-2)


def _unfold_rhs(x, vector, k, B):
    """Inverse of :func:`_fold_rhs` on a result ``(*, n, k*B)``: ``(B, *, n, k)``."""
    if vector:
        return x.movedim(-1, 0)
    return x.unflatten(-1, (k, B)).movedim(-1, 0)


# -- lstsq ---------------------------------------------------------------------------------------
# torch.linalg.lstsq(A, b, rcond, driver) returns (solution, residuals, rank, singular_values),
# and which of the last three are real results or empty (0,) placeholders depends on the call:
#   rank             every driver but 'gels';
#   singular_values  'gelsd' and 'gelss';
#   residuals        m > n and driver != 'gelsy', and for 'gelsd'/'gelss' only if *every*
#                    matrix of the call has full rank n.
# A placeholder is (0,) whatever the batch, so stacking per-example placeholders gives (B, 0):
# it is returned unbatched. The residuals condition looks at the whole call: one batched call
# over examples of which only some have full rank returns no residuals, while the examples
# alone would return residuals for some and none for others. Those per-example results differ
# in shape, so that case is handed back to vmap's per-example re-run (like a boolean mask).
# ``b`` is a vector (B has one dim less than A) or a matrix per example; moving the batch dim
# to the front of both keeps that distinction and aligns their batch dims.


def _lstsq_driver(A, kwargs):
    return kwargs.get("driver") or ("gelsy" if A.device.type == "cpu" else "gels")


@batch_rule(aten.linalg_lstsq.default)
@per_example_checked
def lstsq(op, args, kwargs, dims):
    A, b = args[0], args[1]
    da, db = dims[0], dims[1]
    B = batch_size_of(args, dims)
    ra, rb = rank(A, da), rank(b, db)
    if ra < 2 or ra - rb not in (0, 1):
        return loop_examples(op, args, dims, kwargs, B)  # torch's own error for these shapes
    vector = ra - rb == 1
    if da is None:
        # A shared by every example: the examples' right-hand sides become the columns of one
        # right-hand side, so A is factorized once. rank and singular values are A's alone, and
        # the residuals condition is the same for every example.
        k = 1 if vector else b.shape[-1]
        sol, res, rk, sv = op(A, _fold_rhs(b, vector), *args[2:], **kwargs)
        res_dim = None
        if tuple(res.shape) == tuple(sol.shape[:-2]) + sol.shape[-1:]:  # computed: (*, k*B), else a placeholder
            res, res_dim = (res.movedim(-1, 0).unsqueeze(-1) if vector else res.unflatten(-1, (k, B)).movedim(-1, 0)), 0
        return (_unfold_rhs(sol, vector, k, B), res, rk, sv), (0, res_dim, None, None)
    b = materialize(b, db, B)
    sol, res, rk, sv = op(A, b, *args[2:], **kwargs)
    driver = _lstsq_driver(A, kwargs)
    m, n = A.shape[-2], A.shape[-1]
    example_res = tuple(sol.shape[1:-1]) + (1,) if vector else tuple(sol.shape[1:-2]) + (b.shape[-1],)  # if computed
    if tuple(res.shape) == (B,) + example_res:
        res_dim = 0
    else:
        res_dim = None
        if m > n and driver in ("gelsd", "gelss") and example_res != (0,) and bool((flat_examples(rk, B) == n).all(1).any()):
            # only some examples have full rank: alone, they would return residuals and the
            # others would not (different shapes)
            raise _per_example_signal(op, f"vmap: {op} (driver={driver!r}) returns residuals for the examples whose "
                                          "matrices have full rank and none for the others; a batched tensor needs "
                                          "one shape.")
    rk_dim = 0 if driver != "gels" else None
    sv_dim = 0 if driver in ("gelsd", "gelss") else None
    return (sol, res, rk, sv), (0, res_dim, rk_dim, sv_dim)


# -- ldl_solve -----------------------------------------------------------------------------------
# linalg_ldl_solve(LD, pivots, B): LD (*, n, n) and pivots (*, n) must have the same batch dims,
# B (*', n, k) broadcasts against them. With the batch dim moved to the front the batch dims of
# an unbatched operand no longer line up from the right, so every operand is padded to the
# common batch rank. And torch's kernel reads out of bounds (crashes) when B's batch is larger
# than LD's (it loops over the broadcast batch but indexes LD unbroadcast): LD and pivots are
# expanded to the full broadcast batch first.


def _expand_factor(LD, piv, batch):
    batch = torch.broadcast_shapes(tuple(LD.shape[:-2]), tuple(batch))
    if tuple(LD.shape[:-2]) != batch:
        LD = LD.expand(batch + LD.shape[-2:])
        piv = piv.expand(batch + piv.shape[-1:])
    return LD, piv


@batch_rule(aten.linalg_ldl_solve.default)
@per_example_checked
def ldl_solve(op, args, kwargs, dims):
    LD, piv, rhs = args
    dl, dp, dr = dims
    B = batch_size_of(args, dims)
    rl, rp, rr = rank(LD, dl), rank(piv, dp), rank(rhs, dr)
    if rl < 2 or rr < 2 or rp != rl - 1 or LD.shape[(dl is not None):-1] != piv.shape[(dp is not None):]:
        return loop_examples(op, args, dims, kwargs, B)  # torch's own error for these shapes
    if dl is None and dp is None:
        # one factorization shared by every example: the examples' right-hand sides become
        # the columns of one right-hand side
        k = rhs.shape[-1]
        rf = _fold_rhs(rhs, False)
        LD, piv = _expand_factor(LD, piv, rf.shape[:-2])
        return _unfold_rhs(op(LD, piv, rf, **kwargs), False, k, B), 0
    r = max(rl, rr)
    LD = pad_to_rank(materialize(LD, dl, B), 0, r)
    piv = pad_to_rank(materialize(piv, dp, B), 0, r - 1)
    if dr is not None:
        rhs = pad_to_rank(rhs, 0, r)
    LD, piv = _expand_factor(LD, piv, rhs.shape[:-2])
    return op(LD, piv, rhs, **kwargs), 0


# -- pinv with tensor tolerances -----------------------------------------------------------------
# linalg_pinv.atol_rtol_tensor(A, *, atol, rtol, hermitian): the tolerances (keyword arguments,
# possibly batched) broadcast against A's batch dims *and can add batch dims of their own*: the
# result is broadcast(A.shape[:-2], atol.shape, rtol.shape) + (n, m). A is padded to the largest
# batch rank so that the batch dim in front lines up. An empty A short-circuits in torch (the
# tolerances are not used): nothing to pad then.


@batch_rule(aten.linalg_pinv.atol_rtol_tensor, batched_kwargs=True)
@per_example_checked
def pinv(op, args, kwargs, dims, kwarg_dims=None):
    kwarg_dims = kwarg_dims or {}
    A, dA = args[0], dims[0]
    tols = {k: (kwargs.get(k), kwarg_dims.get(k)) for k in ("atol", "rtol")}
    B = batch_size_of([A] + [t for t, _ in tols.values()], [dA] + [d for _, d in tols.values()])
    if dA is None:
        A = materialize(A, dA, B).contiguous()
    if A.numel():
        r = max([A.dim() - 3] + [rank(t, d) for t, d in tols.values() if t is not None])
        A = pad_to_rank(A, 0, r + 2)
        kwargs = dict(kwargs)
        for k, (t, d) in tols.items():
            if d is not None:
                kwargs[k] = pad_to_rank(t, 0, r)
    return op(A, *args[1:], **kwargs), 0


# -- matrix_rank with an unbatched matrix and batched tolerances ---------------------------------
# Every linalg_matrix_rank overload is CompositeImplicit C++: it never reaches a vmap level, so no
# rule can take it. When the matrix is a plain tensor but atol/rtol/tol are batched, that C++
# allocates the result from the plain matrix and, as the matrix is no tensor subclass, fills it
# with ``sum(S > tol, -1, out=result)``: batched values written into an unbatched tensor
# (BatchedWriteError; torch.func fails there too). While a transform is live,
# ``torch.linalg.matrix_rank`` takes that case here and computes the same thing out of place.
# (Only calls made through the ``torch.linalg.matrix_rank`` attribute are seen: a reference
# taken before the transform started, such as an OpInfo's ``op``, bypasses the patch.)


def _matrix_rank(A, atol, rtol, hermitian):
    """``torch.linalg.matrix_rank`` as torch's ``matrix_rank_impl`` computes it, out of place."""
    if hermitian:
        S = torch.linalg.eigvalsh(A).abs()
        max_S = S.amax(-1, keepdim=True)
    else:
        S = torch.linalg.svdvals(A)
        max_S = S.narrow(-1, 0, 1)
    opts = {"dtype": torch.float64, "device": A.device}
    if rtol is None:
        eps = torch.finfo(A.real.dtype if A.is_complex() else A.dtype).eps
        rtol = torch.full((), eps * max(A.shape[-1], A.shape[-2]), **opts)
        if atol is not None:
            rtol = torch.where(atol > 0, torch.zeros((), **opts), rtol)
    if atol is None:
        atol = torch.zeros((), **opts)
    tol = torch.maximum(atol.unsqueeze(-1), rtol.unsqueeze(-1) * max_S)
    return (S > tol).sum(-1)


def matrix_rank_entry(original, args, kwargs):
    A = args[0] if args else None
    names = ("tol", "hermitian") if len(args) > 1 or "tol" in kwargs else ()
    params = dict(zip(names, args[1:]))
    if set(params) & set(kwargs):
        return original(*args, **kwargs)
    params.update(kwargs)
    tols = [params.get(k) for k in ("atol", "rtol", "tol")]
    if (not isinstance(A, torch.Tensor) or isinstance(A, _core.LevelTensor) or A.numel() == 0
            or len(args) > 1 + len(names) or set(params) - {"atol", "rtol", "tol", "hermitian"}
            or not any(isinstance(t, _core.LevelTensor) for t in tols)
            or any(not isinstance(t, torch.Tensor) or t.is_complex() for t in tols if t is not None) or A.dim() < 2):
        return original(*args, **kwargs)  # (also raises torch's own errors)
    if "tol" in params:  # the (A, tol, hermitian) form: atol=tol, rtol=0
        atol, rtol = params["tol"], torch.zeros((), dtype=torch.float64, device=A.device)
    else:
        atol, rtol = params.get("atol"), params.get("rtol")
    return _matrix_rank(A, atol, rtol, params.get("hermitian", False))



# -- _trilinear (nn.Bilinear) ---------------------------------------------------------------------


@batch_rule(aten._trilinear.default)
def trilinear(op, args, kwargs, dims):
    # every input is unsqueezed at its expand dims to one common rank, multiplied and summed
    # over sumdim: with the batch dim in front of each, every listed dim moves up by one
    args, dims = full_args(op, args, kwargs, dims)
    B = batch_size_of(args, dims)
    i1, i2, i3 = (materialize(t, d, B) for t, d in zip(args[:3], dims[:3]))
    up = lambda ds: [d + 1 for d in ds]  # noqa: E731  (the lists hold non-negative dims)
    return op(i1, i2, i3, up(args[3]), up(args[4]), up(args[5]), up(args[6]), args[7] + 1), 0
