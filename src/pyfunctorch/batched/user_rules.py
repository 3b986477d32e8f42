"""Users' own vmap rules, called as torch.func calls them: an autograd.Function's ``vmap`` staticmethod and a torch.library custom op's ``register_vmap`` function (physical values, each batch dim where it is; ``(outputs, out_dims)`` back)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _core
from .._core import lowered as _lowered
from .._pytree import tensor_leaves as _leaves
from .fallbacks import loop_fallback
from .tensor import BatchedTensor, batched_here


class VmapInfo(NamedTuple):
    """What a user ``vmap`` staticmethod receives as ``info``."""

    batch_size: int
    randomness: str


def _unwrap_batched(x, interp):
    """(physical value, bdim) for a top-level argument; nested containers give nested dims."""
    if isinstance(x, BatchedTensor) and x._interp is interp:
        if x._lazy:  # created inside, never written per example: unbatched
            return x._lazy_plain, None
        return x._value, x._bdim
    if isinstance(x, (tuple, list)) and any(isinstance(y, torch.Tensor) for y in x):
        pairs = [_unwrap_batched(y, interp) for y in x]
        dims = tuple(d for _, d in pairs)
        return type(x)(v for v, _ in pairs), (dims if any(d is not None for d in dims) else None)
    return x, None


def _norm_dim(d, t):
    return d % t.dim() if d < 0 else d


def run_vmap_rule(interp, fn, what: str, name: str, phys, in_dims, args, kwargs, lists_as_tuples: bool = False):
    """A user's vmap rule -- an autograd.Function's ``vmap`` staticmethod, a custom op's
    ``register_vmap`` function -- called as torch.func calls it, ``fn(info, in_dims, *phys,
    **kwargs)``, with this level lowered; its ``(outputs, out_dims)`` wrapped at the level."""
    with _lowered(interp.level):
        res = fn(VmapInfo(interp.batch_size, interp.randomness), in_dims, *phys, **kwargs)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise RuntimeError(
            f"pyfunctorch.vmap: {what} must return a pair (outputs, out_dims); it returned {type(res).__name__}"
            + (f" of length {len(res)}" if isinstance(res, tuple) else "") + "."
        )
    outputs, out_dims = res
    if lists_as_tuples and isinstance(outputs, list):  # (a Tensor[] return)
        outputs = tuple(outputs)
    return _wrap_batched_outputs(interp, name, outputs, out_dims, phys, args)


def _wrap_batched_outputs(interp, name, outputs, out_dims, phys, args):
    if isinstance(outputs, tuple):
        if isinstance(out_dims, int) or out_dims is None:
            out_dims = (out_dims,) * len(outputs)
        if not isinstance(out_dims, (tuple, list)) or len(out_dims) != len(outputs):
            raise RuntimeError(
                f"pyfunctorch.vmap: {name}: out_dims {out_dims!r} does not match the {len(outputs)} outputs."
            )
        ids = {id(u): o for u, o in zip(_leaves(phys, []), _leaves(args, []))}
        res = []
        for o, d in zip(outputs, out_dims):
            res.append(_wrap_one(interp, o, d, ids))
        return tuple(res)
    if not (out_dims is None or isinstance(out_dims, int)):
        raise RuntimeError(f"pyfunctorch.vmap: {name}: out_dims {out_dims!r} does not match a single output.")
    ids = {id(u): o for u, o in zip(_leaves(phys, []), _leaves(args, []))}
    return _wrap_one(interp, outputs, out_dims, ids)


def _wrap_one(interp, o, d, ids):
    if not isinstance(o, torch.Tensor):
        return o
    if id(o) in ids and d is not None:
        orig = ids[id(o)]
        if isinstance(orig, BatchedTensor) and orig._interp is interp and _norm_dim(d, o) == orig._bdim:
            return orig
    if d is None:
        return o
    return BatchedTensor(o, _norm_dim(d, o), interp)


def custom_op_vmap_fn(func):
    """The function a torch.library custom op registered with ``register_vmap`` (or None)."""
    if getattr(func, "namespace", "aten") in ("aten", "prims"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
    except Exception:  # pragma: no cover - torch without torch.library custom ops
        return None
    return getattr(opdef, "_vmap_fn", None) if opdef is not None else None


def custom_op_vmap(interp, func, args, kwargs):
    """A custom op's own ``register_vmap`` rule, called as torch.func calls it (the protocol of
    an autograd.Function's vmap staticmethod: physical values, each batch dim where it is)."""
    if any(batched_here(v, interp) for v in kwargs.values()):
        return loop_fallback(interp, func, args, kwargs)
    if getattr(func, "namespace", None) == "torch_nn" and "linear_cross_entropy_batch_chunked" in str(func) \
            and _core._differentiated_below(interp.level):
        # F.linear_cross_entropy's chunked ops precompute gradients in their forward and mutate
        # them in their backward (outside autograd's contract): differentiated around vmap their
        # per-example calls gave wrong gradients. F.linear_cross_entropy itself is routed to its
        # reference path under transforms (_entries.linear_cross_entropy_entry); a reference to
        # the function taken before (``from torch.nn.functional import ...``) lands here.
        raise NotImplementedError(
            "pyfunctorch: linear_cross_entropy with chunking options, under vmap and differentiated around "
            "it, would give wrong gradients (its chunked path precomputes gradients in its forward). Call it "
            "as torch.nn.functional.linear_cross_entropy (pyfunctorch then runs its reference path) or pass "
            "options=None.")
    pairs = [_unwrap_batched(a, interp) for a in args]
    return run_vmap_rule(interp, custom_op_vmap_fn(func), f"the register_vmap function of {func}", str(func),
                         [v for v, _ in pairs], tuple(d for _, d in pairs), args, kwargs, lists_as_tuples=True)
