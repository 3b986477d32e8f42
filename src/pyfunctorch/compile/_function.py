"""The CompiledFunction class: per-signature cache of traced graphs, tracing and eager fallbacks."""

from __future__ import annotations

import functools
import sys
import warnings
from collections import OrderedDict
from types import FrameType
from typing import Any, Callable, NamedTuple

import torch

from .. import _core
from ..errors import DataDependentError, PerformanceWarning
from ._cudagraph import _CudaGraphRunner
from ._guards import build_guard
from ._replay import _BackendRunner, _replay_fn
from ._signature import _LEAF, _Uncacheable, _flatten, _signature, _unflatten
from ._trace import (
    _check_graph,
    _DataReadGuard,
    _describe_data_dependence,
    _internal,
    _is_data_dependent,
    _is_tracer_error,
    _nested_dynamo_runs_eagerly,
    _print_trace_time_values,
    _rng_state,
    _set_rng_state,
    _Unreplayable,
)


class CacheInfo(NamedTuple):
    """Counters of a compiled function (see :meth:`CompiledFunction.cache_info`)."""

    hits: int  #: calls that replayed (or re-used an eager decision for) a cached signature
    misses: int  #: calls with a new signature (each one traced, or tried to)
    traces: int  #: successful traces (= FX graphs built), retraces included
    eager_calls: int  #: calls that ran the eager function (fallbacks, calls inside transforms)
    entries: int  #: cached signatures (graphs plus remembered eager fallbacks)
    guard_failures: int = 0  #: calls whose cached graph was stale (a guarded global, cell ... changed): retraced
    evictions: int = 0  #: entries dropped because the cache held ``cache_size_limit`` signatures


# -- the compiled function ----------------------------------------------------------------


_SINGLE = (_LEAF,)


class _Entry:
    """One cached signature: a graph to replay (with its guards), or a remembered decision
    to run eagerly."""

    __slots__ = ("run", "graph", "tensor_pos", "out_struct", "out_template", "out_tensor_slots", "eager",
                 "guard", "refresh")

    def __init__(self):
        self.run = None
        self.graph = None
        self.tensor_pos = ()
        self.out_struct = None
        self.out_template = None
        self.out_tensor_slots = ()
        self.eager = False
        self.guard = None
        self.refresh = None

    def outputs(self, outs) -> Any:
        if self.out_struct is _SINGLE:
            return outs[0]
        leaves = list(self.out_template)
        for slot, o in zip(self.out_tensor_slots, outs):
            leaves[slot] = o
        return _unflatten(self.out_struct, leaves)


_MODES = (None, "default", "reduce-overhead")
_FREQUENT_RETRACES = 8  # guard failures after which compile warns that something keeps changing


