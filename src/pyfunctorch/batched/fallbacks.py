"""vmap's fallbacks for ops without a batching rule (a torch._decomp decomposition, else the per-example loop), out= ops, lazy per-example buffers, and tensor_split's data read."""

from __future__ import annotations


import itertools
import warnings
import weakref

import torch
import torch._decomp  # noqa: F401

from .._core import Interpreter, LevelTensor
from .._ops import _mutated_returns, _return_aliases
from ..errors import PerExampleSignal, PerformanceWarning, batched_write_error
from .tensor import BatchedTensor, batched_here, slice_example


_WARNED_FALLBACK: set = set()
#: ops served by the loop fallback so far (for coverage reports)
FALLBACK_COUNTS: dict = {}


# -- decompositions --------------------------------------------------------------

_DECOMP_CACHE: dict = {}


def decomposition(func):
    try:
        return _DECOMP_CACHE[func]
    except KeyError:
        pass
    d = torch._decomp.decomposition_table.get(func)
    _DECOMP_CACHE[func] = d
    return d


# -- the loop fallback -------------------------------------------------------------


def loop_fallback(interp: "Interpreter", func, args, kwargs):
    """Run ``func`` once per example and stack the results: correct for any op, slow.

    Warns once per op so that a missing rule is visible (and can be added)."""
    FALLBACK_COUNTS[func] = FALLBACK_COUNTS.get(func, 0) + 1
    if func not in _WARNED_FALLBACK:
        _WARNED_FALLBACK.add(func)
        warnings.warn(
            f"pyfunctorch.vmap: there is no batching rule for {func}; running it once per example "
            "(correct but slow). Please report it so a rule can be added.",
            PerformanceWarning,
            stacklevel=2,
        )
    aliased = _mutated_returns(func)
    if aliased is not None and torch.Tag.inplace_view in func.tags:
        # per example it would change the metadata of a temporary slice only (trap 4)
        raise RuntimeError(
            f"vmap: {func} changes a tensor's shape or strides in place and has no batching rule; running it "
            "once per example would leave the batched tensor unchanged. Nothing was modified. Use its "
            "out-of-place form (e.g. `x = x.squeeze(0)` instead of `x.squeeze_(0)`)."
        )
    if aliased is not None:
        for w in aliased:
            target = args[w] if isinstance(w, int) else kwargs[w]
            if target is not None and not batched_here(target, interp):
                raise batched_write_error(func)
    B = interp.batch_size
    outs = []
    for b in range(B):
        a_b = tuple(slice_example(a, interp, b) for a in args)
        k_b = {k: slice_example(v, interp, b) for k, v in kwargs.items()}
        outs.append(func(*a_b, **k_b))
    if aliased is not None:
        return _return_aliases(aliased, args, kwargs, None)
    return stack_results(interp, func, outs)


def stack_results(interp, func, outs):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise PerExampleSignal(
                f"vmap: {func} returned tensors of different shapes for different examples "
                f"({sorted(shapes)[:3]}...); a batched tensor needs one shape.",
                interp,
            )
        return BatchedTensor(torch.stack(outs), 0, interp)
    if isinstance(first, (tuple, list)):
        return type(first)(stack_results(interp, func, list(col)) for col in zip(*outs))
    if all(o == first for o in outs):
        return first
    raise PerExampleSignal(f"vmap: {func} returned a different Python value for different examples.", interp)


# -- out= ops and lazy per-example buffers ---------------------------------------------


def out_variant(interp, func, args, kwargs, info):
    """``op(..., out=t)`` under vmap: the functional op, then ``t.copy_`` (per example)."""
    functional, out_names = info.out_variant
    outs = [kwargs[n] for n in out_names]
    rest = {k: v for k, v in kwargs.items() if k not in out_names}
    res = functional(*args, **rest)
    results = res if isinstance(res, (tuple, list)) else (res,)
    for o, r in zip(outs, results):
        if tuple(o.shape) != tuple(r.shape):
            raise RuntimeError(
                f"vmap: {func}: out= has shape {tuple(o.shape)} per example but the result has shape "
                f"{tuple(r.shape)}; resizing out= tensors is not supported under vmap. Allocate it with the "
                "result's shape."
            )
        o.copy_(r)
    return outs[0] if len(outs) == 1 else tuple(outs)


def has_lazy(args, kwargs, interp) -> bool:
    for a in itertools.chain(args, kwargs.values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, BatchedTensor) and b._lazy and b._interp is interp:
                return True
    return False


def lazy_wrap(plain: torch.Tensor, interp: "Interpreter", root=None) -> BatchedTensor:
    """A BatchedTensor whose examples all alias ``plain`` (expanded, no copy). Reads treat
    it as unbatched; the first write gives each example its own memory (materialize_lazy)."""
    w = BatchedTensor(plain.unsqueeze(0).expand((interp.batch_size,) + plain.shape), 0, interp)
    w._lazy = True
    w._lazy_plain = plain  # the one value every example reads (also when B == 0)
    if root is None:
        root = w
        w._lazy_views = []
        interp.lazy_count += 1
    else:
        root._lazy_views.append(weakref.ref(w))
    w._lazy_root = root
    w._pyf_created = w._version  # pristine while never written (see _core._pristine)
    return w


def _non_overlapping(shape, stride) -> bool:
    dims = sorted((st, n) for n, st in zip(shape, stride) if n > 1)
    need = 1
    for st, n in dims:
        if st < need:
            return False
        need = st * n
    return True


def materialize_lazy(root: BatchedTensor) -> None:
    if not root._lazy:
        return
    v = root._value
    if type(v) is torch.Tensor and not root.is_contiguous() and _non_overlapping(root.shape, root.stride()):
        # keep each example's own layout (new_empty_strided's strides): every example a
        # copy of the root's dense per-example storage, one example after the other
        span = 1 + sum((n - 1) * st for n, st in zip(root.shape, root.stride())) if root.numel() else 1
        C = torch.empty_strided(v.shape, (span,) + tuple(root.stride()), dtype=v.dtype, device=v.device)
        C.copy_(v)
    else:
        C = v.contiguous()
    B = C.shape[0]
    members = [root] + [r() for r in root._lazy_views]
    for w in members:
        if w is None or not w._lazy:
            continue
        # the plain root is contiguous, so each view's layout is valid inside every example
        w._value = C.as_strided((B,) + tuple(w.shape), (C.stride(0),) + tuple(w.stride()), w.storage_offset() - root.storage_offset() + C.storage_offset())
        w._lazy = False
    root._lazy_views = []


# -- tensor_split with tensor sections: a C++ composite that reads the tensor's data --------


def tensor_split_entry(original, args, kwargs):
    """``tensor_split(x, sections_tensor)`` reads the tensor's data in C++ (a wrapper has
    none: torch crashes). Read it in Python first, where a batched tensor raises the
    per-example signal (each example splits at its own indices: ragged outputs)."""
    args = list(args)
    key = next((k for k in ("tensor_indices_or_sections", "indices", "sections") if k in kwargs), None)
    sec = kwargs[key] if key is not None else (args[1] if len(args) > 1 else None)
    if not isinstance(sec, LevelTensor):
        return original(*args, **kwargs)
    value = sec.tolist()  # a batched tensor: data-dependent -> per-example re-run
    if key is not None:
        kwargs = dict(kwargs)
        del kwargs[key]
        kwargs["sections" if sec.dim() == 0 else "indices"] = value
    else:
        args[1] = value
    return original(*args, **kwargs)
