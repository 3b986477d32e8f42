"""vmap: the batching interpreter, BatchedTensor and the public ``vmap``."""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from typing import Any, Callable

import torch
import torch._decomp  # noqa: F401  imported before any transform is live: some of torch's
import torch._decomp.decompositions_for_jvp  # noqa: F401  lazy imports jit-script torch.zeros & co.

from . import _core
from . import random as _random
from ._core import Interpreter, LevelTensor, _mutated_returns, _return_aliases, push_interpreter
from ._pytree import broadcast_prefix, tree_flatten, tree_map, tree_unflatten
from .batching import BATCH_RULES, lookup as _lookup_rule

aten = torch.ops.aten

_RANDOMNESS = ("error", "different", "same")


class RandomnessError(RuntimeError):
    """A random operation ran under vmap with randomness='error'."""


class DataDependentError(RuntimeError):
    """Python control flow or .item() depended on the values of a batched tensor."""


class BatchedTensor(LevelTensor):
    """A tensor that is batched at one vmap level: ``_value`` holds the whole batch,
    with the batch in dimension ``_bdim``; the wrapper has the per-example shape."""

    _bdim: int
    _lazy = False  # a tensor created inside the function: see _lazy_wrap
    _lazy_views: "list[weakref.ref[BatchedTensor]]"
    _lazy_root: "BatchedTensor"

    @staticmethod
    def __new__(cls, value: torch.Tensor, bdim: int, interp: "VmapInterpreter"):
        if bdim == 0:
            shape = value.shape[1:]
            stride = value.stride()[1:]
        else:
            shape = value.shape
            shape = shape[:bdim] + shape[bdim + 1 :]
            stride = value.stride()
            stride = stride[:bdim] + stride[bdim + 1 :]
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            shape,
            strides=stride,
            # Forward AD compares a view's tangent layout with its primal's: the physical
            # offset is the per-example offset whenever the batch dim is outermost.
            storage_offset=value.storage_offset(),
            dtype=value.dtype,
            device=value.device,
        )
        r._value = value
        r._bdim = bdim
        r._interp = interp
        if value.dtype in _core._COMPLEX:  # keep lazy conj/neg bits visible on the wrapper
            if value.is_conj():
                torch._C._set_conj(r, True)
            if value.is_neg():
                torch._C._set_neg(r, True)
        return r

    def _describe(self) -> str:
        return f"BatchedTensor[vmap level {self._interp.level}, batch dim {self._bdim}]"

    def _tolist(self):
        if self._lazy or self._interp.batch_size == 1:  # one value for every example
            return self._value.select(self._bdim, 0).tolist()
        raise _data_dependent(self._interp, "tolist")

    def __getitem__(self, idx):
        # Python indexing turns a 0-dim integer tensor index into an int via .item(), which
        # would force a per-example loop; as a tensor index it stays batched. (Defined on
        # the wrapper class, never patched onto torch.Tensor: assigning a slot method there
        # changes the type for good.)
        if isinstance(idx, LevelTensor) and idx.dim() == 0 and not idx.is_floating_point() \
                and not idx.is_complex() and idx.dtype is not torch.bool:
            return torch.ops.aten.index.Tensor(self, [idx])
        return super().__getitem__(idx)

    def _escaped_repr(self) -> str:
        return (f"<BatchedTensor escaped from a finished vmap (level {self._interp.level}); using it raises "
                "EscapedTensorError: return it from the vmapped function instead>")

    def _detached(self):
        return BatchedTensor(_core.detach_all_levels(self._value), self._bdim, self._interp)


class _PerExampleSignal(DataDependentError):
    """Raised inside a vmap level when a result depends on per-example values (a Python
    branch on a batched tensor, .item(), per-example shapes). The vmap call of *that*
    level (``interp``) catches it and re-runs the function once per example; vmaps of
    other levels let it pass (trap 8)."""

    def __init__(self, interp, message: str) -> None:
        super().__init__(message)
        self.interp = interp


def _data_dependent(interp, what: str) -> DataDependentError:
    return _PerExampleSignal(interp, 
        f"vmap: {what} needs the value of a batched tensor (data-dependent Python control flow "
        "such as `if x > 0:`, `.item()` or `.tolist()`), but inside vmap a tensor stands for a "
        "whole batch. Use torch.where(cond, a, b) (or pyfunctorch.cond / while_loop) to keep "
        "it batched, or compute it outside vmap."
    )


_WARNED_FALLBACK: set = set()
#: ops served by the loop fallback so far (for coverage reports)
FALLBACK_COUNTS: dict = {}


_RANKED_FORMATS = (torch.channels_last, torch.channels_last_3d)
_RULE, _RANDOM, _DATA_DEPENDENT, _METADATA = "rule", "random", "data-dependent", "metadata"
_CUSTOM_VMAP = "custom-op vmap"  # a torch.library custom op with a register_vmap rule


class _OpInfo:
    """Per-op decisions of the vmap dispatcher, cached on the OpOverload itself
    (``func._pyf_vmap``: an attribute read is ~3x cheaper than hashing the op)."""

    __slots__ = ("kind", "rule", "aliased", "view", "out_variant")

    def __init__(self, kind, rule, aliased, func=None):
        self.kind, self.rule, self.aliased = kind, rule, aliased
        rets = func._schema.returns if func is not None else ()
        self.view = any(r.alias_info is not None and not r.alias_info.is_write for r in rets)
        self.out_variant = _functional_of_out(func) if func is not None and kind is _RULE else None


