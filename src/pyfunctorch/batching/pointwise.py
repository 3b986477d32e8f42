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
from ._registry import batch_rule, batch_size_of, check_example, non_out_overloads, overloads, pad_to_rank, rank

aten = torch.ops.aten


def _combine_categories(higher, lower):
    """torch's ``combine_categories`` (TypeProperties.cpp): a result of a higher-priority
    group of operands (dimensioned > 0-dim) keeps its dtype unless the lower group is of a
    higher category (bool < integral < floating < complex)."""
    if higher is None:
        return lower
    if lower is None or higher.is_complex:
        return higher
    if lower.is_complex:
        return _COMPLEX_OF.get(higher, lower) if higher.is_floating_point else lower
    if higher.is_floating_point:
        return higher
    if higher is torch.bool or lower.is_floating_point:
        return torch.promote_types(higher, lower)
    return higher


_REDUCED = (torch.float16, torch.bfloat16)
# (torch 2.15 added bcomplex32, the complex type of bfloat16; before it, bfloat16 went to complex64)
_COMPLEX_OF = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128,
               torch.bfloat16: getattr(torch, "bcomplex32", torch.complex64)}
#: operands that do not take part in type promotion: where's condition
_NOT_PROMOTED = {"where": (0,)}
#: ops whose tensor operands are not promoted together (the op converts or requires dtypes)
_NO_PROMOTION = {"masked_fill", "masked_fill_", "copy_", "_to_copy", "fill", "fill_"}
#: ops with rules of their own for a 0-dim operand of another dtype (lerp's weight): per example
_OWN_SCALAR_RULES = {"lerp", "lerp_"}


def _promote_logical_scalars(op, args, new, kwargs, dims, tensor_pos, inplace):
    """Physically a batched 0-dim tensor has 1 dim, which would change type promotion
    (0-dim tensors rank below dimensioned ones: ``uint8 (n,) + int8 0-dim`` is uint8, while
    two dimensioned tensors give int16). Cast the operands to the dtype the per-example op
    computes in (torch's result_type rules over the *logical* ranks); in place, self keeps
    its dtype and only the other operands are cast. ``args`` are the rule's arguments,
    ``new`` the same padded to a common rank (the ones cast and returned)."""
    first = args[tensor_pos[0]].dtype
    for i in tensor_pos:
        if args[i].dtype is not first:
            break
    else:  # one dtype (the common case): nothing to promote
        return new
    if not any(dims[i] is not None and args[i].dim() == 1 for i in tensor_pos):
        return new
    name = op.overloadpacket.__name__
    if name in _NO_PROMOTION:
        return new
    skip = _NOT_PROMOTED.get(name, ())
    tensor_pos = [i for i in tensor_pos if i not in skip]
    first = args[tensor_pos[0]].dtype
    if all(args[i].dtype is first for i in tensor_pos):
        return new
    if name in _OWN_SCALAR_RULES:
        return None
    # the per-example op may refuse these dtypes (heaviside, in-place narrowing): its error
    check_example(op, args, kwargs, dims)
    dim_dt = zero_dt = None
    for i in tensor_pos:
        dt = args[i].dtype
        if args[i].dim() - (dims[i] is not None) > 0:
            dim_dt = dt if dim_dt is None else torch.promote_types(dim_dt, dt)
        else:
            zero_dt = dt if zero_dt is None else torch.promote_types(zero_dt, dt)
    dt = _combine_categories(dim_dt, zero_dt)
    if inplace and dt is not args[0].dtype:
        return None  # computed in a wider dtype than self's, then written: per example
    new = list(new)
    for i in tensor_pos:
        # (bool operands stay bool: they never change a promotion, and ops check for them)
        if new[i].dtype is not dt and new[i].dtype is not torch.bool and not (inplace and i == 0):
            if dt in _REDUCED and dims[i] is not None and args[i].dim() == 1:
                # a 0-dim operand is a CPU scalar to a half-type kernel, read in its math
                # type in kernel-specific ways (mul: float32; add: rounded): per example
                return None
            new[i] = new[i].to(dt)
    return new


