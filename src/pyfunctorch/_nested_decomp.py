"""Decompositions used for ops under nested differentiation (normalization statistics).

``native_layer_norm`` and training-mode ``native_batch_norm`` return their statistics
(mean, rstd) as outputs that autograd treats as non-differentiable, and their derivative
formulas read those statistics back: the forward formula (``layer_norm_jvp``) and the
backward kernels (``native_layer_norm_backward``) take them as given. That is exact to
first order, but when the formula itself is differentiated by a lower level the
statistics carry no derivative of that level, and the second (``jvp`` of ``jvp``) or
third (``grad`` of ``grad`` of ``grad``, ``jvp`` of ``hessian``) derivative comes out
wrong -- silently, and in torch.func too.

When an op of this table runs at a differentiation level while another differentiation
level is live below it, the level runs it as this decomposition on the inner values
instead: the lower levels then see only ops whose formulas are exact to any order
(``var_mean``, ``rsqrt``, ...). The level's own derivative still uses the fused formula
(exact at first order). Forward statistics are computed as the kernels do (in the
computation dtype, cast back on CPU); the backward decompositions recompute mean and
rstd from the input (torch's own decompositions for forward AD), so they are exact
whatever the saved statistics carry.
"""

from __future__ import annotations

import torch

from . import _core
from ._core import detach_all_levels

import torch._decomp.decompositions_for_jvp as _jvp_decomps  # noqa: E402  (after _core, which imports it quietly)

aten = torch.ops.aten

_COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _stats(x, dims, eps):
    acc = x.to(_COMPUTE.get(x.dtype, x.dtype))
    var, mean = torch.var_mean(acc, dim=dims, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return acc, mean, rstd


def _native_layer_norm(input, normalized_shape, weight, bias, eps):
    if input.numel() == 0:
        return NotImplemented
    axis = input.dim() - len(normalized_shape)
    acc, mean, rstd = _stats(input, list(range(axis, input.dim())), eps)
    out = (acc - mean) * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    out = out.to(input.dtype)
    if input.device.type == "cpu":
        mean, rstd = mean.to(input.dtype), rstd.to(input.dtype)
    return out, mean, rstd


def _batch_norm_train(input, weight, bias, eps):
    dims = [0] + list(range(2, input.dim()))
    acc, mean, rstd = _stats(input, dims, eps)
    out = (acc - mean) * rstd
    shape = [1, -1] + [1] * (input.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    save_mean, save_rstd = mean.reshape(-1), rstd.reshape(-1)
    if input.device.type == "cpu":
        save_mean, save_rstd = save_mean.to(input.dtype), save_rstd.to(input.dtype)
    return out.to(input.dtype), save_mean, save_rstd


def _native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training or input.numel() == 0:
        return NotImplemented  # eval mode reads constant running statistics: exact as is
    res = _batch_norm_train(input, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        # the running statistics are a side effect without derivative: update them as
        # the kernel does, from the input with every differentiation level cut
        with torch.no_grad():
            aten.native_batch_norm.default(detach_all_levels(input), None, None, running_mean, running_var,
                                           True, momentum, eps)
    return res


def _legit(input, weight, bias, running_mean, running_var, training, momentum, eps):
    return _native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)


def _legit_no_stats(input, weight, bias, training, momentum, eps):
    return _native_batch_norm(input, weight, bias, None, None, training, momentum, eps)


def _masked(res, mask):
    # the kernels return undefined gradients for outputs not asked for
    return tuple(r if m else None for r, m in zip(res, mask))


def _native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias, output_mask):
    if input.numel() == 0:
        return NotImplemented
    res = _jvp_decomps.native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias,
                                                  output_mask)
    return _masked(res, output_mask)


def _native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
                                train, eps, output_mask):
    if not train or input.numel() == 0:
        return NotImplemented
    res = _jvp_decomps.native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
                                                  save_invstd, train, eps, output_mask)
    return _masked(res, output_mask)


