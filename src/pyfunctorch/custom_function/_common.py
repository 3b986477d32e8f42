"""What kind of autograd.Function a class is, the real ``Function.apply``, and small helpers shared by the levels (errors, tree helpers, output wrapping)."""

from __future__ import annotations

import inspect
import types

import torch
from torch.autograd.function import Function, _SingleLevelFunction

from .._pytree import tensor_leaves as _leaves

_ORIG_APPLY = Function.__dict__["apply"]  # a classmethod object (torch <= 2.13)
if not isinstance(_ORIG_APPLY, classmethod):
    # torch >= 2.14 implements apply in C++ (``_C._FunctionBase.apply``, a classmethod_descriptor):
    # there is no Python code to swap while a transform is live (entry.py). At import, Function.apply
    # becomes a Python classmethod that calls the C++ one (one Python frame per custom Function call,
    # torch.compile traces it, fullgraph included), and the entry point swaps *its* code instead.
    _C_APPLY = _ORIG_APPLY

    def _make_apply():
        __class__ = None  # one free variable, as the entry point's code has (entry.py asserts it)

        def apply(cls, *args, **kwargs):
            __class__  # noqa: B018
            return _C_APPLY.__get__(None, cls)(*args, **kwargs)

        return apply

    _ORIG_APPLY = classmethod(_make_apply())
    Function.apply = _ORIG_APPLY
_APPLY_FN = _ORIG_APPLY.__func__
# the original code keeps running as a copy of the function while the entry point's code
# is swapped into Function.apply (see entry.py)
_orig_apply_fn = types.FunctionType(
    _APPLY_FN.__code__, _APPLY_FN.__globals__, _APPLY_FN.__name__, _APPLY_FN.__defaults__, _APPLY_FN.__closure__
)
_orig_apply_fn.__kwdefaults__ = _APPLY_FN.__kwdefaults__
_orig_apply_fn.__qualname__ = _APPLY_FN.__qualname__


def _orig_apply(cls, *args, **kwargs):
    """The real ``Function.apply`` (level 0), also while the entry point is installed."""
    return _orig_apply_fn(cls, *args, **kwargs)


# -- what kind of Function is it ------------------------------------------------------


def _has_setup_context(cls) -> bool:
    return cls.setup_context is not _SingleLevelFunction.setup_context


def _has_jvp(cls) -> bool:
    return cls.jvp is not _SingleLevelFunction.jvp


def _has_vmap(cls) -> bool:
    return cls.vmap is not Function.vmap


def _user_backward(cls):
    bwd, vjp = cls.backward, cls.vjp
    if bwd is not Function.backward and vjp is not Function.vjp:
        raise RuntimeError(
            f"{cls.__name__}: implementing both 'backward' and 'vjp' for a custom Function is not allowed. "
            "You should only implement one of them."
        )
    return vjp if vjp is not Function.vjp else bwd


def _old_style_error(cls) -> RuntimeError:
    return RuntimeError(
        f"pyfunctorch: the autograd.Function {cls.__name__} was called on a tensor of a pyfunctorch transform "
        "(vmap, grad, vjp, jvp, jacrev, jacfwd, hessian), but it defines `forward(ctx, ...)` without a separate "
        "`setup_context` staticmethod. Transforms need the two split, as in torch.func: write "
        "`forward(*args)` (no ctx) that only computes the outputs, and "
        "`setup_context(ctx, inputs, output)` that saves what backward/jvp need "
        "(ctx.save_for_backward / ctx.save_for_forward). "
        "See https://pytorch.org/docs/stable/notes/extending.func.html"
    )


def _missing_jvp_error(cls) -> RuntimeError:
    return RuntimeError(
        f"pyfunctorch: the autograd.Function {cls.__name__} is used under forward-mode AD (jvp, jacfwd, "
        f"hessian, linearize), but {cls.__name__} does not define a `jvp` staticmethod. Define "
        "`jvp(ctx, *input_tangents)` returning the output tangents (save what it needs in setup_context, "
        "e.g. with ctx.save_for_forward), or use a reverse-mode transform (grad, vjp, jacrev)."
    )


# -- small tree helpers (Function inputs are positional; containers one level deep) ----


def _map_tensors(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(fn, y) for y in x)
    return x


def _has_tensor_kwargs(kwargs) -> bool:
    return bool(kwargs) and bool(_leaves(list(kwargs.values()), []))


def _wrap_outputs(outputs, inner_inputs, orig_inputs, wrap_fn):
    """Wrap a Function's outputs at a level. An output that *is* one of the unwrapped
    inputs becomes that very input wrapper again (mark_dirty / view semantics need the
    identity)."""
    ids = {id(u): o for u, o in zip(_leaves(inner_inputs, []), _leaves(orig_inputs, []))}

    def one(t, *d):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in ids:
            return ids[id(t)]
        return wrap_fn(t, *d)

    if isinstance(outputs, tuple):
        return tuple(one(t) for t in outputs)
    return one(outputs)


def _bind(cls, args, kwargs):
    """As torch's apply does for new-style Functions: bind defaults of forward."""
    sig = inspect.signature(cls.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.args), dict(bound.kwargs)
