"""Which levels own a tensor made inside a transform: inputs, tangents and cotangents lifted into every live differentiation level below, and fresh results of captured tensors made tensors of the levels above (as in functorch, where every value inside a transform belongs to it)."""

from __future__ import annotations

import itertools
import sys

import torch

from ._core import LevelTensor
from ._state import _state


def lift_into_live_levels(x, below: int):
    """``x`` (an input, tangent or cotangent a transform at level ``below`` is about to
    wrap) made a tensor of every live differentiation level under ``below`` that it does
    not already belong to, as a constant there -- as in functorch, where every value
    inside a transform is a tensor of that transform. Without it, a plain tangent buffer
    (or a clone of a plain input) that a forward-AD formula or the user then updates in
    place with values depending on an outer level would have to carry that level's
    derivative on a tensor that cannot (the in-place write is refused or, worse, the
    derivative lost). vmap levels are left as they are: only their inner values are lifted."""
    levels = None
    for it in _state.stack:
        if it.level >= below:
            break
        if it.kind == "grad" or it.kind == "jvp":
            if levels is None:
                levels = []
            levels.append(it)
    if levels is None or not isinstance(x, torch.Tensor):
        return x
    return _lift_chain(x, levels)


def _lift_chain(x, levels):
    rest = levels
    if isinstance(x, LevelTensor):
        it = x._interp
        if not it.alive:
            return x
        k = it.level
        if it.kind == "vmap" and not getattr(x, "_lazy", False):
            below = [i for i in levels if i.level < k]
            inner = _lift_chain(x._value, below) if below else x._value
            if inner is not x._value:
                x = type(x)(inner, x._bdim, it)
        # a grad/jvp wrapper keeps its inner value: it may carry its level's derivative
        rest = [i for i in levels if i.level > k]
    for it in rest:
        x = it.lift(x)
    return x


def own_fresh_results(out, args, kwargs):
    """Fresh tensors computed inside a transformed function from lower-level tensors only
    (``b = a.clone()``, ``b = a * 2`` with ``a`` captured from an outer transform) made
    tensors of the differentiation levels above them, as in functorch, where every result
    inside a transform belongs to it: an in-place write of an inner derivative into them
    (``b[:2].copy_(y)``) is then recorded on the tensor the user holds. Views and returned
    inputs stay as they are (a write through them must reach the captured tensor)."""
    if _state.dispatch_depth:
        return out  # an op our own dispatch runs on inner values, not the user's
    st = _state.stack
    if not st or not isinstance(out, LevelTensor):
        return out
    lvl = out._interp.level
    if lvl >= st[-1].level or not out._interp.alive:
        return out
    levels = [it for it in st if it.level > lvl and (it.kind == "grad" or it.kind == "jvp")]
    if not levels or out._is_view():
        return out
    for a in itertools.chain(args, kwargs.values()):
        if a is out:
            return out
    # only the user's own code: torch internals and this library compute at lower levels
    # on purpose (frames: this function, __torch_function__, the caller); an entry point
    # patched while transforms are live (Tensor.clone) decides itself (_entries.clone_entry)
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller.startswith(("torch.", "pyfunctorch.")) or caller in ("torch", "pyfunctorch"):
        return out
    return _lift_chain(out, levels)


def own_fresh_result_of_user_call(out):
    """``own_fresh_results`` for a result the caller knows the user's code asked for."""
    st = _state.stack
    if _state.dispatch_depth or not st or not isinstance(out, LevelTensor):
        return out
    lvl = out._interp.level
    if lvl >= st[-1].level or not out._interp.alive or out._is_view():
        return out
    levels = [it for it in st if it.level > lvl and (it.kind == "grad" or it.kind == "jvp")]
    return _lift_chain(out, levels) if levels else out