def _op_info(func) -> _OpInfo:
    aliased = _mutated_returns(func)
    if func in _core._METADATA_OPS:
        info = _OpInfo(_METADATA, None, None)
    elif func is aten._local_scalar_dense.default or func is aten.is_nonzero.default:
        info = _OpInfo(_DATA_DEPENDENT, None, None)
    elif func not in BATCH_RULES and _custom_op_vmap_fn(func) is not None:
        info = _OpInfo(_CUSTOM_VMAP, None, aliased)
    elif torch.Tag.nondeterministic_seeded in func.tags and func not in BATCH_RULES:
        # (an explicit rule handles its own randomness, e.g. attention with dropout_p=0)
        info = _OpInfo(_RANDOM, None, aliased, func)
    else:
        info = _OpInfo(_RULE, _lookup_rule(func), aliased, func)
    try:
        func._pyf_vmap = info
        _INFO_OPS.append(func)
    except AttributeError:  # not an OpOverload (e.g. a HigherOrderOperator)
        pass
    return info


_INFO_OPS: list = []


def _custom_op_vmap_fn(func):
    """The function a torch.library custom op registered with ``register_vmap`` (or None)."""
    if getattr(func, "namespace", "aten") in ("aten", "prims"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
    except Exception:  # pragma: no cover - torch without torch.library custom ops
        return None
    return getattr(opdef, "_vmap_fn", None) if opdef is not None else None


def _custom_op_vmap(interp, func, args, kwargs):
    """A custom op's own ``register_vmap`` rule, called as torch.func calls it (the protocol of
    an autograd.Function's vmap staticmethod: physical values, each batch dim where it is)."""
    from .custom_function import _unwrap_batched, run_vmap_rule

    if any(_batched_here(v, interp) for v in kwargs.values()):
        return loop_fallback(interp, func, args, kwargs)
    pairs = [_unwrap_batched(a, interp) for a in args]
    return run_vmap_rule(interp, _custom_op_vmap_fn(func), f"the register_vmap function of {func}", str(func),
                         [v for v, _ in pairs], tuple(d for _, d in pairs), args, kwargs, lists_as_tuples=True)


def _is_random(func) -> bool:
    return _op_info(func).kind is _RANDOM if not hasattr(func, "_pyf_vmap") else func._pyf_vmap.kind is _RANDOM


def _functional_of_out(func):
    """For an ``out=`` overload (``add.out``), the functional overload (``add.Tensor``)."""
    schema = func._schema
    outs = [a.name for a in schema.arguments if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write]
    if not outs or schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
        return None
    names = [a.name for a in schema.arguments if a.name not in outs]
    packet = func.overloadpacket
    for ov in packet.overloads():
        cand = getattr(packet, ov)
        cs = cand._schema
        if cs.is_mutable:
            continue
        if [a.name for a in cs.arguments] == names and len(cs.returns) == len(outs):
            return (cand, tuple(outs))
    return None


def invalidate_op_cache() -> None:
    """Forget cached per-op decisions (call after registering new rules at run time)."""
    for op in list(_INFO_OPS):
        op.__dict__.pop("_pyf_vmap", None)


class VmapInterpreter(Interpreter):
    kind = "vmap"

    def __init__(self, batch_size: int, randomness: str) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.randomness = randomness
        self.lazy_count = 0  # lazy tensors made at this level (skip the check when 0)
        self.rng_base: torch.Tensor | None = None  # randomness='different': the vmap call's seed (shared by chunks)
        self.rng_calls = 0
        self.example_offset = 0  # index of this level's first example in the whole batch
        # The outermost level sees only plain tensors: its rules can skip the key
        # guard unless autograd must record on them (see dispatch).
        self.bottom = not _core._state.stack

    def dispatch(self, func, args, kwargs):
        try:
            info = func._pyf_vmap
        except AttributeError:
            info = _op_info(func)
        if info.rule is not None and self.bottom and not kwargs:
            # Fast path: plain values, nothing to record -> no key guard needed.
            uargs, dims, needs_autograd = self._unwrap_args_checked(args)
            if not needs_autograd:
                out, out_dims = info.rule(func, uargs, kwargs, dims)
                if info.aliased is not None:
                    return _return_aliases(info.aliased, args, kwargs, out)
                return self._wrap(out, out_dims)
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), self.exclude):
            return self.process(func, args, kwargs, info)

    # -- lifting a lower-level tensor: an unbatched constant needs no wrapper ----
    def lift(self, tensor):
        return tensor

    def wrap_created(self, tensor):
        return _lazy_wrap(tensor, self)

    def process(self, func, args, kwargs, info=None):
        if info is None:
            info = _op_info(func)
        if kwargs and kwargs.get("memory_format") in _RANKED_FORMATS:
            # channels_last needs a rank-4 tensor: the physical value has one more dim, and the
            # memory format of an example is a layout detail that no value depends on
            kwargs = dict(kwargs, memory_format=torch.contiguous_format)
        if self.lazy_count and _has_lazy(args, kwargs, self):
            if info.kind is _RANDOM:  # a random op must not see one shared buffer
                for w in info.aliased or ():
                    target = args[w] if isinstance(w, int) else kwargs.get(w)
                    if isinstance(target, BatchedTensor) and target._lazy:
                        _materialize(target._lazy_root)
                return _random_op(self, func, args, kwargs)
            return self._process_lazy(func, args, kwargs, info)
        if info.out_variant is not None:
            return _out_variant(self, func, args, kwargs, info)
        kind = info.kind
        if kind is not _RULE:
            if kind is _METADATA:
                return _core._metadata_query(func, args)
            if kind is _DATA_DEPENDENT:
                if self.batch_size == 1:  # (the per-example re-run's level): one value
                    return func(*_slice_example(tuple(args), self, 0), **kwargs)
                raise _data_dependent(self, "`.item()`/bool()")
            if kind is _RANDOM:
                return _random_op(self, func, args, kwargs)
            if kind is _CUSTOM_VMAP:
                if info.aliased is not None:  # a mutating custom op: per example
                    return loop_fallback(self, func, args, kwargs)
                return _custom_op_vmap(self, func, args, kwargs)
        rule = info.rule
        if rule is None:
            decomp = _decomposition(func)
            if decomp is not None:
                try:
                    out = decomp(*args, **kwargs)
                except BatchedWriteError:
                    # the decomposition writes batched values into a scratch buffer it made
                    # unbatched (torch internals allocate plain tensors): run per example
                    out = NotImplemented
                if out is not NotImplemented:  # some decompositions decline some inputs
                    return out
            return loop_fallback(self, func, args, kwargs)
        for v in kwargs.values():
            if _batched_here(v, self):
                if not getattr(rule, "_pyf_batched_kwargs", False):
                    return loop_fallback(self, func, args, kwargs)
                return self._rule_with_batched_kwargs(func, rule, info, args, kwargs)
        uargs, dims = self._unwrap_args(args)
        if _core._state.jvp_depth:
            uargs, kwargs = _core.lift_mixed(uargs, kwargs)
        out, out_dims = rule(func, uargs, kwargs, dims)
        if info.aliased is not None:
            return _return_aliases(info.aliased, args, kwargs, out)
        return self._wrap(out, out_dims)

    # -- tensors created inside the function (lazy per-example buffers) -------------
    def _process_lazy(self, func, args, kwargs, info):
        """A lazy tensor (made by a factory inside vmap) is unbatched for reading; the
        first in-place write into it (or a view of it) gives every example its own copy."""
        if info.aliased is not None:
            # A write of values that are the same for every example (no argument batched
            # here) goes into the shared buffer, which stays lazy: forward AD copies an
            # unbatched primal into a tensor made inside jacfwd's vmap, and materializing it
            # would make that primal batched while its tangent buffer is not.
            if any(_batched_here(a, self) and not getattr(a, "_lazy", False)
                   for a in itertools.chain(args, kwargs.values())):
                for w in info.aliased:
                    target = args[w] if isinstance(w, int) else kwargs.get(w)
                    if isinstance(target, BatchedTensor) and target._lazy:
                        _materialize(target._lazy_root)
            if not _has_lazy(args, kwargs, self):
                return self.process(func, args, kwargs, info)
        roots = []

        def plain(x):
            if isinstance(x, BatchedTensor) and x._lazy and x._interp is self:
                roots.append(x._lazy_root)
                return x._value.select(0, 0)
            if isinstance(x, (list, tuple)):
                return type(x)(plain(y) for y in x)
            return x

        pargs = tuple(plain(a) for a in args)
        pkwargs = {k: plain(v) for k, v in kwargs.items()}
        if _core._state.jvp_depth:  # a lazy tensor may stand for a lower-level dual
            out = _core.call_op_at_vmap(func, pargs, pkwargs)
        else:
            out = func(*pargs, **pkwargs)
        if info.aliased is not None:
            return _return_aliases(info.aliased, args, kwargs, out)
        if not roots:
            return out

        def lazify(o):
            if isinstance(o, (list, tuple)):
                return type(o)(lazify(p) for p in o)
            if not isinstance(o, torch.Tensor) or _batched_here(o, self) or o.layout != torch.strided:
                return o
            if info.view:
                return _lazy_wrap(o, self, roots[0])
            # A fresh tensor computed from tensors made inside the function is itself made
            # inside (`y = torch.zeros(3) * 2; y.add_(x)`; dropout's empty_like(x).bernoulli_):
            # it stays lazy, so a later batched write gives each example its own copy.
            return _lazy_wrap(o.contiguous(), self)

        return lazify(out)

    def _unwrap_args_checked(self, args):
        """``_unwrap_args`` plus whether the fast path (no key guard) must not be taken: a
        tensor requires grad (autograd must run), or is complex or a negative view (the
        Conjugate/Negative fallbacks, off in __torch_dispatch__'s exclude set, must run for
        a rule's own arithmetic on conj/neg views)."""
        uargs = []
        dims = []
        needs = False
        for a in args:
            if type(a) is BatchedTensor and a._interp is self:
                v = a._value
                if a._bdim != 0:
                    v = v.movedim(a._bdim, 0)
                needs = needs or v.requires_grad or a._lazy or v.is_complex() or v.is_neg()
                uargs.append(v)
                dims.append(0)
            elif isinstance(a, torch.Tensor):
                needs = needs or a.requires_grad or isinstance(a, LevelTensor) or a.is_complex() or a.is_neg()
                uargs.append(a)
                dims.append(None)
            elif isinstance(a, (list, tuple)) and a and any(isinstance(b, torch.Tensor) for b in a):
                vs, ds, n = self._unwrap_args_checked(a)
                needs = needs or n
                uargs.append(vs)
                dims.append(ds if any(d is not None for d in ds) else None)
            else:
                uargs.append(a)
                dims.append(None)
        return uargs, dims, needs

    def _rule_with_batched_kwargs(self, func, rule, info, args, kwargs):
        uargs, dims = self._unwrap_args(args)
        keys = list(kwargs)
        ukw, kdims = self._unwrap_args([kwargs[k] for k in keys])
        ukwargs = dict(zip(keys, ukw))
        if _core._state.jvp_depth:
            uargs, ukwargs = _core.lift_mixed(uargs, ukwargs)
        out, out_dims = rule(func, uargs, ukwargs, dims, dict(zip(keys, kdims)))
        if info.aliased is not None:
            return _return_aliases(info.aliased, args, kwargs, out)
        return self._wrap(out, out_dims)

    def _unwrap_args(self, args):
        uargs = []
        dims = []
        for a in args:
            if isinstance(a, BatchedTensor) and a._interp is self:
                v = a._value
                if a._bdim != 0:
                    v = v.movedim(a._bdim, 0)
                uargs.append(v)
                dims.append(0)
            elif isinstance(a, (list, tuple)) and a and any(isinstance(b, BatchedTensor) for b in a):
                vs, ds = self._unwrap_args(a)
                uargs.append(vs)
                dims.append(ds if any(d is not None for d in ds) else None)
            else:
                uargs.append(a)
                dims.append(None)
        return uargs, dims

    def _wrap(self, out, out_dims):
        if type(out_dims) is int and type(out) is torch.Tensor:
            return BatchedTensor(out, out_dims, self)
        if isinstance(out, torch.Tensor):
            if out_dims is None:
                return out
            return BatchedTensor(out, out_dims, self)
        if isinstance(out, (tuple, list)):
            if out_dims is None or isinstance(out_dims, int):
                out_dims = [out_dims] * len(out)
            return type(out)(self._wrap(o, d) for o, d in zip(out, out_dims))
        return out

    def unwrap_value(self, x, d: int = 0) -> torch.Tensor:
        """Physical value of ``x`` at this level with the batch dim at ``d`` (expanded if unbatched)."""
        if isinstance(x, BatchedTensor) and x._interp is self:
            return x._value.movedim(x._bdim, d) if x._bdim != d else x._value
        return x.unsqueeze(d).expand(x.shape[:d] + (self.batch_size,) + x.shape[d:])