# Backward kernels whose forward-AD formula torch lacks (huber) or computes through
# efficient zero tangents that are then written in place (mse, smooth_l1, nll: "ZeroTensors
# are immutable", "is_inplace_op INTERNAL ASSERT"). torch.func decomposes them too (its
# jvp and vmap decompositions); here they run decomposed whenever a jvp level below the
# level running them is live, so forward AD only meets primitive ops.
_FORWARD_AD_OPS = (
    aten.mse_loss_backward.default,
    aten.smooth_l1_loss_backward.default,
    aten.huber_loss_backward.default,
    aten.nll_loss_backward.default,
    aten.nll_loss2d_backward.default,
    aten.soft_margin_loss_backward.default,
    aten.binary_cross_entropy_backward.default,
)
_core.FORWARD_AD_DECOMPOSITIONS.update({op: torch._decomp.decomposition_table[op] for op in _FORWARD_AD_OPS
                                          if op in torch._decomp.decomposition_table})

_core.NESTED_DECOMPOSITIONS.update({
    aten.native_layer_norm.default: _native_layer_norm,
    aten.native_layer_norm_backward.default: _native_layer_norm_backward,
    aten.native_batch_norm.default: _native_batch_norm,
    aten._native_batch_norm_legit.default: _legit,
    aten._native_batch_norm_legit.no_stats: _legit_no_stats,
    aten.native_batch_norm_backward.default: _native_batch_norm_backward,
})


# -- vector norms under nested forward-over-reverse -------------------------------------------
# torch's derivative formula of the 2-norm (norm_backward) writes in place (masked_fill_) into
# a tensor that the differentiation of that formula saved: grad(jacfwd(grad(vector_norm))) and
# grad(hessian(vector_norm)) fail in plain torch and in torch.func ("modified by an inplace
# operation"). While two differentiation levels are live and one of them is forward mode, the
# user's 2-norm is computed from functional ops instead, with torch's convention of a zero
# derivative where the norm is zero (the `where` picks a constant there).


def _nested_forward_live() -> bool:
    diff = [it.kind for it in _core._state.stack if it.kind in ("grad", "jvp")]
    return len(diff) >= 2 and "jvp" in diff


def _safe_two_norm(x, dim, keepdim):
    dims = range(x.dim()) if dim is None else (dim,) if isinstance(dim, int) else dim
    if all(x.shape[d] == 1 for d in dims):
        # one element per norm: it is |x| = x * sign(x), sign a constant at every level (its
        # derivative is 0 anyway): derivatives exact, dtype kept (sqrt(x*x)'s lose float32
        # precision at high order near small values, fuzzer seed 4221; abs's own formulas turn
        # a Python scalar operand into float64 under forward-over-reverse of 0-dim tensors, as
        # plain torch does). |0|' = 0 * ... = 0: torch's convention
        a = x * x.sign().detach()
        out = a.sum(dim=dim, keepdim=keepdim) if dim is not None else a.sum()
        return out.reshape((1,) * x.dim()) if dim is None and keepdim else out
    s = (x * x).sum(dim=dim, keepdim=keepdim) if dim is not None else (x * x).sum()
    if dim is None and keepdim:
        s = s.reshape((1,) * x.dim())
    zero = s == 0
    return torch.where(zero, torch.zeros_like(s), torch.sqrt(torch.where(zero, torch.ones_like(s), s)))


def _two_norm_call(x, ord_, dim, keepdim, dtype) -> bool:
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and dtype is None
            and (ord_ == 2 or ord_ == "fro" or ord_ is None)
            and (dim is None or isinstance(dim, int) or (isinstance(dim, (tuple, list)) and ord_ != 2)
                 or (isinstance(dim, (tuple, list)) and len(dim) == 1)))


def vector_norm_entry(original, args, kwargs):
    """``torch.linalg.vector_norm`` / ``torch.norm`` / ``Tensor.norm`` while transforms are
    live: the 2-norm as functional ops under nested forward-over-reverse (see above)."""
    if not _nested_forward_live() or kwargs.get("out") is not None:
        return original(*args, **kwargs)
    name = getattr(original, "__name__", "")
    default_ord = 2 if name == "vector_norm" else "fro"
    names = ("input", "ord" if name == "vector_norm" else "p", "dim", "keepdim")
    params = dict(zip(names, args))
    params.update(kwargs)
    x = params.get("input", params.get("x", params.get("self")))
    ord_ = params.get(names[1], default_ord)
    dim, keepdim, dtype = params.get("dim"), bool(params.get("keepdim", False)), params.get("dtype")
    if len(args) > 4 or not _two_norm_call(x, ord_, dim, keepdim, dtype):
        return original(*args, **kwargs)
    return _safe_two_norm(x, dim, keepdim)
