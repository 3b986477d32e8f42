"""A backward formula that cannot batch (it writes batched grads into scratch made from unbatched values) re-run once per example of the top vmap level."""

from __future__ import annotations

import functools
import warnings

import torch

from .. import _core
from .._core import lowered as _lowered
from .._pytree import tensor_leaves as _leaves
from ..batched.tensor import BatchedTensor
from ..errors import BatchedWriteError, PerformanceWarning
from ._common import _map_tensors


# -- a backward formula that cannot batch: run it once per example ---------------------
#
# A backward formula is Python code, not an op: under vmap∘grad it runs on batched
# grad_outputs, and some formulas write them in place into scratch they computed from
# unbatched tensors (torch's linear_cross_entropy: ``w = (~mask).to(dt); w.mul_(g)``).
# The vmap level refuses that write (BatchedWriteError) before changing anything; the
# formula is then re-run once per example of the top vmap level among its tensors (the
# per-example loop is vmap's definition) and the per-example grads are stacked, with a
# PerformanceWarning. The decomposition path of VmapInterpreter.process does the same for
# scratch made by torch internals.


def _level_chain(t):
    while isinstance(t, _core.LevelTensor):
        yield t
        t = t._value


def _version_key(tensors):
    return [tuple(w._version for w in _level_chain(t)) + (t._version,) for t in tensors]


def _top_vmap(tensors):
    """The highest live vmap level inside ``tensors`` (under any wrappers), or None."""
    top = None
    for t in tensors:
        for w in _level_chain(t):
            i = w._interp
            if i.kind == "vmap" and i.alive and (top is None or i.level > top.level):
                top = i
    return top


class _NotPerExample(Exception):
    pass


def _strip_above(t, interp):
    """``t`` without its wrappers above vmap level ``interp``. Only grad wrappers are
    dropped, and only while grad mode is off (a backward run without create_graph: no
    level records the formula's ops, so those wrappers carry nothing the result needs)."""
    x = t
    while isinstance(x, _core.LevelTensor) and x._interp.level > interp.level:
        if x._interp.kind != "grad" or torch.is_grad_enabled():
            raise _NotPerExample
        x = x._value
    return x


class _ExampleCtx:
    """One example's view of a backward ctx: saved tensors and tensor attributes sliced at
    one vmap level; attributes the formula sets stay on this object."""

    def __init__(self, ctx, saved, take):
        object.__setattr__(self, "_pyf_ctx", ctx)
        object.__setattr__(self, "_pyf_take", take)
        object.__setattr__(self, "saved_tensors", saved)

    def __getattr__(self, name):
        return self._pyf_take(getattr(self._pyf_ctx, name))


_WARNED_BWD: set = set()


def call_backward(bwd, ctx, grads, name: str):
    """``bwd(ctx, *grads)``, re-run once per example if it cannot be batched (see above)."""
    versions = _version_key([g for g in grads if isinstance(g, torch.Tensor)])
    try:
        return bwd(ctx, *grads)
    except BatchedWriteError as err:
        error = err  # (``err`` is unbound after the except block)
        saved = tuple(ctx.saved_tensors)
        interp = _top_vmap(_leaves(list(grads) + list(saved), []))
        if interp is None or _version_key([g for g in grads if isinstance(g, torch.Tensor)]) != versions:
            raise  # not ours to loop over, or the formula already changed its inputs
        try:
            strip = functools.partial(_map_tensors, lambda t: _strip_above(t, interp))
            saved, grads = strip(saved), strip(tuple(grads))
        except _NotPerExample:
            raise error from None
    if name not in _WARNED_BWD:
        _WARNED_BWD.add(name)
        warnings.warn(
            f"pyfunctorch.vmap: the backward formula of {name} writes batched gradients into a tensor it "
            "computed from unbatched values; running that backward once per example (correct but slow).",
            PerformanceWarning,
            stacklevel=2,
        )

    def take_at(b):
        def take(x):
            if isinstance(x, torch.Tensor):
                try:
                    x = _strip_above(x, interp)
                except _NotPerExample:
                    raise error from None
            if isinstance(x, BatchedTensor) and x._interp is interp:
                return x._value.select(x._bdim, b)
            if isinstance(x, (tuple, list)) and any(isinstance(y, torch.Tensor) for y in x):
                return type(x)(take(y) for y in x)
            return x

        return take

    outs = []
    with _lowered(interp.level):
        for b in range(interp.batch_size):
            take = take_at(b)
            ex_ctx = _ExampleCtx(ctx, take(saved), take)
            outs.append(call_backward(bwd, ex_ctx, tuple(take(g) for g in grads), name))
    single = not isinstance(outs[0], tuple)
    if single:
        outs = [(o,) for o in outs]

    def stack(col):
        present = [c for c in col if c is not None]
        if not present:
            return None
        if not all(isinstance(c, torch.Tensor) for c in present):
            return col[0]
        like = present[0]
        col = [torch.zeros_like(like) if c is None else c for c in col]
        return BatchedTensor(torch.stack(col), 0, interp)

    res = tuple(stack(list(col)) for col in zip(*outs))
    return res[0] if single else res


def _per_example_backward_class(cls):
    """``cls`` (a Function torch defines, e.g. a torch.library op's autograd kernel) with
    its backward run through :func:`call_backward`."""
    sub = cls.__dict__.get("_pyfunctorch_safe_bwd")
    if sub is not None:
        return sub
    bwd = cls.backward
    name = cls.__name__

    def backward(ctx, *grads):
        return call_backward(bwd, ctx, grads, name)

    sub = type(cls.__name__, (cls,), {"backward": staticmethod(backward), "__module__": cls.__module__,
                                       "__qualname__": getattr(cls, "__qualname__", cls.__name__)})
    setattr(cls, "_pyfunctorch_safe_bwd", sub)
    return sub
