"""The vmap interpreter: how one aten op on BatchedTensors is dispatched (per-op decisions cached on the op, the rule's fast path, lazy buffers, and the way to the fallbacks)."""

from __future__ import annotations

import itertools

import torch

from .. import _core
from .._core import Interpreter, LevelTensor
from .._ops import _InplaceViewAliases, _mutated_returns, _return_aliases
from ..batching import BATCH_RULES, lookup as _lookup_rule
from ..batching.physical_ad import physically_differentiable
from .user_rules import custom_op_vmap, custom_op_vmap_fn
from ..errors import BatchedWriteError, PerExampleSignal, data_dependent
from .fallbacks import decomposition, has_lazy, lazy_wrap, loop_fallback, materialize_lazy, out_variant
from .randomness import draw_predicate, random_op
from .tensor import BatchedTensor, batched_here, slice_example

_new_batched = BatchedTensor.__new__

aten = torch.ops.aten


_RANKED_FORMATS = (torch.channels_last, torch.channels_last_3d)
_RULE, _RANDOM, _DATA_DEPENDENT, _METADATA = "rule", "random", "data-dependent", "metadata"
_CUSTOM_VMAP = "custom-op vmap"  # a torch.library custom op with a register_vmap rule
_SEEDED = "random-tagged"  # random only when the call draws (dropout_p > 0, train=True): see resolve


class _OpInfo:
    """Per-op decisions of the vmap dispatcher, cached on the OpOverload itself
    (``func._pyf_vmap``: an attribute read is ~3x cheaper than hashing the op)."""

    __slots__ = ("kind", "rule", "aliased", "view", "out_variant", "inplace_view", "draws", "if_not", "if_draws",
                 "if_draws_different")

    def __init__(self, kind, rule, aliased, func=None):
        self.kind, self.rule, self.aliased = kind, rule, aliased
        self.inplace_view = type(aliased) is _InplaceViewAliases
        rets = func._schema.returns if func is not None else ()
        self.view = any(r.alias_info is not None and not r.alias_info.is_write for r in rets)
        self.out_variant = _functional_of_out(func) if func is not None and kind is _RULE else None

    def resolve(self, interp, args, kwargs) -> "_OpInfo":
        """A random-tagged op (kind ``_SEEDED``) is decided per call: a call that draws nothing
        (dropout probability 0, train=False) is an ordinary op (its rule, decomposition or
        the loop); one that draws follows the level's ``randomness`` like any random op, except
        that with randomness='different' an explicit rule runs (its folded call draws
        independently for every example)."""
        if not self.draws(args, kwargs):
            return self.if_not
        return self.if_draws_different if interp.randomness == "different" else self.if_draws


def _op_info(func) -> _OpInfo:
    aliased = _mutated_returns(func)
    if func in _core._METADATA_OPS:
        info = _OpInfo(_METADATA, None, None)
    elif func is aten._local_scalar_dense.default or func is aten.is_nonzero.default:
        info = _OpInfo(_DATA_DEPENDENT, None, None)
    elif func not in BATCH_RULES and custom_op_vmap_fn(func) is not None:
        info = _OpInfo(_CUSTOM_VMAP, None, aliased)
    elif torch.Tag.nondeterministic_seeded in func.tags and (draws := draw_predicate(func)) is not None:
        info = _OpInfo(_SEEDED, None, aliased)
        info.draws = draws
        info.if_not = _OpInfo(_RULE, _lookup_rule(func), aliased, func)
        info.if_draws = _OpInfo(_RANDOM, None, aliased, func)
        info.if_draws_different = info.if_not if func in BATCH_RULES else info.if_draws
    elif torch.Tag.nondeterministic_seeded in func.tags and func not in BATCH_RULES:
        # (an explicit rule handles its own randomness)
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


