"""Handlers of the core's torch entry points, patched while a transform is live (rows of patches.py): tensors the user's function creates (factories, clones) and the user's detach."""

from __future__ import annotations

import sys

import torch

from ._core import LevelTensor, WrapperInterpreter, _state, detach_all_levels
from ._ownership import own_fresh_result_of_user_call


# -- tensors created inside a transformed function ----------------------------------


def factory_entry(original, args, kwargs):
    """Factories called inside transforms (torch.zeros, arange, ...) return tensors that
    belong to every live level (lifted from the bottom up), so writing transformed data
    into them works per example (vmap) and stays differentiable (grad/jvp)."""
    if _state.in_saved_hook:  # (autograd's side: pyfunctorch._saved_hooks)
        return original(*args, **kwargs)
    name = getattr(original, "__name__", "")
    if name in ("tensor", "new_tensor") and args:
        # copying a transformed tensor's data: a constant at every level (as ``x.detach()``);
        # torch's C++ detach inside would be autograd's own (trap 2), keeping lower graphs
        k = 1 if name == "new_tensor" else 0
        if len(args) > k and isinstance(args[k], LevelTensor):
            args = args[:k] + (detach_all_levels(args[k]),) + args[k + 1:]
    out = original(*args, **kwargs)
    if not isinstance(out, torch.Tensor) or isinstance(out, LevelTensor) or out.requires_grad:
        return out
    # Only the user's own code: torch internals (decompositions, nn.functional) and
    # this library create scratch tensors that must stay plain.
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller.startswith(("torch.", "pyfunctorch.")) or caller in ("torch", "pyfunctorch"):
        return out
    if out.layout != torch.strided or not out.is_contiguous():
        return out
    for interp in _state.stack:
        out = interp.wrap_created(out)
    return out


def clone_entry(original, args, kwargs):
    """A clone, made in the user's function, of a tensor from outside (a captured constant)
    is created inside: it belongs to the live differentiation levels, so writing
    differentiated data into it is recorded (as torch.func, whose every op output inside a
    grad level is that level's tensor). Clones of level tensors already are. vmap levels
    keep such a clone unbatched, as torch.func: writing batched data into it is the error
    torch.func raises."""
    out = original(*args, **kwargs)
    if not isinstance(out, torch.Tensor) or _state.in_saved_hook:  # (hooks: see _saved_hooks)
        return out
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller.startswith(("torch.", "pyfunctorch.")) or caller in ("torch", "pyfunctorch"):
        return out
    if isinstance(out, LevelTensor):  # a clone of a captured lower-level tensor (see own_fresh_results)
        return own_fresh_result_of_user_call(out) if out is not args[0] else out
    if out.layout != torch.strided or not out.is_contiguous():
        return out
    for interp in _state.stack:
        if isinstance(interp, WrapperInterpreter):  # the differentiation levels (grad, jvp)
            out = interp.wrap_created(out)
    return out


# Python code of torch's saved-tensor hooks (non-reentrant checkpoint recomputation
# save_on_cpu) detaches what autograd saves; autograd then re-attaches only the top
# level's graph when it unpacks. That detach is autograd's own (trap 2): detaching
# every level there would cut the lower levels' graphs, and hessian / jacrev(grad)
# through checkpoint would be 0. Any saved-tensor hook run while transforms are live is the
# same (``_state.in_saved_hook``, pyfunctorch._saved_hooks): a user's
# ``saved_tensors_hooks(lambda t: t.detach(), ...)`` gave grad(grad(f)) = 0.
_AUTOGRAD_INTERNAL_DETACH = ("torch.utils.checkpoint",)


def user_detach(original, args, kwargs):
    # autograd's internal detach (saving outputs for backward) never comes through
    # here: it is a C++ call and must keep the inner graphs (see GradInterpreter).
    x = args[0]
    if isinstance(x, LevelTensor) and not kwargs and len(args) == 1:
        if _state.in_saved_hook or sys._getframe(2).f_globals.get("__name__", "") in _AUTOGRAD_INTERNAL_DETACH:
            return original(x)
        return detach_all_levels(x)
    return original(*args, **kwargs)


def linear_cross_entropy_entry(original, args, kwargs):
    """``F.linear_cross_entropy`` with chunking options (torch >= 2.13) precomputes its gradients
    inside its forward and hands them over by in-place mutation in its backward, outside
    autograd's contract (torch documents that torch.func's transforms do not work with it;
    differentiated around vmap it gave wrong gradients). Under a transform the reference
    computation runs instead (``options=None``: linear, then cross_entropy), which every
    transform differentiates exactly; the values are the same, the chunking's memory saving is
    not kept."""
    if kwargs.get("options") is not None:
        kwargs = dict(kwargs, options=None)
    return original(*args, **kwargs)