def _expand_to_common_shape(args, tensor_pos):
    shapes = [args[i].shape for i in tensor_pos]
    if all(s == shapes[0] for s in shapes):
        return args
    full = torch.broadcast_shapes(*shapes)
    args = list(args)
    for i in tensor_pos:
        if args[i].shape != full:
            # a copy, not an expanded view: forward AD asserts a view's tangent has the
            # primal's layout, which an expanded zero-tangent does not
            args[i] = args[i].expand(full).contiguous()
    return args


def broadcasting_rule(op, args, kwargs, dims):
    """n-ary elementwise op with broadcasting (and its in-place form)."""
    if len(args) == 1:
        return op(*args, **kwargs), 0  # one tensor (self, batched): nothing to align
    # Fast path (x * 1.01, x * y, tanh_backward(g, y) with y unbatched): the tensor operands
    # share one dtype, the batched ones one rank (batch dim in front) and the unbatched ones
    # have fewer dims than that: then broadcasting (aligned from the right, never reaching the
    # batch dim) and type promotion of the whole batch are those of each example, and the op
    # runs as it is. (In place, unbatched operands must be 0-dim: a broadcast error then reads
    # as the example's.)
    dtype = rank_ = None
    unbatched = 0  # the most dims of an unbatched operand
    for a, d in zip(args, dims):
        if isinstance(a, torch.Tensor):
            if dtype is None:
                dtype = a.dtype
            elif a.dtype is not dtype:
                break
            if d is None:
                n = a.dim()
                if n > unbatched:
                    unbatched = n
            elif rank_ is None:
                rank_ = a.dim()
            elif a.dim() != rank_:
                break
    else:
        if (dims[0] is not None and unbatched == 0) or (
                rank_ is not None and unbatched < rank_ and not op._schema.is_mutable):
            return op(*args, **kwargs), 0
    return _broadcast(op, args, kwargs, dims)


def _broadcast(op, args, kwargs, dims):
    """broadcasting_rule's general case: pad the batched operands to one logical rank, promote
    as the example's op would, and run per example where only that is exact."""
    if not any(isinstance(a, torch.Tensor) for a in args[1:]):
        return op(*args, **kwargs), 0
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len(tensor_pos) == 1:
        return op(*args, **kwargs), 0
    inplace = op._schema.is_mutable
    if inplace:
        if dims[0] is None:
            raise batched_write_error(op)
        # an example's self cannot grow by broadcasting: raise its error (padded, the batch would)
        if any(args[i].dim() - (dims[i] is not None) > args[0].dim() - 1 for i in tensor_pos) or \
                torch.broadcast_shapes(*[args[i].shape[1:] if dims[i] is not None else args[i].shape
                                         for i in tensor_pos]) != args[0].shape[1:]:
            check_example(op, args, kwargs, dims, kernel=True)
    r = max(rank(args[i], dims[i]) for i in tensor_pos)
    new = list(args)
    for i in tensor_pos:
        if dims[i] is not None:
            new[i] = pad_to_rank(args[i], 0, r)
    promoted = _promote_logical_scalars(op, args, new, kwargs, dims, tensor_pos, inplace)
    if promoted is None:  # exact only per example
        B = batch_size_of(args, dims)
        ex = [[a.select(0, b) if d is not None else a for a, d in zip(args, dims)] for b in range(B)]
        if inplace:
            for e in ex:
                op(*e, **kwargs)
            return args[0], 0
        return torch.stack([op(*e, **kwargs) for e in ex]), 0
    return op(*promoted, **kwargs), 0


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