def _restride_like(out, one, interp):
    """``out`` (results of a view on an empty batch) with each physical value restrided as the
    same result ``one`` of a batch of one example has it (see ``VmapInterpreter._dispatch_empty_batch``)."""
    if isinstance(out, BatchedTensor) and out._interp is interp:
        if not (isinstance(one, BatchedTensor) and one._bdim == out._bdim and one._value.dim() == out._value.dim()):
            return out
        v, stride = out._value, one._value.stride()
        if v.stride() == stride:
            return out
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), interp.exclude):
            return BatchedTensor(v.as_strided(v.shape, stride, v.storage_offset()), out._bdim, interp)
    if isinstance(out, (list, tuple)) and isinstance(one, (list, tuple)) and len(out) == len(one):
        return type(out)(_restride_like(o, m, interp) for o, m in zip(out, one))
    return out


class _GiveUp(Exception):
    pass


class VmapInterpreter(Interpreter):
    kind = "vmap"
    tensor_type = BatchedTensor  # (this level's wrapper class)
    grad_shadow = None  # the per-sample gradient recording a graph on this level's physical values (reverse._Shadow)

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
        if not batch_size:
            self.dispatch = self._dispatch_empty_batch  # type: ignore[method-assign]

    def dispatch(self, func, args, kwargs):
        if self.grad_shadow is not None and not physically_differentiable(func):
            self._leave_physical_ad(args, kwargs)
        try:
            info = func._pyf_vmap
        except AttributeError:
            info = _op_info(func)
        try:
            if info.inplace_view:
                return self._inplace_view(func, args, kwargs, info)
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
        except PerExampleSignal as signal:
            # a rule (or an op below it) found per-example results: the level whose dispatch
            # is nearest the raise owns it (rules raise level-free signals)
            if signal.interp is None:
                signal.interp = self
            raise
        except Exception:
            if self.batch_size == 0:  # rules reshape(B, -1), loops stack nothing ...
                out = self._empty_batch(func, args, kwargs, info)
                if out is not NotImplemented:
                    return out
            raise

    def _dispatch_empty_batch(self, func, args, kwargs):
        """``dispatch`` at a level with an empty batch (B = 0; the instance's ``dispatch``). A view
        op: torch lays out a view of a tensor with no element afresh (contiguous strides), not as
        the view of a non-empty one, so the per-example layout read off the result would differ
        from what the op gives one example -- and from a tangent that torch's forward AD takes on
        these wrappers by the same view of an unbatched tangent ("the tangent [must] have the same
        layout as primal", fuzzer seed 22145; torch.func has the layout right there). The result's
        physical values are restrided (nothing to move) to the layout the rule gives a batch of
        one example, found on meta values."""
        out = VmapInterpreter.dispatch(self, func, args, kwargs)
        info = getattr(func, "_pyf_vmap", None)
        if info is None or not info.view or info.inplace_view or info.aliased is not None:
            return out
        try:
            one = self._on_one_meta_example(func, args, kwargs, info, layout=True)
        except Exception:  # (a rule that cannot run on meta values: the layout torch gave stands)
            return out
        return _restride_like(out, one, self)

    def _on_one_meta_example(self, func, args, kwargs, info, layout: bool = False, devices: list | None = None):
        """``process`` of the op on meta values holding one example of this level's tensors (the
        batch dim of size 1). ``layout``: with the physical values' strides (a lower level's
        wrapper accepted: only its layout is read), else contiguous (plain values only).
        ``devices`` collects the physical values' devices. Raises _GiveUp for a tensor of
        another level."""
        def meta(x):
            if isinstance(x, BatchedTensor) and x._interp is self:
                v = x._value
                if type(v) is not torch.Tensor and not (layout and isinstance(v, LevelTensor)):
                    raise _GiveUp
                if devices is not None:
                    devices.append(v.device)
                shape = list(v.shape)
                shape[x._bdim] = 1
                m = torch.empty_strided(shape, v.stride(), dtype=v.dtype, device="meta") if layout else \
                    torch.empty(shape, dtype=v.dtype, device="meta")
                return BatchedTensor(m, x._bdim, self)
            if isinstance(x, LevelTensor):
                raise _GiveUp
            if isinstance(x, torch.Tensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            if isinstance(x, (list, tuple)):
                return type(x)(meta(y) for y in x)
            return x

        margs = meta(tuple(args))
        mkwargs = {k: meta(v) for k, v in kwargs.items()}
        self.batch_size = 1
        try:
            with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), self.exclude):
                return self.process(func, margs, mkwargs, info)
        finally:
            self.batch_size = 0

    def _empty_batch(self, func, args, kwargs, info):
        """An op on an empty batch (B = 0) that its rule or fallback could not run: run it on
        meta tensors holding one example, and return empty results of that shape per example
        (as torch.func does). NotImplemented where that cannot be done (then the op's own
        error stands): a tensor of another level among the arguments, an unbatched output."""
        device: list = []

        def real(o):
            if isinstance(o, BatchedTensor) and o._interp is self:
                shape = list(o._value.shape)
                shape[o._bdim] = 0
                return BatchedTensor(torch.empty(shape, dtype=o.dtype, device=device[0]), o._bdim, self)
            if isinstance(o, torch.Tensor):
                raise _GiveUp  # an unbatched result computed from meta values
            if isinstance(o, (list, tuple)):
                return type(o)(real(p) for p in o)
            return o

        try:
            out = self._on_one_meta_example(func, args, kwargs, info, devices=device)
            if info.aliased is not None:  # nothing to write in an empty batch
                return args[info.aliased[0]] if len(info.aliased) == 1 and isinstance(info.aliased[0], int) \
                    else _return_aliases(info.aliased, args, kwargs, None)
            return real(out)
        except Exception:
            return NotImplemented

    def _inplace_view(self, func, args, kwargs, info):
        """``squeeze_``, ``transpose_``, ``as_strided_`` ... on a batched tensor (trap 4): the
        rule changes the metadata of a fresh view of the physical value (batch dim in front),
        which becomes the wrapper's value; the caller's tensor (an input's physical value)
        keeps its own metadata, as each example's view does in the loop. The wrapper's
        per-example metadata is then fixed by replaying the op on it (``_return_aliases``)."""
        target = args[0]
        if isinstance(target, BatchedTensor) and target._interp is self:
            with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), self.exclude):
                v = target._value
                target._value = v.movedim(target._bdim, 0) if target._bdim else v.view(v.shape)
                target._bdim = 0
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), self.exclude):
            return self.process(func, args, kwargs, info)

    # -- lifting a lower-level tensor: an unbatched constant needs no wrapper ----
    def lift(self, tensor):
        return tensor

    def wrap_created(self, tensor):
        return lazy_wrap(tensor, self)

    def process(self, func, args, kwargs, info=None):
        if info is None:
            info = _op_info(func)
        if info.kind is _SEEDED:
            info = info.resolve(self, args, kwargs)
        if kwargs and kwargs.get("memory_format") in _RANKED_FORMATS:
            # channels_last needs a rank-4 tensor: the physical value has one more dim, and the
            # memory format of an example is a layout detail that no value depends on
            kwargs = dict(kwargs, memory_format=torch.contiguous_format)
        if self.lazy_count and has_lazy(args, kwargs, self):
            if info.kind is _RANDOM:  # a random op must not see one shared buffer
                for w in info.aliased or ():
                    target = args[w] if isinstance(w, int) else kwargs.get(w)
                    if isinstance(target, BatchedTensor) and target._lazy:
                        materialize_lazy(target._lazy_root)
                return random_op(self, func, args, kwargs)
            return self._process_lazy(func, args, kwargs, info)
        if info.out_variant is not None:
            return out_variant(self, func, args, kwargs, info)
        kind = info.kind
        if kind is not _RULE:
            if kind is _METADATA:
                return _core._metadata_query(func, args)
            if kind is _DATA_DEPENDENT:
                if self.batch_size == 1:  # (the per-example re-run's level): one value
                    return func(*slice_example(tuple(args), self, 0), **kwargs)
                raise data_dependent("`.item()`/bool()", self)
            if kind is _RANDOM:
                return random_op(self, func, args, kwargs)
            if kind is _CUSTOM_VMAP:
                if info.aliased is not None:  # a mutating custom op: per example
                    return loop_fallback(self, func, args, kwargs)
                return custom_op_vmap(self, func, args, kwargs)
        rule = info.rule
        if rule is None:
            decomp = decomposition(func)
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
            if batched_here(v, self):
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
            if any(batched_here(a, self) and not getattr(a, "_lazy", False)
                   for a in itertools.chain(args, kwargs.values())):
                for w in info.aliased:
                    target = args[w] if isinstance(w, int) else kwargs.get(w)
                    if isinstance(target, BatchedTensor) and target._lazy:
                        materialize_lazy(target._lazy_root)
            if not has_lazy(args, kwargs, self):
                return self.process(func, args, kwargs, info)
        roots = []

        def plain(x):
            if isinstance(x, BatchedTensor) and x._lazy and x._interp is self:
                roots.append(x._lazy_root)
                return x._lazy_plain
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
            if not isinstance(o, torch.Tensor) or batched_here(o, self) or o.layout != torch.strided:
                return o
            if info.view:
                return lazy_wrap(o, self, roots[0])
            # A fresh tensor computed from tensors made inside the function is itself made
            # inside (`y = torch.zeros(3) * 2; y.add_(x)`; dropout's empty_like(x).bernoulli_):
            # it stays lazy, so a later batched write gives each example its own copy.
            # (its own layout, as the example's op gives it: new_empty_strided's strides)
            return lazy_wrap(o, self)

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
                # (read requires_grad before moving the batch dim: this runs with autograd
                # excluded, so the moved view would not require grad)
                needs = needs or v.requires_grad or a._lazy or v.is_complex() or v.is_neg() or v._is_zerotensor()
                if a._bdim != 0:
                    v = v.movedim(a._bdim, 0)
                uargs.append(v)
                dims.append(0)
            elif isinstance(a, torch.Tensor):
                needs = (needs or a.requires_grad or isinstance(a, LevelTensor) or a.is_complex() or a.is_neg()
                         or a._is_zerotensor())  # (the ZeroTensor key is off in __torch_dispatch__ too)
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
            return _new_batched(BatchedTensor, out, out_dims, self)  # (no __init__ call: ~0.2 us)
        if isinstance(out, torch.Tensor):
            if out_dims is None:
                return out
            return BatchedTensor(out, out_dims, self)
        if isinstance(out, (tuple, list)):
            if out_dims is None or isinstance(out_dims, int):
                out_dims = [out_dims] * len(out)
            return type(out)(self._wrap(o, d) for o, d in zip(out, out_dims))
        return out

    def _leave_physical_ad(self, args, kwargs) -> None:
        """An op whose rule is not differentiated on the physical batch (see batching.physical_ad)
        reaches a value of the per-sample gradient's physical graph: that gradient is taken on
        the grad level's wrappers instead."""
        for a in itertools.chain(args, kwargs.values()):
            for b in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(b, torch.Tensor) and (b._value if type(b) is BatchedTensor else b).requires_grad:
                    self.grad_shadow.usable = False
                    self.grad_shadow = None
                    return

    def wrap_physical(self, value: torch.Tensor, bdim: int) -> BatchedTensor:
        """A tensor of this level whose physical value is ``value``, batched in ``bdim``."""
        return BatchedTensor(value, bdim, self)

    def unwrap_value(self, x, d: int = 0) -> torch.Tensor:
        """Physical value of ``x`` at this level with the batch dim at ``d`` (expanded if unbatched)."""
        if isinstance(x, BatchedTensor) and x._interp is self:
            return x._value.movedim(x._bdim, d) if x._bdim != d else x._value
        return x.unsqueeze(d).expand(x.shape[:d] + (self.batch_size,) + x.shape[d:])