def _batched_here(x, interp) -> bool:
    if isinstance(x, BatchedTensor):
        return x._interp is interp
    if isinstance(x, (list, tuple)):
        return any(isinstance(y, BatchedTensor) and y._interp is interp for y in x)
    return False



# -- decompositions --------------------------------------------------------------

_DECOMP_CACHE: dict = {}


def _decomposition(func):
    try:
        return _DECOMP_CACHE[func]
    except KeyError:
        pass
    d = torch._decomp.decomposition_table.get(func)
    _DECOMP_CACHE[func] = d
    return d


# -- the loop fallback -------------------------------------------------------------


def _slice_example(x, interp, b):
    if isinstance(x, BatchedTensor) and x._interp is interp:
        return x._value.select(x._bdim, b)
    if isinstance(x, (list, tuple)):
        return type(x)(_slice_example(y, interp, b) for y in x)
    return x


def loop_fallback(interp: VmapInterpreter, func, args, kwargs):
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
    if aliased is not None:
        for w in aliased:
            target = args[w] if isinstance(w, int) else kwargs[w]
            if target is not None and not _batched_here(target, interp):
                raise _inplace_error(func)
    B = interp.batch_size
    outs = []
    for b in range(B):
        a_b = tuple(_slice_example(a, interp, b) for a in args)
        k_b = {k: _slice_example(v, interp, b) for k, v in kwargs.items()}
        outs.append(func(*a_b, **k_b))
    if aliased is not None:
        return _return_aliases(aliased, args, kwargs, None)
    return _stack_results(interp, func, outs)