#: The elementwise ops above whose user-level calls (``torch.sin(x)``, ``x * y``) on tensors
#: batched in front, of one rank and dtype, run as they are before torch's dispatcher
#: (BatchedTensor.__torch_function__): all but views and conj/neg bits, factories and the
#: entry points patched while a transform is live, multi-output and internal ops, and
#: ``where`` (one argument: the indices of nonzero elements). Those take the dispatcher.
_DISPATCHER_ONLY = {
    "_conj", "_neg_view", "alias_copy", "conj", "imag", "real", "resolve_conj", "resolve_neg", "view_as_complex",
    "view_as_real", "positive",
    "_to_copy", "clone", "empty_like", "fill", "full_like", "ones_like", "zero", "zeros_like",
    "log_sigmoid_forward", "_masked_scale", "where",
}
USER_POINTWISE = [n for n in POINTWISE if not n.endswith("_backward") and n not in _DISPATCHER_ONLY]


@batch_rule(*non_out_overloads(*(n for n in POINTWISE if n.endswith("_backward"))))
def same_shape_kernel_rule(op, args, kwargs, dims):
    """The activations' backward formulas: elementwise by schema, but some kernels need operands
    of one shape (oneDNN's gelu_backward fails on a broadcast operand). They run on broadcast
    operands first (no copy: tanh_backward's saved output is unbatched in every jacrev); where
    the kernel refuses them (an error, raised before any write: these ops are functional), on
    operands expanded to one shape. A kernel in ``_NEVER_BROADCAST`` gets one shape at once."""
    err = None
    if op not in _NEVER_BROADCAST or _one_shape(args):
        try:
            return broadcasting_rule(op, args, kwargs, dims)
        except RuntimeError as e:
            err = e
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    r = max(rank(args[i], dims[i]) for i in tensor_pos)
    padded = [pad_to_rank(a, d, r) if i in tensor_pos else a for i, (a, d) in enumerate(zip(args, dims))]
    promoted = _promote_logical_scalars(op, args, padded, kwargs, dims, tensor_pos, False)
    if promoted is None:
        if err is not None:
            raise err
        # (a promotion only each example's own call gets right: per example, on one shape)
        outs = []
        for b in range(batch_size_of(args, dims)):
            ex = [a.select(0, b) if d is not None else a for a, d in zip(args, dims)]
            outs.append(op(*_expand_to_common_shape(ex, tensor_pos), **kwargs))
        return torch.stack(outs), 0
    return op(*_expand_to_common_shape(promoted, tensor_pos), **kwargs), 0


#: backward kernels that must never see operands of different shapes: oneDNN's gelu_backward (CPU,
#: float32/bfloat16) crashed the process with a segmentation fault on a broadcast (stride-0)
#: gradient, where it raises on other mismatches (fuzzer seed 301444: vmap . vmap . hessian of gelu)
_NEVER_BROADCAST = tuple(non_out_overloads("gelu_backward"))  # (a tuple: `in` by identity, no op hash)


def _one_shape(args) -> bool:
    shapes = {tuple(a.shape) for a in args if isinstance(a, torch.Tensor)}
    return len(shapes) <= 1


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


@batch_rule(aten.fill.Tensor, aten.fill_.Tensor)
def fill_tensor(op, args, kwargs, dims):
    # a batched fill value (0-dim per example) fills each example with its own value
    self_, value = args[0], args[1]
    if dims[1] is None:
        return op(self_, value), 0
    if value.dim() != 1:
        raise RuntimeError(f"fill_ only supports 0-dimension value tensor but got tensor with {value.dim() - 1} "
                           "dimensions.")
    if op is aten.fill_.Tensor and dims[0] is None:
        raise batched_write_error(op)
    B = value.shape[0]
    r = rank(self_, dims[0])
    v = value.reshape((B,) + (1,) * r)
    if op is aten.fill_.Tensor:
        self_.copy_(v)  # broadcasts over the example's dims, casts to self's dtype
        return self_, 0
    shape = self_.shape[1:] if dims[0] is not None else self_.shape
    return v.to(self_.dtype).expand((B,) + tuple(shape)).clone(), 0
