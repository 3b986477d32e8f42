"""autograd.Function at grad and jvp levels: a *bridge* Function on the level's wrappers whose setup_context, backward and jvp are the user's."""

from __future__ import annotations

import threading

import torch
from torch.autograd.function import Function

from .. import _core
from .._core import lowered as _lowered
from .._pytree import tensor_leaves as _leaves
from ..forward import JvpTensor
from ..reverse import GradTensor
from ._common import _has_jvp, _map_tensors, _missing_jvp_error, _orig_apply, _user_backward, _wrap_outputs
from .entry import _entry_installed, custom_function_call, level_rule
from .per_example_backward import call_backward


_tls = threading.local()


def _pending() -> list:
    p = getattr(_tls, "pending", None)
    if p is None:
        p = _tls.pending = []
    return p


def _bridge(cls):
    """A Function applied to one level's wrappers: its forward returns the outputs
    computed below (handed over through ``_pending``), its setup_context / backward /
    jvp are the user's."""
    b = cls.__dict__.get("_pyfunctorch_bridge")
    if b is not None:
        return b
    user_bwd = _user_backward(cls)
    boxed = bool(getattr(cls, "boxed_grads_call", False))

    def forward(*operands):
        return _pending().pop()

    def setup_context(ctx, inputs, output):
        ctx._pyfunctorch_interp = _core._find_top(inputs, {})[0]
        return cls.setup_context(ctx, inputs, output)

    def backward(ctx, *grads):
        # vjp_fn runs this after its level ended, possibly with no transform live: a
        # Function called by the user's backward must still see the (dead) wrappers
        # resolved, so keep the entry point installed meanwhile (torch.func: apply
        # always unwraps dead wrappers).
        with _entry_installed():
            return call_backward(user_bwd, ctx, grads, cls.__name__)

    def jvp(ctx, *tangents):
        # The tangents as tensors of this level: the user's jvp mixes them with saved
        # tensors of this level, in place too (mark_dirty Functions update the tangent).
        interp = ctx._pyfunctorch_interp
        if interp is None or interp.kind != "jvp":
            return cls.jvp(ctx, *tangents)
        lifted = {}

        def lift(t):
            if not isinstance(t, torch.Tensor) or (isinstance(t, JvpTensor) and t._interp is interp):
                return t
            w = JvpTensor(t, interp)
            lifted[id(w)] = t
            return w

        out = cls.jvp(ctx, *(lift(t) for t in tangents))
        # a tangent returned as-is (the in-place case) must be the input's own tangent
        if isinstance(out, tuple):
            return tuple(lifted.get(id(o), o) for o in out)
        return lifted.get(id(out), out)

    b = type(
        cls.__name__,
        (Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "boxed_grads_call": boxed,
            "clear_saved_tensors_on_access": bool(getattr(cls, "clear_saved_tensors_on_access", False)),
            "__module__": getattr(cls, "__module__", __name__),
            "__qualname__": getattr(cls, "__qualname__", cls.__name__),
        },
    )
    try:
        setattr(cls, "_pyfunctorch_bridge", b)
    except (AttributeError, TypeError):  # pragma: no cover - exotic metaclass
        pass
    return b


def _unwrap_level(x, cls_, interp):
    return _map_tensors(lambda t: t._value if isinstance(t, cls_) and t._interp is interp else t, x)


def _through_bridge(interp, cls, args, kwargs, wrapper_cls):
    inner = tuple(_unwrap_level(a, wrapper_cls, interp) for a in args)
    with _lowered(interp.level):
        inner_out = custom_function_call(cls, inner, kwargs)
    wrapped = _wrap_outputs(inner_out, inner, args, lambda t: wrapper_cls(t, interp))
    pend = _pending()
    pend.append(wrapped)
    n = len(pend)
    try:
        with _lowered(interp.level + 1):
            return _orig_apply(_bridge(cls), *args)
    finally:
        del pend[n - 1 :]  # forward did not run (an error before it): drop the hand-over


@level_rule("grad")
def _grad_rule(interp, cls, args, kwargs):
    shadow = getattr(interp, "shadow", None)
    if shadow is not None:
        # the plain graph below holds the real Function, whose backward the engine would call
        # on whatever grads it gets (batched ones under vmap(vjp_fn)): the bridge's
        # call_backward handles those, so this level differentiates its wrappers
        shadow.usable = False
    if _core._state.jvp_depth:
        # tangents of lower jvp levels must not reach this level's bridge (trap 5)
        args, _ = _core.lift_mixed(args, {})
    return _through_bridge(interp, cls, args, kwargs, GradTensor)


@level_rule("jvp")
def _jvp_rule(interp, cls, args, kwargs):
    args, _ = _core.lift_mixed(args, {})
    if not _has_jvp(cls):
        for t in _leaves(args, []):
            if isinstance(t, JvpTensor) and t._interp is interp and _core._is_dual(t):
                raise _missing_jvp_error(getattr(cls, "_pyf_origin", cls))
    return _through_bridge(interp, cls, args, kwargs, JvpTensor)