class CompiledFunction:
    """The callable returned by :func:`compile`. See :func:`compile` for the semantics."""

    def __init__(self, fn: Callable, backend: Any = None, *, mode: str | None = None, dynamic: bool | None = False,
                 strict: bool = False, cache_size_limit: int = 64):
        if not callable(fn):
            raise TypeError(f"pyfunctorch.compile: expected a callable; got {type(fn).__name__}.")
        if dynamic:
            raise NotImplementedError(
                "pyfunctorch.compile(dynamic=True) is not supported: the traced graph is specialized to "
                "the input shapes (pyfunctorch's transforms compute with concrete batch sizes), and a new "
                "shape retraces. Use dynamic=False."
            )
        if backend is not None and not (isinstance(backend, str) or callable(backend)):
            raise TypeError(
                "pyfunctorch.compile: backend must be None (replay the traced FX graph), a torch.compile "
                f"backend name such as 'inductor', or a backend callable; got {backend!r}."
            )
        if mode not in _MODES:
            raise ValueError(f"pyfunctorch.compile: mode must be one of {_MODES}; got {mode!r}.")
        if mode == "reduce-overhead" and backend not in (None, "inductor"):
            raise ValueError(
                "pyfunctorch.compile: mode='reduce-overhead' works with backend=None (pyfunctorch captures the "
                f"replay in a CUDA graph) or backend='inductor' (inductor's CUDA graphs); got backend={backend!r}."
            )
        if isinstance(cache_size_limit, bool) or not isinstance(cache_size_limit, int) or cache_size_limit < 1:
            raise ValueError(f"pyfunctorch.compile: cache_size_limit must be a positive int; got {cache_size_limit!r}.")
        self._fn = fn
        self._backend = backend
        self._mode = None if mode == "default" else mode
        self._strict = strict
        self._limit = cache_size_limit
        self._cache: OrderedDict = OrderedDict()
        self._hits = self._misses = self._traces = self._eager_calls = self._guard_failures = self._evictions = 0
        self._warned: set = set()
        functools.update_wrapper(self, fn)

    # -- public helpers --------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        """Hits, misses, successful traces, eager calls, cached entries, guard failures and evictions so far."""
        return CacheInfo(self._hits, self._misses, self._traces, self._eager_calls, len(self._cache),
                         self._guard_failures, self._evictions)

    def cache_clear(self) -> None:
        """Forget every traced graph (the next call of each signature retraces) and the counters."""
        self._cache.clear()
        self._hits = self._misses = self._traces = self._eager_calls = self._guard_failures = self._evictions = 0

    def graphs(self) -> list:
        """The traced FX GraphModules, one per cached signature (for inspection)."""
        return [e.graph for e in self._cache.values() if e.graph is not None]

    def __repr__(self) -> str:
        return f"<pyfunctorch.compile of {getattr(self._fn, '__name__', self._fn)!r}, backend={self._backend!r}>"

    # -- calls -----------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if _is_compiling():
            # Inside torch.compile: dynamo must not inline the tracer and the cache; it
            # graph-breaks here and this call runs as an ordinary Python call.
            return _call_outside_dynamo(self, args, kwargs)
        if _core._state.stack:
            # Called inside a live transform: the inputs are (or may meet) wrappers of
            # that transform, which a graph of plain ops cannot stand for.
            self._warn_once(
                "inside",
                "pyfunctorch.compile: the compiled function was called inside a live transform "
                "(vmap/grad/jvp ...), so it runs eagerly. Compile the outermost transform instead, "
                "e.g. pyfunctorch.compile(vmap(grad(f))).",
            )
            self._eager_calls += 1
            return self._fn(*args, **kwargs)
        try:
            leaves, n_args, key = _signature(args, kwargs)
        except _Uncacheable as e:
            self._warn_once(("uncacheable", str(e)), f"pyfunctorch.compile: {e}; running eagerly.")
            self._eager_calls += 1
            return self._fn(*args, **kwargs)
        cache = self._cache
        entry = cache.get(key)
        if entry is None:
            self._misses += 1
            return self._trace(key, args, kwargs, leaves, n_args)
        if entry.guard is not None and not entry.guard():
            return self._guard_failed(key, args, kwargs, leaves, n_args)
        self._hits += 1
        if len(cache) > 1:
            cache.move_to_end(key)
        if entry.eager:
            self._eager_calls += 1
            return self._fn(*args, **kwargs)
        outs = entry.run(*[leaves[i] for i in entry.tensor_pos])
        if entry.refresh is not None:
            entry.refresh()  # the graph updated a guarded constant tensor in place
        return entry.outputs(outs)

    def _guard_failed(self, key, args, kwargs, leaves, n_args):
        """A global, closure cell, module attribute or constant tensor that the cached graph
        baked in has changed: the graph is stale; trace again."""
        del self._cache[key]
        self._guard_failures += 1
        if self._guard_failures == _FREQUENT_RETRACES:
            name = getattr(self._fn, "__name__", "the function")
            self._warn_once(
                "retraces",
                f"pyfunctorch.compile({name}): retraced {_FREQUENT_RETRACES} times because a value the graph "
                "baked in changed (a global or closed-over variable rebound, a module attribute or parameter "
                "replaced, a closed-over tensor updated in place). Pass values that change between calls as "
                "arguments (tensors are graph inputs and never retrace).",
            )
        return self._trace(key, args, kwargs, leaves, n_args)

    def _warn_once(self, what, message: str) -> None:
        if what in self._warned:
            return
        self._warned.add(what)
        level = 2
        f: FrameType | None = sys._getframe(1)
        while f is not None and _internal(f.f_code.co_filename):  # point at the user's call
            level, f = level + 1, f.f_back
        warnings.warn(message, PerformanceWarning, stacklevel=level)

    def _store(self, key, entry: _Entry) -> None:
        """Cache an entry, evicting the least recently used one beyond ``cache_size_limit``."""
        cache = self._cache
        cache[key] = entry
        while len(cache) > self._limit:
            cache.popitem(last=False)
            self._evictions += 1
            name = getattr(self._fn, "__name__", "the function")
            self._warn_once(
                "evict",
                f"pyfunctorch.compile({name}): more than cache_size_limit={self._limit} input signatures "
                "(shapes, dtypes, non-tensor argument values ...); the least recently used graphs are "
                "dropped and traced again when needed. Pad inputs to a few shapes, pass varying Python "
                "numbers as tensors, or raise cache_size_limit.",
            )

    def _trace(self, key, args, kwargs, leaves, n_args):
        """First call of a signature: trace it (the traced run *is* this call, so its
        outputs are returned and side effects happen once), or fall back to eager."""
        from torch.fx.experimental.proxy_tensor import make_fx

        fn = self._fn
        # graph inputs: the distinct tensors among the leaves (identity), in order
        tensor_pos = []
        first_of: dict = {}
        for i, x in enumerate(leaves):
            if isinstance(x, torch.Tensor) and id(x) not in first_of:
                first_of[id(x)] = i
                tensor_pos.append(i)
        struct, kstruct = key[0], key[1]
        inputs = [leaves[i] for i in tensor_pos]
        versions = [t._version for t in inputs]
        captured: dict = {}
        rng = _rng_state()  # an eager rerun after a failed trace draws what this call would have drawn

        def flat_fn(*tensors):
            new_leaves = list(leaves)
            by_id = {id(leaves[p]): t for p, t in zip(tensor_pos, tensors)}
            for i, x in enumerate(leaves):
                if isinstance(x, torch.Tensor):
                    new_leaves[i] = by_id[id(x)]
            a = _unflatten(struct, new_leaves[:n_args])
            k = _unflatten(kstruct, new_leaves[n_args:]) if kstruct else {}
            with _DataReadGuard(), _print_trace_time_values(), _nested_dynamo_runs_eagerly():
                out = fn(*a, **k)
            out_leaves: list = []
            out_struct: list = []
            _flatten(out, out_leaves, out_struct)
            captured["struct"] = tuple(out_struct)
            captured["leaves"] = out_leaves
            return [o for o in out_leaves if isinstance(o, torch.Tensor)]

        try:
            gm = make_fx(flat_fn, tracing_mode="real")(*inputs)
            problem = _check_graph(gm, captured)
        except Exception as exc:  # noqa: BLE001 - classified below
            return self._trace_failed(key, args, kwargs, inputs, versions, exc, rng)
        if problem is not None:
            # The traced run itself was a correct eager run: return its outputs, but do
            # not cache a graph that froze data-dependent shapes.
            if self._strict and isinstance(problem, _Unreplayable):
                raise problem
            self._fallback(key, problem, None)
            self._eager_calls += 1
            return _unflatten(captured.pop("struct"), captured.pop("leaves"))

        entry = _Entry()
        entry.graph = gm
        entry.tensor_pos = tuple(tensor_pos)
        # (popped: flat_fn, which make_fx may keep referenced, must not keep this call's outputs)
        out_struct, out_leaves = captured.pop("struct"), captured.pop("leaves")
        single = out_struct == _SINGLE and isinstance(out_leaves[0], torch.Tensor)
        entry.out_struct = _SINGLE if single else out_struct
        entry.out_tensor_slots = tuple(i for i, o in enumerate(out_leaves) if isinstance(o, torch.Tensor))
        entry.out_template = tuple(None if isinstance(o, torch.Tensor) else o for o in out_leaves)
        mutated = tuple(j for j, (t, v) in enumerate(zip(inputs, versions)) if t._version != v)
        entry.run = self._make_runner(gm, inputs, [out_leaves[i] for i in entry.out_tensor_slots], mutated)
        arguments = tuple(x for x in leaves if not isinstance(x, torch.Tensor))
        entry.guard, entry.refresh, _ = build_guard(fn, gm, arguments)
        self._store(key, entry)
        self._traces += 1
        return _unflatten(out_struct, out_leaves)

    def _make_runner(self, gm, inputs, outputs, mutated):
        if self._backend is not None:
            return _BackendRunner(self, gm)
        replay = _replay_fn(gm)
        if self._mode != "reduce-overhead":
            return replay
        why = _CudaGraphRunner.unsupported(inputs, outputs)
        if why is not None:
            self._warn_once(
                ("cudagraph", why),
                f"pyfunctorch.compile(mode='reduce-overhead'): {why}, so this signature replays the traced "
                "graph without a CUDA graph.",
            )
            return replay
        return _CudaGraphRunner(self, replay, mutated)

    def _trace_failed(self, key, args, kwargs, inputs, versions, exc, rng=None):
        name = getattr(self._fn, "__name__", "the function")
        mutated = any(t._version != v for t, v in zip(inputs, versions))
        if not _is_data_dependent(exc):
            if not _is_tracer_error(exc):
                # The function's own exception (raised by its code, by pyfunctorch's checks
                # or by an operator): eager would raise it too. Propagate it as is, without
                # running the function a second time.
                raise exc
            if self._strict or mutated:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(raised by the tracer while pyfunctorch.compile traced {name})")
                raise exc
            _set_rng_state(rng)
            out = self._fn(*args, **kwargs)  # the tracer failed: run eagerly (an eager error surfaces here)
            self._fallback(key, exc, exc)  # eager works, tracing does not: remember, warn
            self._eager_calls += 1
            return out
        problem = DataDependentError(_describe_data_dependence(exc))
        if mutated and not self._strict:
            raise RuntimeError(
                f"pyfunctorch.compile({name}): cannot trace a fixed graph ({problem}), and the traced run had "
                "already modified its inputs in place, so it cannot be re-run eagerly without applying the "
                "update twice. Make the in-place update out-of-place, or move it after the data-dependent step."
            ) from exc
        self._fallback(key, problem, exc)  # raises when strict
        self._eager_calls += 1
        _set_rng_state(rng)
        return self._fn(*args, **kwargs)

    def _fallback(self, key, problem, cause):
        """Remember that this signature runs eagerly; warn once, or raise when strict."""
        name = getattr(self._fn, "__name__", "the function")
        if isinstance(problem, DataDependentError):
            if self._strict:
                raise DataDependentError(
                    f"pyfunctorch.compile({name}, strict=True): cannot trace a fixed graph: {problem}. Use "
                    "torch.where / pyfunctorch.cond / pyfunctorch.while_loop for value-dependent control flow, "
                    "or compile without strict=True to run such calls eagerly."
                ) from cause
            msg = (
                f"pyfunctorch.compile({name}): cannot trace a fixed graph: {problem}. Calls with this input "
                "signature run eagerly (correct, not faster); pass strict=True to raise instead."
            )
            what = ("data", str(problem))
        elif isinstance(problem, _Unreplayable):
            msg = f"pyfunctorch.compile({name}): {problem}. Calls with this input signature run eagerly."
            what = ("unreplayable", str(problem))
        else:  # tracing failed where eager works (strict=True re-raised it before)
            msg = (
                f"pyfunctorch.compile({name}): tracing failed ({type(problem).__name__}: "
                f"{(str(problem).splitlines() or [''])[0][:300]}); calls with this input signature run eagerly."
            )
            what = ("error", type(problem).__name__, str(problem)[:200])
        entry = _Entry()
        entry.eager = True
        self._store(key, entry)
        self._warn_once(what, msg)


_is_compiling = torch.compiler.is_compiling


def _call_plain(compiled: CompiledFunction, args, kwargs):
    return compiled(*args, **kwargs)


def _call_outside_dynamo(compiled: CompiledFunction, args, kwargs):
    # torch.compiler.disable imports torch._dynamo: only here, while dynamo already runs
    return torch.compiler.disable(_call_plain)(compiled, args, kwargs)