def _stack_results(interp, func, outs):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise _PerExampleSignal(
                interp,
                f"vmap: {func} returned tensors of different shapes for different examples "
                f"({sorted(shapes)[:3]}...); a batched tensor needs one shape.",
            )
        return BatchedTensor(torch.stack(outs), 0, interp)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack_results(interp, func, list(col)) for col in zip(*outs))
    if all(o == first for o in outs):
        return first
    raise _PerExampleSignal(interp, f"vmap: {func} returned a different Python value for different examples.")


class BatchedWriteError(RuntimeError):
    """An in-place op would write batched values into a tensor that is not batched."""


def _inplace_error(func) -> RuntimeError:
    return BatchedWriteError(
        f"vmap: {func} writes batched values into a tensor that is not batched (it came from "
        "outside the vmapped function, or was created unbatched). Each example would overwrite "
        "the same memory, so the result cannot be per-example. Use the out-of-place form "
        "(e.g. `x = x + y` instead of `x.add_(y)`), or pass the tensor as a batched input "
        "(in_dims) so each example owns its slice."
    )


class PerformanceWarning(UserWarning):
    """A slow path was taken (e.g. the per-example loop fallback)."""


# -- out= ops and lazy per-example buffers ---------------------------------------------


def _out_variant(interp, func, args, kwargs, info):
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


def _has_lazy(args, kwargs, interp) -> bool:
    for a in itertools.chain(args, kwargs.values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, BatchedTensor) and b._lazy and b._interp is interp:
                return True
    return False


def _lazy_wrap(plain: torch.Tensor, interp: "VmapInterpreter", root=None) -> BatchedTensor:
    """A BatchedTensor whose examples all alias ``plain`` (expanded, no copy). Reads treat
    it as unbatched; the first write gives each example its own memory (_materialize)."""
    w = BatchedTensor(plain.unsqueeze(0).expand((interp.batch_size,) + plain.shape), 0, interp)
    w._lazy = True
    if root is None:
        root = w
        w._lazy_views = []
        interp.lazy_count += 1
    else:
        root._lazy_views.append(weakref.ref(w))
    w._lazy_root = root
    return w


