"""Saved-tensor hooks under transforms: they run where the tensor was saved and keep the graphs of the levels below it."""

from __future__ import annotations

from typing import Callable

import torch

from ._state import _state

_push = torch._C._autograd._push_saved_tensors_default_hooks  # (torch's own: never the patched entry)
_pop = torch._C._autograd._pop_saved_tensors_default_hooks
_top = torch._C._autograd._top_saved_tensors_default_hooks
_hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled
_plain_detach = torch._C.TensorBase.detach
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_BYPASS = object()


def wrap_hooks(pack: Callable, unpack: Callable, level_type: type, keep_plain: bool = False):
    """The (pack, unpack) pair torch is given for a user's saved-tensor hooks while transforms
    are live.

    torch calls a pack hook under no_grad and, when it unpacks, re-attaches the saved
    tensor's graph edge itself (so in plain torch whatever the hook computes changes no
    derivative). Under transforms the tensor a level saves is a wrapper whose inner value
    carries the graphs of the levels below it, and torch re-attaches only the saving
    level's edge: the hook's ops (``t.clone()``, ``t.to(dtype)``) must be recorded below
    it, or higher derivatives through the saved value are 0 (grad(grad(f)) was). So the
    hook runs with grad mode on where it packs a wrapper.

    The hooks are autograd's side, not the transformed function: while they run
    (``_state.in_saved_hook``) the entry points that treat the function's own calls
    (pyfunctorch._entries: a factory or clone belonging to the live levels, a ``detach()``
    cutting every level) act as torch's: a clone of a plain saved tensor stays plain (it
    was lifted into the grad level and leaked a wrapper into the plain graph), a detach cuts
    only the level that saves (as autograd's own detach).

    ``keep_plain``: plain tensors are kept as they are and never given to the hooks (a
    shadow graph's saved values, see reverse._Shadow)."""

    # torch's own hooks (checkpoint's unpack hook re-runs the user's function, whose factories and
    # detach must act as in its first run; save_on_cpu's ops are torch's anyway) set no flag
    flag = 0 if getattr(pack, "__module__", "").startswith("torch.") else 1

    def pack_hook(t):
        if keep_plain and type(t) in _PLAIN:
            return _BYPASS, _plain_detach(t)
        st = _state
        interp = t._interp if isinstance(t, level_type) else None
        if not flag and interp is not None and _level_above(st.stack, interp.level):
            # torch's own hook (checkpoint) packing inside a region that runs under a level above
            # the saving one: the recomputation would run in the saving level's backward, after
            # that level has ended -- a jvp level's tangents dropped by torch's forward AD, a grad
            # level's ops not recorded, so it computed (and saved) less than the first run
            # (CheckpointError: vmap(grad(jvp)), hessian(vjp(vjp)); plain torch fails the same way
            # when the backward follows its dual level), a vmap level's wrappers gone
            # (EscapedTensorError under pyfunctorch.compile's trace of vjp(vmap(f))). Kept instead
            # of recomputed (the value; its graph edge as torch's). The innermost level's saves
            # stay checkpointed; in their recomputation the saves below are kept the same way.
            return _BYPASS, _plain_detach(t)
        st.in_saved_hook += flag
        try:
            if interp is not None and not torch.is_grad_enabled():
                with torch.enable_grad():
                    return interp, pack(t)
            return interp, pack(t)
        finally:
            st.in_saved_hook -= flag

    def unpack_hook(packed):
        interp, value = packed
        if interp is _BYPASS:
            return value
        # The hook runs where the tensor was saved: the levels made after its level are not
        # current, and a grad level that has ended (vjp_fn) is current again for the call.
        # Checkpoint's unpack hook re-runs the function, whose factories must belong to the
        # same levels as in its first run: with the level ended they did not, the recomputed
        # graph saved other tensors than the first, and checkpoint paired them by position
        # (jvp of vjp_fn, hessian through a checkpointed function that fills a buffer: wrong).
        level = 0 if interp is None else interp.level
        st = _state
        stack = st.stack
        saved = None
        if stack and stack[-1].level > level:
            saved = list(stack)
            stack[:] = [it for it in saved if it.level <= level]
        revive = interp is not None and not interp.alive and interp.kind == "grad"
        if revive:
            if saved is None:
                saved = list(stack)
            stack.append(interp)
            interp.alive = True
        st.in_saved_hook += flag
        try:
            return unpack(value)
        finally:
            st.in_saved_hook -= flag
            if revive:
                interp.alive = False
            if saved is not None:
                stack[:] = saved

    pack_hook._pyf_wrapped = True
    return pack_hook, unpack_hook


def _level_above(stack, level: int) -> bool:
    """A live level above ``level`` (one that ends before ``level``'s backward)."""
    return bool(stack) and stack[-1].level > level


def wrap_active_hooks(level_type: type) -> bool:
    """At the outermost transform's entry: saved-tensor hooks pushed before it (around the
    call) are pushed again, wrapped (``wrap_hooks``), for its duration. True if pushed (then
    ``_pop`` at its exit)."""
    if not _hooks_enabled():
        return False
    hooks = _top(True)
    if hooks is None or getattr(hooks[0], "_pyf_wrapped", False):
        return False
    _push(*wrap_hooks(hooks[0], hooks[1], level_type))
    return True


pop_hooks = _pop
