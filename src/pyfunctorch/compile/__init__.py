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


def compile(fn: Callable | None = None, backend: Any = None, *, dynamic: bool | None = False,
            strict: bool = False) -> Any:
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

    Semantics:

    * **Signature.** The graph is specialized to the pytree structure of
      ``(args, kwargs)``; for each tensor its shape, strides, dtype, device,
      ``requires_grad`` and which inputs are the same tensor object; every non-tensor
      argument by value (pass scalars that vary as tensors); and whether grad mode is
      enabled. A new signature traces again (``cache_info().traces``); each cached
      signature keeps its graph. Tensors passed as arguments (e.g. the parameter dict of
      ``functional_call``) are graph inputs, so new values need no retrace.
      Tensors the function *closes over* (a module's own parameters, globals) are graph
      constants held by reference: in-place updates are seen, rebinding them is not.
    * **Python side effects** (prints, appends, counters) happen when a signature is
      traced, not on replays. The traced run is a real run: its results are that call's
      results. ``print(tensor)`` inside ``fn`` shows the trace-time values.
    * **Randomness.** Random ops (``torch.randn``, dropout, ``vmap(...,
      randomness='same')``) are recorded as aten random ops, so every replay draws
      fresh numbers from torch's global generator (``torch.manual_seed`` makes replays
      repeat; the values are not bitwise those an eager call would draw). Where a
      transform reads a random seed into Python (at present vmap's
      ``randomness='different'``), the trace fails as data-dependent and such calls run
      eagerly, with fresh draws.
    * **Data-dependent control flow and dynamic shapes** (``if x.sum() > 0:``,
      ``.item()``, ``.tolist()``, vmap's per-example re-run, ``nonzero`` / boolean-mask
      indexing whose output shape depends on values) cannot be frozen into a graph. By
      default the call runs eagerly with a one-time
      :class:`~pyfunctorch.PerformanceWarning` and the signature is remembered as eager
      (no retrace on later calls); with ``strict=True`` it raises
      :class:`~pyfunctorch.DataDependentError`. Other tracing failures also fall back to
      eager (``strict=True`` re-raises them). A fallback after a failed trace runs ``fn``
      again, so its Python side effects happen twice on that call; if the failed trace
      had already modified an input in place, a ``RuntimeError`` is raised instead.
    * **Outputs** are plain tensors in the same pytree structure as the eager result;
      non-tensor outputs (numbers, strings, dtypes ...) are the values returned at trace
      time. A function that returns a closure (``vjp``'s ``vjp_fn``, ``linearize``'s
      ``jvp_fn``) runs eagerly (one-time warning; ``strict=True`` raises ``TypeError``).
    * **Autograd.** Inputs that require grad are traced as such (it is part of the
      signature) and the replay is ordinary aten ops, so autograd records through it:
      ``torch.autograd.grad`` of a compiled ``grad(f)`` equals the eager one (higher
      orders too with ``backend=None``; torch.compile backends support one backward).
      A backend that fails to compile falls back to the plain replay with a warning.
    * Calls made inside a live transform (``vmap(compiled_fn)``), or with tensor
      subclasses / non-strided inputs, run eagerly (one-time warning).
    * ``dynamic=True`` is not supported (the graph bakes in the shapes).
    * Tracing is not thread-safe (make_fx and the transforms' patches are global).

    ``compiled.cache_info()`` returns ``CacheInfo(hits, misses, traces, eager_calls,
    entries)``, ``compiled.cache_clear()`` forgets the graphs and ``compiled.graphs()``
    lists the traced ``torch.fx.GraphModule`` objects. Without ``fn``, ``compile(backend=...)``
    returns a decorator.

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
        CacheInfo(hits=1, misses=1, traces=1, eager_calls=0, entries=1)
        >>> _ = per_sample_grads(w, torch.randn(4, 3), torch.randn(4))  # new shape: retraces
        >>> per_sample_grads.cache_info().traces
        2
    """
    if fn is None:
        return lambda f: CompiledFunction(f, backend, dynamic=dynamic, strict=strict)
    return CompiledFunction(fn, backend, dynamic=dynamic, strict=strict)


# ``pyfunctorch.compile`` is this function (the package attribute is rebound to it), so the
# classes are reachable from it as well: ``pyfunctorch.compile.CompiledFunction``.
compile.CompiledFunction = CompiledFunction  # type: ignore[attr-defined]
compile.CacheInfo = CacheInfo  # type: ignore[attr-defined]