def _materialize(root: BatchedTensor) -> None:
    if not root._lazy:
        return
    C = root._value.contiguous()
    B = C.shape[0]
    members = [root] + [r() for r in root._lazy_views]
    for w in members:
        if w is None or not w._lazy:
            continue
        # the plain root is contiguous, so each view's layout is valid inside every example
        w._value = C.as_strided((B,) + tuple(w.shape), (C.stride(0),) + tuple(w.stride()), w.storage_offset() - root.storage_offset() + C.storage_offset())
        w._lazy = False
    root._lazy_views = []


# -- randomness ---------------------------------------------------------------------


def _random_op(interp: VmapInterpreter, func, args, kwargs):
    mode = interp.randomness
    if mode == "error":
        raise _randomness_error(func)
    aliased = _mutated_returns(func)
    uargs, dims = interp._unwrap_args(args)
    any_batched = any(d is not None for d in dims)
    if mode == "same":
        if aliased is not None:
            # in-place fill of a batched tensor: draw one example, write it to all
            self_ = args[0]
            if any(d is not None for d in dims[1:]):
                raise RandomnessError(
                    f"vmap: randomness='same' cannot be honoured for {func} with batched parameters "
                    "(each example has its own distribution). Use randomness='different'."
                )
            one = torch.empty(self_.shape, dtype=self_.dtype, device=self_.device)
            func(one, *args[1:], **kwargs)
            self_.copy_(one)
            return self_
        if func.overloadpacket.__name__.endswith("_like") and dims[0] is not None and \
                not any(d is not None for d in dims[1:]):
            # rand_like(x): x only gives the shape, so one draw serves every example
            return func(uargs[0][0], *uargs[1:], **kwargs)
        if any_batched:
            raise RandomnessError(
                f"vmap: randomness='same' cannot be honoured for {func} with batched tensor inputs "
                "(each example has its own distribution). Use randomness='different'."
            )
        return func(*args, **kwargs)
    # 'different': every example draws from its own stream (see _example_keys)
    if aliased is not None and dims and dims[0] is None:
        raise RandomnessError(
            f"vmap: randomness='different' needs {func} to write different values for each example "
            "into a tensor that is not batched. Create the tensor inside the function from a batched one."
        )
    has_generator = any(a.name == "generator" for a in func._schema.arguments)
    if not has_generator:
        decomp = _decomposition(func)
        if decomp is not None:  # e.g. native_dropout -> bernoulli_, which takes a generator
            return decomp(*args, **kwargs)
        B = interp.batch_size
        out = func(*[_materialize_arg(a, d, B) for a, d in zip(uargs, dims)], **kwargs)
        return _return_aliases(aliased, args, kwargs, out) if aliased is not None else interp._wrap(out, 0)
    keys = _example_keys(interp)
    outs = []
    for b in range(interp.batch_size):
        a_b = tuple(_slice_example(a, interp, b) for a in args)
        outs.append(func(*a_b, **dict(kwargs, generator=_random.generator_for(keys[b], _device_of(args)))))
    if aliased is not None:
        return _return_aliases(aliased, args, kwargs, None)
    return _stack_results(interp, func, outs)


def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _example_keys(interp: "VmapInterpreter") -> list:
    """Per-example keys for the next random op at this level: they depend on the vmap
    call's seed, the op's position among the level's random ops, and the example's index
    in the *whole* batch -- so chunk_size never changes the draws."""
    if interp.rng_base is None:
        interp.rng_base = _draw_seed()
    call_key = _random.fold_in(interp.rng_base, interp.rng_calls)
    interp.rng_calls += 1
    idx = torch.arange(interp.batch_size, dtype=torch.int64) + interp.example_offset
    return list(_random._mix(call_key ^ _random._mix(idx + 0x2545F4914F6CDD1D)).unbind(0))


def _draw_seed() -> torch.Tensor:
    # one draw from torch's global generator: torch.manual_seed still makes runs repeat
    return _random.key(int(torch.ops.aten.randint.low(0, 2**62, (), dtype=torch.int64)))


def _materialize_arg(a, d, B):
    if isinstance(a, torch.Tensor) and d is None and a.dim() >= 0:
        return a.unsqueeze(0).expand((B,) + a.shape).contiguous()
    return a


def _randomness_error(func) -> RandomnessError:
    return RandomnessError(
        f"vmap: called the random operation {getattr(func, '__name__', func)} under "
        "vmap(..., randomness='error') (the default). Choose how randomness should behave across "
        "the batch: randomness='different' (each example draws its own values) or "
        "randomness='same' (every example sees the same draw)."
    )


_DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


def _vmap_levels():
    return [i for i in _core._state.stack if i.kind == "vmap"]


