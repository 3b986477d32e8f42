"""The ``Function.apply`` entry point: while a transform is live, ``apply`` runs :func:`custom_function_call`, which hands the call to the rule of the highest live level among the arguments (``LEVEL_RULES``, filled by bridge.py and vmap_level.py)."""

from __future__ import annotations

from contextlib import contextmanager

from .. import _core
from .._pytree import tensor_leaves as _leaves
from ._common import (
    _APPLY_FN,
    _bind,
    _has_setup_context,
    _has_tensor_kwargs,
    _old_style_error,
    _orig_apply,
    _orig_apply_fn,
)
from .per_example_backward import _per_example_backward_class

#: interpreter kind ("grad", "jvp", "vmap") -> rule(interp, cls, args, kwargs)
LEVEL_RULES: dict = {}


def level_rule(kind: str):
    """Register the decorated function as the rule for Functions whose top level is of ``kind``."""

    def register(fn):
        LEVEL_RULES[kind] = fn
        return fn

    return register


def custom_function_call(cls, args: tuple, kwargs: dict):
    """``cls.apply(*args, **kwargs)`` at the highest live level among the arguments."""
    new_style = _has_setup_context(cls)
    if new_style:
        args, kwargs = _bind(cls, args, kwargs)
    # dead grad/jvp wrappers stand for their values (torch.func: unwrap_dead_wrappers)
    args = tuple(_core._resolve_dead(a) for a in args)
    if kwargs:
        kwargs = {k: _core._resolve_dead(v) for k, v in kwargs.items()}
    top, _ = _core._find_top(args, kwargs or {})
    if top is None:
        out = _orig_apply(cls, *args, **kwargs)
        _check_no_closure(cls, out)
        return out
    if not new_style:
        raise _old_style_error(cls)
    if _has_tensor_kwargs(kwargs):
        raise NotImplementedError(
            f"pyfunctorch: {cls.__name__}.apply got tensors as keyword arguments inside a transform; "
            "pass tensors to an autograd.Function positionally."
        )
    rule = LEVEL_RULES.get(top.kind)
    if rule is not None:
        return rule(top, cls, args, kwargs)
    raise NotImplementedError(f"pyfunctorch: autograd.Function under a {top.kind} level is not supported.")


def _check_no_closure(cls, out) -> None:
    """torch runs forward under no_grad: a forward that reads a differentiated tensor from a
    closure (not an argument) would silently drop its derivative. Refuse instead."""
    for o in _leaves(out if isinstance(out, (tuple, list)) else [out], []):
        if isinstance(o, _core.LevelTensor) and o._interp.alive and o._interp.kind in ("grad", "jvp"):
            raise RuntimeError(
                f"pyfunctorch: {cls.__name__}.forward used a tensor that a {o._interp.kind} transform is "
                "differentiating without receiving it as an argument (e.g. through a closure or a global). "
                "Its derivative would be lost: pass that tensor to apply() as an argument."
            )


# -- installing the entry point -----------------------------------------------------------
#
# ``_core.patch_while_active`` cannot express this patch: it installs a plain-function
# wrapper with ``setattr``, which (1) loses the classmethod binding of ``Function.apply``
# (``MyFn.apply(x)`` would not see ``MyFn``) and (2) misses every ``MyFn.apply`` bound
# *before* the transform started (``vmap(MyFn.apply)``, ``jacrev(MyFn.apply)``: the
# bound method holds the original function). So the original function's *code* is
# swapped instead (``_core.swap_code_while_active``, in pyfunctorch/patches.py) with the same install/uninstall
# timing as every other patch (only while a transform is live; other threads see the
# entry check their own, empty, stack and go to the original). The original code keeps
# running as a copy of the function (``_orig_apply_fn``).


def _apply_entry(cls, args, kwargs):
    if not _core._state.stack:
        # (installed only by _entry_installed: a backward run after its level ended)
        if any(isinstance(a, _core.LevelTensor) for a in _leaves(list(args) + list(kwargs.values()), [])):
            args = tuple(_core._resolve_dead(a) for a in args)
            kwargs = {k: _core._resolve_dead(v) for k, v in kwargs.items()}
        return _orig_apply_fn(cls, *args, **kwargs)
    if _is_torch_internal_old_style(cls):
        if cls.__module__ == "torch._library.autograd" and "apply" not in cls.__dict__:
            # a torch.library custom op's autograd kernel: its backward may later run under
            # a vmap (vmap(grad), or vmap over a vjp_fn) and need the per-example re-run
            cls = _per_example_backward_class(cls)
        return _orig_apply_fn(cls, *args, **kwargs)
    return custom_function_call(cls, args, kwargs)


@contextmanager
def _entry_installed():
    fn = _APPLY_FN
    if fn.__code__ is _ENTRY_CODE:
        yield
        return
    fn.__code__ = _ENTRY_CODE
    try:
        yield
    finally:
        fn.__code__ = _APPLY_CODE


def _is_torch_internal_old_style(cls) -> bool:
    """Old-style Functions defined inside torch keep the real apply, as before this
    module: some run *inside* an op's dispatch (torch.library's autograd kernels, e.g.
    for prims reached through a decomposition), where the levels are already handled."""
    if _has_setup_context(cls):
        return False
    mod = getattr(cls, "__module__", None) or ""
    return mod == "torch" or mod.startswith("torch.")


def _entry_code():
    __class__ = None  # one free variable, like the original (its super() cell)

    def apply(cls, *args, **kwargs):
        __class__  # noqa: B018
        from pyfunctorch.custom_function.entry import _apply_entry

        return _apply_entry(cls, args, kwargs)

    return apply.__code__


_ENTRY_CODE = _entry_code()
_APPLY_CODE = _APPLY_FN.__code__
assert len(_ENTRY_CODE.co_freevars) == len(_APPLY_FN.__closure__ or ()), "torch changed Function.apply"

