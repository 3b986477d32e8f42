"""Pointwise ops: one broadcasting rule serves every elementwise aten op.

Batched tensors carry their batch dim at the front; a batched operand of lower
logical rank is padded with size-1 dims *after* the batch dim so that
broadcasting aligns logical dims from the right, as it would per example.
Any op tagged ``torch.Tag.pointwise`` without an explicit entry here gets the
same rule (see ``lookup`` in ``batching/__init__.py``).
"""

from __future__ import annotations

import torch

from ..errors import batched_write_error
from ._registry import batch_rule, non_out_overloads, overloads, pad_to_rank, rank

aten = torch.ops.aten


def _promote_logical_scalars(args, dims, tensor_pos):
    """Physically a batched 0-dim tensor has 1 dim, which would change type promotion
    (0-dim tensors rank below dimensioned ones). Cast every tensor operand to the
    dtype the per-example op would compute in."""
    tensor_pos = [i for i in tensor_pos if args[i].dtype is not torch.bool]  # masks/conditions keep their dtype
    dtypes = {args[i].dtype for i in tensor_pos}
    if len(dtypes) == 1:
        return args
    if not any(dims[i] is not None and args[i].dim() == 1 for i in tensor_pos):
        return args
    metas = [torch.empty((1,) * rank(args[i], dims[i]), dtype=args[i].dtype) for i in tensor_pos]
    dt = metas[0].dtype
    acc = metas[0]
    for m in metas[1:]:
        dt = torch.result_type(acc, m)
        acc = torch.empty((1,) * max(acc.dim(), m.dim()), dtype=dt)
    args = list(args)
    for i in tensor_pos:
        args[i] = args[i].to(dt)
    return args


def broadcasting_rule(op, args, kwargs, dims):
    """n-ary elementwise op with broadcasting (and its in-place form)."""
    if len(args) == 1 or not any(isinstance(a, torch.Tensor) for a in args[1:]):
        return op(*args, **kwargs), 0  # one tensor (self, batched): nothing to align
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len(tensor_pos) == 1:
        return op(*args, **kwargs), 0
    inplace = op._schema.is_mutable
    if inplace and dims[0] is None:
        raise batched_write_error(op)
    r = max(rank(args[i], dims[i]) for i in tensor_pos)
    new = list(args)
    for i in tensor_pos:
        if dims[i] is not None:
            new[i] = pad_to_rank(args[i], 0, r)
    if not inplace:
        new = _promote_logical_scalars(new, dims, tensor_pos)
    return op(*new, **kwargs), 0


#: Elementwise ops (every overload, out= excluded by the dispatcher) -- add one name to add an op.
POINTWISE = [
    # unary
    "abs", "absolute", "acos", "acosh", "angle", "asin", "asinh", "atan", "atanh", "bitwise_not",
    "ceil", "clamp", "clamp_min", "clamp_max", "clip", "conj_physical", "cos", "cosh", "deg2rad", "digamma",
    "erf", "erfc", "erfinv", "exp", "exp2", "expm1", "fix", "floor", "frac", "i0", "isfinite", "isinf",
    "isnan", "isneginf", "isposinf", "lgamma", "log", "log10", "log1p", "log2", "logical_not", "logit",
    "mvlgamma", "nan_to_num", "neg", "negative", "polygamma", "rad2deg", "reciprocal", "round", "rsqrt",
    "sgn", "sigmoid", "sign", "signbit", "sin", "sinc", "sinh", "sqrt", "square", "tan", "tanh",
    "trunc", "relu", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardtanh",
    "hardsigmoid", "hardswish", "hardshrink", "softshrink", "softplus", "threshold", "log_sigmoid_forward",
    "special_entr", "special_erfcx", "special_i0e", "special_i1", "special_i1e", "special_ndtr",
    "special_ndtri", "special_log_ndtr", "clone", "alias_copy", "positive", "bitwise_left_shift",
    "bitwise_right_shift", "_to_copy", "fill", "zero", "zeros_like", "ones_like", "full_like", "empty_like",
    "_masked_scale", "real", "imag", "view_as_real", "view_as_complex", "conj", "_conj", "_neg_view", "resolve_conj", "resolve_neg", "nextafter",
    # binary / ternary
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
    "float_power", "atan2", "arctan2", "hypot", "maximum", "minimum", "fmax", "fmin", "copysign", "xlogy",
    "special_xlog1py", "special_zeta", "logaddexp", "logaddexp2", "ldexp", "heaviside", "igamma", "igammac",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_xor", "where", "lerp", "addcmul", "addcdiv", "masked_fill", "gcd", "lcm", "complex",
    "polar",
    # backward formulas of activations (reached from grad under vmap)
    "threshold_backward", "sigmoid_backward", "tanh_backward", "gelu_backward", "silu_backward",
    "elu_backward", "leaky_relu_backward", "hardtanh_backward", "hardsigmoid_backward",
    "hardswish_backward", "softplus_backward", "log_sigmoid_backward", "mish_backward",
    "hardshrink_backward", "softshrink_backward", "logit_backward",
]


batch_rule(*non_out_overloads(*POINTWISE, *(name + "_" for name in POINTWISE)))(broadcasting_rule)


@batch_rule(*overloads(aten.copy_))
def copy_(op, args, kwargs, dims):
    self_, src = args[0], args[1]
    if dims[0] is None:
        raise batched_write_error(op)
    if dims[1] is not None:
        src = pad_to_rank(src, 0, rank(self_, 0))
    self_.copy_(src, *args[2:], **kwargs)
    return self_, 0


@batch_rule(aten.masked_fill.Tensor, aten.masked_fill_.Tensor)
def masked_fill_tensor(op, args, kwargs, dims):
    # the fill value must be 0-dim per example; a batched one becomes a where()
    self_, mask, value = args
    if dims[2] is None:
        return broadcasting_rule(op, args, kwargs, dims)
    if op is aten.masked_fill_.Tensor and dims[0] is None:
        raise batched_write_error(op)
    r = max(rank(self_, dims[0]), rank(mask, dims[1]))
    s = pad_to_rank(self_, dims[0], r)
    m = pad_to_rank(mask, dims[1], r)
    v = value.reshape((value.shape[0],) + (1,) * r).to(self_.dtype)
    out = torch.where(m, v, s)
    if op is aten.masked_fill_.Tensor:
        self_.copy_(out.expand_as(self_) if out.shape != self_.shape else out)
        return self_, 0
    return out, 0


@batch_rule(aten.copy.default)
def copy(op, args, kwargs, dims):
    # functional copy: a fresh tensor of self's shape and dtype holding src
    self_, src = args[0], args[1]
    B = self_.shape[0] if dims[0] is not None else src.shape[0]
    if dims[0] is None:
        self_ = self_.unsqueeze(0).expand((B,) + self_.shape)
    if dims[1] is not None:
        src = pad_to_rank(src, 0, rank(self_, 0))
    return op(self_, src, *args[2:], **kwargs), 0