def _random_entry_point(original, args, kwargs):
    """A random torch call whose tensor arguments are all plain (or absent): it never
    reaches a BatchedTensor, so vmap's randomness flag is applied here (trap 7)."""
    name = getattr(original, "__name__", "")
    if name in _DROPOUTS and original.__module__ == "torch.nn.functional":
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        if not training or p == 0:
            return original(*args, **kwargs)
    leaves, _ = tree_flatten((args, kwargs))
    if any(isinstance(x, LevelTensor) for x in leaves):
        return original(*args, **kwargs)  # reaches __torch_dispatch__, where the level decides
    levels = _vmap_levels()
    if not levels:
        return original(*args, **kwargs)
    inplace = name.endswith("_")
    for lv in levels:
        if lv.randomness == "error":
            raise _randomness_error(original)
        if lv.randomness == "different":
            if inplace:
                raise RandomnessError(
                    f"vmap: randomness='different' needs {name} to write different values for each "
                    "example into a tensor that is not batched. Create the tensor from a batched input "
                    "(e.g. torch.empty_like(x)) instead."
                )
    different = [lv for lv in levels if lv.randomness == "different"]
    if not different:
        return original(*args, **kwargs)
    first_tensor = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
    if first_tensor is not None:
        # a random op on a plain tensor (rand_like(w), F.dropout(w)): make the tensor batched
        # at the innermost 'different' level, so the op reaches vmap's dispatch
        lv = different[-1]
        lifted = BatchedTensor(first_tensor.unsqueeze(0).expand((lv.batch_size,) + first_tensor.shape), 0, lv)
        new_args, new_kwargs = tree_map(lambda x: lifted if x is first_tensor else x, (args, kwargs))
        return original(*new_args, **new_kwargs)
    # a factory: one draw per example (of every 'different' level), each from its own stream
    keys = [None]
    for lv in different:  # outermost first
        lv_keys = _example_keys(lv)
        keys = [k if prev is None else _random.fold_in(prev, k) for prev in keys for k in lv_keys]
    draws = torch.stack([original(*args, **dict(kwargs, generator=_random.generator_for(k))) for k in keys])
    out = draws.reshape(tuple(lv.batch_size for lv in different) + draws.shape[1:])
    for lv in different:  # outermost first: each level peels one leading dim
        out = BatchedTensor(out, 0, lv)
    return out


for _fn_name in ("randn", "rand", "randint", "randperm", "normal", "randn_like", "rand_like", "randint_like",
              "bernoulli", "multinomial", "poisson", "dropout", "alpha_dropout", "feature_alpha_dropout",
              "feature_dropout"):
    _core.patch_while_active(torch, _fn_name, _random_entry_point)
for _fn_name in _DROPOUTS:
    _core.patch_while_active(torch.nn.functional, _fn_name, _random_entry_point)
for _fn_name in ("normal_", "uniform_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_",
              "bernoulli_", "bernoulli", "multinomial"):
    _core.patch_while_active(torch.Tensor, _fn_name, _random_entry_point)



# -- tensor_split with tensor sections: a C++ composite that reads the tensor's data --------


def _tensor_split_entry(original, args, kwargs):
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


_core.patch_while_active(torch, "tensor_split", _tensor_split_entry)
_core.patch_while_active(torch.Tensor, "tensor_split", _tensor_split_entry)

# -- the public transform ---------------------------------------------------------------


def vmap(
    func: Callable,
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: int | None = None,
    strict: bool = False,
) -> Callable:
    """Vectorize ``func`` over a batch dimension of its inputs.

    ``vmap(f)(x)`` equals ``torch.stack([f(x_i) for x_i in x.unbind(0)])`` for pure
    ``f``, computed with batched operations. ``in_dims`` says which dim of each input
    (a pytree prefix of the positional args; ``None`` = not batched) is the batch;
    ``out_dims`` where the batch dim goes in each output. ``randomness`` is
    ``'error'``, ``'different'`` or ``'same'``. ``chunk_size`` runs the batch in
    chunks of that size (less memory). Keyword arguments are passed unbatched.

    Examples:
        >>> import torch
        >>> from pyfunctorch import vmap
        >>> x = torch.randn(5, 3)
        >>> vmap(torch.dot)(x, x).shape
        torch.Size([5])
        >>> torch.allclose(vmap(torch.dot)(x, x), (x * x).sum(1))
        True
    """
    if randomness not in _RANDOMNESS:
        raise ValueError(
            f"vmap: randomness must be one of {_RANDOMNESS}; got {randomness!r}. 'error' raises on "
            "random ops, 'different' draws independently per example, 'same' shares one draw."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"vmap: chunk_size must be None or a positive int; got {chunk_size!r}.")
    _check_dims_type(in_dims, "in_dims")
    _check_dims_type(out_dims, "out_dims")

    @functools.wraps(func)
    def vmapped(*args, **kwargs):
        flat_args, args_spec = tree_flatten(args)
        flat_in = _leaf_in_dims(in_dims, args, flat_args, func)
        B = _batch_size(flat_args, flat_in, func)
        # randomness='different': one seed per vmap call, shared by all chunks
        rng = _draw_seed() if randomness == "different" else None
        if chunk_size is not None and chunk_size < B:
            return _chunked(func, flat_args, args_spec, flat_in, out_dims, randomness, chunk_size, B, kwargs, strict, rng)
        return _vmap_impl(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, strict, rng,
                          orig_args=args)

    return vmapped


def _check_dims_type(dims, what):
    if dims is None or (isinstance(dims, int) and not isinstance(dims, bool)):
        return
    if isinstance(dims, (tuple, list, dict)):
        for d in dims.values() if isinstance(dims, dict) else dims:
            _check_dims_type(d, what)
        return
    raise ValueError(
        f"vmap: {what} must be an int, None, or a (nested) tuple/list/dict of those; got {dims!r} "
        f"of type {type(dims).__name__}."
    )


