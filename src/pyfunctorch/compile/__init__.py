"""``pyfunctorch.compile``: trace a composition of transforms once, replay plain aten ops.

The eager transforms pay Python dispatch costs on every op at every level. For fixed
input signatures all of that work produces the same sequence of plain aten operations
each time, so :func:`compile` records that sequence once with
``torch.fx.experimental.proxy_tensor.make_fx`` (real-tensor tracing: the transforms run
for real and the tracer records the plain ops that reach the bottom of the wrapper
stack) and replays the recorded FX graph on later calls. ``backend="inductor"`` (or any
``torch.compile`` backend) additionally compiles that graph.

The package: ``_signature`` (input signatures), ``_trace`` (trace-time data-dependence
checks and error sites), ``_replay`` (running a traced graph), ``_function`` (the
:class:`CompiledFunction` cache); :func:`compile` itself is defined here.
"""

from __future__ import annotations

from typing import Any, Callable

from ._function import CacheInfo, CompiledFunction

__all__ = ["compile", "CompiledFunction", "CacheInfo"]


def compile(fn: Callable | None = None, backend: Any = None, *, mode: str | None = None,
            dynamic: bool | None = False, strict: bool = False, cache_size_limit: int = 64) -> Any:
    """Trace ``fn`` (any composition of pyfunctorch transforms, or any torch code) into a
    graph of plain aten operations, cache it per input signature and replay it.

    ``compile(vmap(grad(loss), in_dims=(None, 0, 0)))`` returns a function with the same
    results as the eager one, without pyfunctorch's per-op Python dispatch: the first
    call with a new *signature* runs ``fn`` eagerly under
    ``torch.fx.experimental.proxy_tensor.make_fx`` (real tensors), which records the aten
    ops that reach the bottom of the wrapper stack; later calls with the same signature
    replay that FX graph. ``backend`` is ``None`` (replay the FX graph) or a
    ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, a callable ...), which
    compiles the recorded graph (not pyfunctorch's eager wrappers, which graph-break).
    ``"inductor"`` (without CUDA graphs) compiles it with inductor directly
    (``torch._inductor.compile``): no dynamo frame evaluation per call, whose guards
    would only repeat pyfunctorch's own (~25 us less per call on CPU).
    ``mode="reduce-overhead"`` captures the replay in a CUDA graph (see below).

    Semantics:

    * **Signature.** The graph is specialized to the pytree structure of
      ``(args, kwargs)``; for each tensor its shape, strides, dtype, device,
      ``requires_grad`` and which inputs are the same tensor object; every non-tensor
      argument by value (pass scalars that vary as tensors); whether grad mode is
      enabled; and the default dtype. A new signature traces again
      (``cache_info().traces``). Tensors passed as arguments (e.g. the parameter dict of
      ``functional_call``) are graph inputs, so new values need no retrace.
    * **Guards: a replay is never stale.** Everything else the trace read is baked into
      the graph, so each graph carries guards, checked before every replay (one
      generated straight-line check, well under a microsecond for a small MLP); when
      one fails the signature is traced again (``cache_info().guard_failures``, and a
      one-time warning after 8 retraces). Guarded:

      - the globals and closure cells read by ``fn`` and by every function reachable
        from it statically: the ``LOAD_GLOBAL`` names of its code objects (nested
        functions and lambdas included), its closure cells, default arguments,
        ``functools.partial`` (func, args, keywords), bound methods (``__self__`` and
        ``__func__``), callable objects' ``__call__``, functions inside tuples, lists
        and dicts found that way, pyfunctorch transforms (their wrapped function), and
        the attributes that code reads from a user module (``config.scale``);
        numbers, bools, strings and ``None`` by value, everything else by identity;
      - tensors reached that way, and every tensor constant of the graph, by identity
        and version (``t._version``): an in-place update outside the call retraces
        (the graph's own in-place updates, e.g. a counter, do not);
      - ``nn.Module`` state, for every submodule: parameters, buffers and child modules
        by identity, ``training``, and public attributes that are numbers, strings or
        tensors (``p``, ``eps``, ``self.scale``); the methods of user-defined module
        classes are walked like functions. Parameters and buffers are *not* guarded by
        version: an optimizer step or BatchNorm's running statistics update them in
        place, and the replay sees the new values through the reference (a Python read
        of a parameter's *value* at trace time is the one thing not re-checked);
      - grad mode and the default dtype (part of the signature).

      Not guarded: mutable objects read through items or attributes of arbitrary
      objects (``cfg["lr"]``, ``self.table[i]`` of a non-module, a list that is
      mutated in place), functions reached only dynamically (``getattr(obj, name)()``
      of a non-module object, a registry lookup), module hooks added or removed after
      the trace, globals of torch, pyfunctorch and the standard library, and the state
      of other libraries (NumPy's RNG, ...). Pass such
      values as arguments, or call ``compiled.cache_clear()`` after changing them.
    * **Cache size.** At most ``cache_size_limit`` signatures (default 64) are kept;
      beyond that the least recently used graph is dropped (a one-time
      :class:`~pyfunctorch.PerformanceWarning`; ``cache_info().evictions``) and traced
      again if its signature comes back.
    * **Python side effects** (prints, appends, counters) happen when a signature is
      traced, not on replays. The traced run is a real run: its results are that call's
      results. ``print(tensor)`` inside ``fn`` shows the trace-time values.
    * **Randomness.** Random ops (``torch.randn``, dropout, ``vmap(...,
      randomness='same')``) are recorded as aten random ops, so every replay draws
      fresh numbers from torch's global generator (``torch.manual_seed`` makes replays
      repeat; the values are not bitwise those an eager call would draw). Under
      ``vmap(..., randomness='different')`` the per-example seeds are drawn from the
      global generator inside the graph exactly as eager vmap draws them, and the
      per-example draws are one recorded op, so a compiled call gives bit-for-bit the
      eager result for the same ``torch.manual_seed`` (where the random op is reached
      with plain tensors below the vmap level; otherwise that signature runs eagerly).
    * **Data-dependent control flow and dynamic shapes** (``if x.sum() > 0:``,
      ``.item()``, ``.tolist()``, vmap's per-example re-run, ``nonzero`` / boolean-mask
      indexing whose output shape depends on values) cannot be frozen into a graph. By
      default the call runs eagerly with a one-time
      :class:`~pyfunctorch.PerformanceWarning` and the signature is remembered as eager
      (no retrace on later calls); with ``strict=True`` it raises
      :class:`~pyfunctorch.DataDependentError`. If the traced run had already modified
      an input in place, a ``RuntimeError`` is raised instead of re-running it.
    * **Exceptions.** An exception raised by the function while it is traced (by its
      own code, by pyfunctorch's checks or by an operator) propagates as is: the
      function is not run a second time. Only failures of the tracer itself (raised
      inside torch.fx / dynamo) fall back to an eager run of the call, with a one-time
      warning (so that call's side effects happen twice); ``strict=True`` re-raises them.
    * **Outputs** are plain tensors in the same pytree structure as the eager result;
      non-tensor outputs (numbers, strings, dtypes ...) are the values returned at trace
      time. A function that returns a closure (``vjp``'s ``vjp_fn``, ``linearize``'s
      ``jvp_fn``) runs eagerly (one-time warning; ``strict=True`` raises ``TypeError``).
    * **Autograd.** Inputs that require grad are traced as such (it is part of the
      signature) and the replay is ordinary aten ops, so autograd records through it:
      ``torch.autograd.grad`` of a compiled ``grad(f)`` equals the eager one (higher
      orders too with ``backend=None``; torch.compile backends support one backward).
      A backend that fails to compile falls back to the plain replay with a warning.
    * ``mode="reduce-overhead"`` (``backend=None``): on CUDA, the second call of a
      signature copies the inputs into static buffers, runs the graph once (warm-up,
      its result is returned) and captures it in a ``torch.cuda.CUDAGraph``; later
      calls copy the inputs in, replay the CUDA graph, copy in-place-updated inputs
      back and return *clones* of the outputs (so an output that was an input is a
      copy, not the same tensor). Random ops draw fresh numbers on each replay.
      Signatures with CPU tensors or tensors that require grad use the plain replay
      (a one-time warning), as does a graph that cannot be captured. With
      ``backend="inductor"`` the mode is passed on to ``torch.compile`` (inductor's CUDA
      graphs take their static inputs from dynamo); other inductor modes become
      inductor options (``torch._inductor.list_mode_options``).
    * **torch.compile interop.** Inside a ``torch.compile``d function a compiled
      function is a graph break (dynamo does not trace the cache and the tracer) and
      runs as usual. A ``torch.compile``d module or function called *by* ``fn`` runs its
      original Python code while ``fn`` is traced, so its aten ops are recorded.
    * Calls made inside a live transform (``vmap(compiled_fn)``), or with tensor
      subclasses / non-strided inputs, run eagerly (one-time warning).
    * ``dynamic=True`` is not supported (the graph bakes in the shapes).
    * Tracing is not thread-safe (make_fx and the transforms' patches are global).

    ``compiled.cache_info()`` returns ``CacheInfo(hits, misses, traces, eager_calls,
    entries, guard_failures, evictions)``, ``compiled.cache_clear()`` forgets the graphs
    and ``compiled.graphs()`` lists the traced ``torch.fx.GraphModule`` objects. Without
    ``fn``, ``compile(backend=...)`` returns a decorator.

    Examples:
        >>> import torch
        >>> import pyfunctorch as pf
        >>> def loss(w, x, y):
        ...     return ((x @ w - y) ** 2).mean()
        >>> per_sample_grads = pf.compile(pf.vmap(pf.grad(loss), in_dims=(None, 0, 0)))
        >>> w, x, y = torch.randn(3), torch.randn(8, 3), torch.randn(8)
        >>> g = per_sample_grads(w, x, y)            # traces
        >>> g = per_sample_grads(w + 1, x, y)        # same signature: replays the graph
        >>> torch.allclose(g, pf.vmap(pf.grad(loss), in_dims=(None, 0, 0))(w + 1, x, y))
        True
        >>> per_sample_grads.cache_info()
        CacheInfo(hits=1, misses=1, traces=1, eager_calls=0, entries=1, guard_failures=0, evictions=0)
        >>> _ = per_sample_grads(w, torch.randn(4, 3), torch.randn(4))  # new shape: retraces
        >>> per_sample_grads.cache_info().traces
        2
    """
    options = dict(mode=mode, dynamic=dynamic, strict=strict, cache_size_limit=cache_size_limit)
    if fn is None:
        return lambda f: CompiledFunction(f, backend, **options)
    return CompiledFunction(fn, backend, **options)


# ``pyfunctorch.compile`` is this function (the package attribute is rebound to it), so the
# classes are reachable from it as well: ``pyfunctorch.compile.CompiledFunction``.
compile.CompiledFunction = CompiledFunction  # type: ignore[attr-defined]
compile.CacheInfo = CacheInfo  # type: ignore[attr-defined]