def _leaf_in_dims(in_dims, args, flat_args, func):
    if isinstance(in_dims, int) or in_dims is None:
        flat_in = [in_dims] * len(flat_args)
    else:
        if not isinstance(in_dims, tuple):
            raise ValueError(
                f"vmap({_name(func)}): in_dims must be an int, None or a tuple with one entry per "
                f"positional argument; got a {type(in_dims).__name__}. Wrap it in a tuple: in_dims=({in_dims!r},)."
            )
        if len(in_dims) != len(args):
            raise ValueError(
                f"vmap({_name(func)}): in_dims has {len(in_dims)} entries but the function was called "
                f"with {len(args)} positional arguments; give one in_dims entry per argument."
            )
        flat_in = broadcast_prefix(in_dims, args, f"vmap({_name(func)}): in_dims")
    for x, d in zip(flat_args, flat_in):
        if d is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"vmap({_name(func)}): in_dims says to batch a {type(x).__name__} input over dim {d}, "
                "but only tensors can be batched; use None for non-tensor inputs."
            )
        r = x.dim()
        if not -r <= d < r:
            raise ValueError(
                f"vmap({_name(func)}): in_dim {d} is out of range for an input of shape "
                f"{tuple(x.shape)} (it has {r} dims, so valid dims are {-r}..{r - 1})."
            )
    return [None if d is None else d % x.dim() for x, d in zip(flat_args, flat_in)]


def _batch_size(flat_args, flat_in, func) -> int:
    sizes = {x.shape[d] for x, d in zip(flat_args, flat_in) if d is not None}
    if not sizes:
        raise ValueError(
            f"vmap({_name(func)}): no input is batched (every in_dim is None or there are no tensor "
            "inputs). Batch at least one tensor input."
        )
    if len(sizes) > 1:
        detail = ", ".join(
            f"input {i} has size {x.shape[d]} in dim {d}" for i, (x, d) in enumerate(zip(flat_args, flat_in)) if d is not None
        )
        raise ValueError(
            f"vmap({_name(func)}): the batched inputs have different batch sizes ({detail}); they must all "
            "have the same size in their batch dims."
        )
    return sizes.pop()


def _new_level(B, randomness, rng, offset=0) -> "VmapInterpreter":
    interp = VmapInterpreter(B, randomness)
    interp.rng_base = rng
    interp.example_offset = offset
    return interp


def _rebuild_args(leaves, args_spec, flat_in, orig_args):
    """The positional args for the call: an argument with no batched leaf is passed as the
    caller's own object (a list the function mutates is the caller's list, not a copy)."""
    args = list(tree_unflatten(leaves, args_spec))
    if orig_args is not None and None in flat_in:
        i = 0
        for n, (a, spec) in enumerate(zip(orig_args, args_spec.children())):
            k = spec.num_leaves
            if k and all(d is None for d in flat_in[i : i + k]):
                args[n] = a
            i += k
    return args


def _vmap_impl(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, strict=False, rng=None, offset=0,
               orig_args=None):
    versions = [x._version if isinstance(x, torch.Tensor) else None for x in flat_args]
    interp = _new_level(B, randomness, rng, offset)
    try:
        with push_interpreter(interp):
            batched = [x if d is None else BatchedTensor(x, d, interp) for x, d in zip(flat_args, flat_in)]
            out = func(*_rebuild_args(batched, args_spec, flat_in, orig_args), **kwargs)
            flat_out, out_spec = tree_flatten(out)
            flat_out = [_core._resolve_dead(o) for o in flat_out]
            flat_od = _leaf_out_dims(out_dims, out, flat_out, func)
            res = [_unwrap_out(interp, o, d, func) for o, d in zip(flat_out, flat_od)]
        return tree_unflatten(res, out_spec)
    except _PerExampleSignal as signal:
        if signal.interp is not interp:
            raise  # another vmap level's business
        if strict:
            raise DataDependentError(str(signal) + " (strict=True: not falling back to a per-example loop)") from None
        mutated = [i for i, (x, v) in enumerate(zip(flat_args, versions)) if v is not None and x._version != v]
        if mutated:
            raise DataDependentError(
                str(signal) + " vmap would re-run the function once per example, but the batched attempt "
                "already modified its inputs in place, so a re-run would see changed data. Move the "
                "in-place update after the data-dependent part, or make it out-of-place."
            ) from None
        _warn_per_example(signal)
        return _per_example(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, interp.rng_base, offset)


_WARNED_SITES: set = set()
_PKG_DIR = __file__.rsplit("/", 1)[0]


def _user_site(tb):
    """The innermost traceback frame outside pyfunctorch and torch: the user's line."""
    site = None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if not fname.startswith(_PKG_DIR) and "/torch/" not in fname:
            site = (fname, tb.tb_lineno)
        tb = tb.tb_next
    return site


def _warn_per_example(signal) -> None:
    site = _user_site(signal.__traceback__)
    if site in _WARNED_SITES:
        return
    _WARNED_SITES.add(site)
    where = f"{site[0]}:{site[1]}" if site else "an unknown line"
    warnings.warn(
        f"{signal} Falling back to running the function once per example (slow but exact). "
        f"The data-dependent step is at {where}. Pass strict=True to vmap to make this an error.",
        PerformanceWarning,
        stacklevel=4,
    )


def _per_example(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, rng=None, offset=0):
    """vmap's definition: call ``func`` on each example and stack the results."""
    same_rng = randomness == "same"
    if same_rng:
        rng = torch.get_rng_state()
    outs = []
    for b in range(B):
        if same_rng:
            torch.set_rng_state(rng)  # every example sees the same draws
        example = [x if d is None else x.select(d, b) for x, d in zip(flat_args, flat_in)]
        # A size-1 vmap level keeps the randomness flag in force for random factories.
        with push_interpreter(_new_level(1, randomness, rng, offset + b)) as one:
            out = func(*tree_unflatten(example, args_spec), **kwargs)
            # tensors the function created belong to the size-1 level: take their one example
            out = tree_map(lambda t: one.unwrap_value(t).select(0, 0) if isinstance(t, BatchedTensor) and t._interp is one
                           else t, out)
            outs.append(out)
    flat0, spec = tree_flatten(outs[0])
    cols = []
    for o in outs:
        flat, sp = tree_flatten(o)
        if sp != spec:
            raise DataDependentError(
                f"vmap({_name(func)}): the function returned differently structured outputs for different "
                f"examples ({spec} vs {sp}); vmap needs one output structure."
            )
        cols.append(flat)
    flat_od = _leaf_out_dims(out_dims, outs[0], flat0, func)
    res = [_combine_examples([c[i] for c in cols], d, func) for i, d in enumerate(flat_od)]
    return tree_unflatten(res, spec)


def _combine_examples(vals, d, func):
    if d is None:
        first = vals[0]
        same = all(torch.equal(v, first) if isinstance(v, torch.Tensor) else v == first for v in vals)
        if not same:
            raise ValueError(
                f"vmap({_name(func)}): out_dims is None for an output that differs between examples; "
                "give it an int out_dim."
            )
        return first
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    if len(tensors) != len(vals):  # e.g. the seed's relu: `return x` or `return 0`
        if not all(isinstance(v, (torch.Tensor, bool, int, float, complex)) for v in vals):
            raise ValueError(
                f"vmap({_name(func)}): the function returned a non-tensor output where out_dims is {d}; "
                "only tensors and numbers can be stacked."
            )
        ref = tensors[0] if tensors else None
        vals = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=None if ref is None else ref.dtype,
                                                                          device=None if ref is None else ref.device)
                for v in vals]
    shapes = {tuple(v.shape) for v in vals}
    if len(shapes) == 1:
        r = vals[0].dim() + 1
        if not -r <= d < r:
            raise ValueError(f"vmap({_name(func)}): out_dim {d} is out of range for outputs with {r - 1} dims.")
        return torch.stack(vals, dim=d)
    if d != 0:
        raise DataDependentError(
            f"vmap({_name(func)}): the examples' outputs have different shapes ({sorted(shapes)[:3]}...), so "
            "the result is ragged; a ragged result can only be batched along out_dim 0."
        )
    return _ragged(vals)


def _ragged(vals):
    """A torch.nested tensor whose i-th component is the i-th example's output."""
    if any(v.is_nested for v in vals):
        raise DataDependentError(
            "vmap: the examples' outputs are themselves ragged (nested) tensors of different shapes: a vmap "
            "over a vmap whose results are ragged would need a tensor ragged in two dims, which torch.nested "
            "does not have. Batch the inner call over the outer examples with a for-loop instead."
        )
    ranks = {v.dim() for v in vals}
    if len(ranks) != 1:
        raise DataDependentError("vmap: the examples' outputs have different numbers of dims; cannot batch them.")
    if vals[0].dim() >= 1 and len({tuple(v.shape[1:]) for v in vals}) == 1:
        return torch.nested.nested_tensor(vals, layout=torch.jagged)
    return torch.nested.nested_tensor(vals)


def _leaf_out_dims(out_dims, out, flat_out, func):
    if isinstance(out_dims, int) or out_dims is None:
        return [out_dims] * len(flat_out)
    if isinstance(out_dims, tuple) and not isinstance(out, tuple):
        if len(out_dims) == 1:
            return broadcast_prefix(out_dims[0], out, f"vmap({_name(func)}): out_dims")
    return broadcast_prefix(out_dims, out, f"vmap({_name(func)}): out_dims")


def _unwrap_out(interp, o, d, func):
    if not isinstance(o, torch.Tensor):
        if d is None:
            return o
        if isinstance(o, (bool, int, float, complex)):
            # one Python number for every example: the loop's stack of it (as the per-example
            # path stacks numbers that differ between examples)
            return interp.unwrap_value(torch.as_tensor(o), 0).contiguous()
        raise ValueError(
            f"vmap({_name(func)}): the function returned a {type(o).__name__} where out_dims is {d}; "
            "only tensors can carry a batch dim. Return tensors, or set that out_dim to None."
        )
    if d is None:
        if isinstance(o, BatchedTensor) and o._interp is interp and o._lazy:
            return o._value.select(0, 0)  # created inside and never written per example
        if isinstance(o, BatchedTensor) and o._interp is interp:
            raise ValueError(
                f"vmap({_name(func)}): out_dims is None for an output that depends on the batched "
                "inputs; it has a batch dim, so give it an int out_dim."
            )
        return o
    r = o.dim() + 1
    if not -r <= d < r:
        raise ValueError(
            f"vmap({_name(func)}): out_dim {d} is out of range for an output with {o.dim()} dims "
            f"(plus the batch dim: valid dims are {-r}..{r - 1})."
        )
    return interp.unwrap_value(o, d % r)


def _chunked(func, flat_args, args_spec, flat_in, out_dims, randomness, chunk_size, B, kwargs, strict=False, rng=None):
    starts = list(range(0, B, chunk_size))
    pieces = []
    for s in starts:
        n = min(chunk_size, B - s)
        chunk = [x if d is None else x.narrow(d, s, n) for x, d in zip(flat_args, flat_in)]
        pieces.append(_vmap_impl(func, chunk, args_spec, flat_in, out_dims, randomness, n, kwargs, strict, rng, s))
    flat0, spec = tree_flatten(pieces[0])
    flat_od = _leaf_out_dims(out_dims, pieces[0], flat0, func)
    cols = [tree_flatten(p)[0] for p in pieces]
    res = []
    for i, d in enumerate(flat_od):
        if d is None:
            res.append(flat0[i])
        else:
            res.append(torch.cat([c[i] for c in cols], dim=d))
    return tree_unflatten(res, spec)


def _name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)
