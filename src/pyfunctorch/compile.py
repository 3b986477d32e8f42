"""``pyfunctorch.compile``: trace a composition of transforms once, replay plain aten ops.

The eager transforms pay Python dispatch costs on every op at every level. For fixed
input signatures all of that work produces the same sequence of plain aten operations
each time, so :func:`compile` records that sequence once with
``torch.fx.experimental.proxy_tensor.make_fx`` (real-tensor tracing: the transforms run
for real and the tracer records the plain ops that reach the bottom of the wrapper
stack) and replays the recorded FX graph on later calls. ``backend="inductor"`` (or any
``torch.compile`` backend) additionally compiles that graph.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import sys
import traceback
import warnings
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import _core
from .errors import DataDependentError, PerformanceWarning

__all__ = ["compile", "CompiledFunction", "CacheInfo"]

builtins_compile = builtins.compile  # this module defines its own ``compile``


class CacheInfo(NamedTuple):
    """Counters of a compiled function (see :meth:`CompiledFunction.cache_info`)."""

    hits: int  #: calls that replayed (or re-used an eager decision for) a cached signature
    misses: int  #: calls with a new signature (each one traced, or tried to)
    traces: int  #: successful traces (= FX graphs built)
    eager_calls: int  #: calls that ran the eager function (fallbacks, calls inside transforms)
    entries: int  #: cached signatures (graphs plus remembered eager fallbacks)


# -- signatures: a fast flatten of (args, kwargs) ---------------------------------------
#
# torch.utils._pytree.tree_flatten costs ~30 us for a dict of four tensors plus two more;
# replaying a small graph costs about that much. Exact tuples, lists and dicts (the usual
# containers of arguments) are flattened here; any other registered pytree node falls
# back to torch's flatten for that subtree (its TreeSpec becomes part of the key).

_TUPLE, _LIST, _DICT, _LEAF, _NODE = 0, 1, 2, 3, 4
_is_leaf = getattr(pytree, "tree_is_leaf", None) or pytree._is_leaf


def _flatten(x: Any, leaves: list, struct: list) -> None:
    t = type(x)
    if t is tuple:
        struct.append((_TUPLE, len(x)))
        for y in x:
            _flatten(y, leaves, struct)
    elif t is list:
        struct.append((_LIST, len(x)))
        for y in x:
            _flatten(y, leaves, struct)
    elif t is dict:
        struct.append((_DICT, tuple(x)))
        for y in x.values():
            _flatten(y, leaves, struct)
    elif isinstance(x, torch.Tensor) or x is None or t in (int, float, bool, str) or _is_leaf(x):
        struct.append(_LEAF)
        leaves.append(x)
    else:  # a registered pytree node (namedtuple, OrderedDict, dataclass ...)
        sub, spec = pytree.tree_flatten(x)
        struct.append((_NODE, spec))
        leaves.extend(sub)


def _unflatten(struct: tuple, leaves: list) -> Any:
    return _build(iter(struct), iter(leaves))


def _build(it_struct, it_leaves) -> Any:
    # (a plain recursive function: a self-referencing closure would be a reference cycle
    # that keeps the output tensors alive until the cyclic GC runs)
    s = next(it_struct)
    if s == _LEAF:
        return next(it_leaves)
    kind, info = s
    if kind is _TUPLE:
        return tuple([_build(it_struct, it_leaves) for _ in range(info)])
    if kind is _LIST:
        return [_build(it_struct, it_leaves) for _ in range(info)]
    if kind is _DICT:
        return {k: _build(it_struct, it_leaves) for k in info}
    return pytree.tree_unflatten([next(it_leaves) for _ in range(info.num_leaves)], info)


class _Uncacheable(Exception):
    """The call cannot be keyed (an unhashable argument): run it eagerly."""


def _signature(args: tuple, kwargs: dict):
    """``(leaves, n_args_leaves, key)``: the flat leaves of (args, kwargs), how many of them
    come from args, and a hashable key of everything the traced graph is specialized to."""
    leaves: list = []
    struct: list = []
    _flatten(args, leaves, struct)
    n_args = len(leaves)
    kstruct: list = []
    if kwargs:
        _flatten(kwargs, leaves, kstruct)
    metas: list = []
    seen: dict = {}
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            tp = type(x)
            if (tp is not torch.Tensor and tp is not torch.nn.Parameter) or x.layout is not torch.strided:
                raise _Uncacheable(
                    f"an input is a {tp.__name__} with layout {x.layout} (only plain strided tensors are traced)"
                )
            first = seen.setdefault(id(x), i)  # the same tensor passed twice must stay shared
            metas.append((x.shape, x.stride(), x.dtype, x.device, x.requires_grad, first))
        else:
            try:
                hash(x)
            except TypeError:
                raise _Uncacheable(f"an argument of type {type(x).__name__} is not hashable") from None
            metas.append((type(x), x))
    return leaves, n_args, (tuple(struct), tuple(kstruct), tuple(metas), torch.is_grad_enabled())


# -- trace-time detection of data dependence ---------------------------------------------


class _DataRead(DataDependentError):
    """Raised while tracing when Python reads the values of a traced tensor."""


_READS = frozenset({"tolist", "numpy", "__array__"})


class _DataReadGuard(TorchFunctionMode):
    """While tracing: ``.tolist()`` / ``.numpy()`` of a traced tensor would bake its values
    into the graph without make_fx noticing (``.item()`` and ``bool()`` already raise in
    make_fx). Turn those into a data-dependence error."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in _READS and args and _is_traced(args[0]):
            raise _DataRead(f"`.{func.__name__}()` reads the values of a tensor computed from the inputs")
        return func(*args, **(kwargs or {}))


def _is_traced(t) -> bool:
    if not isinstance(t, torch.Tensor) or isinstance(t, _core.LevelTensor):
        return False
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

        mode = get_proxy_mode()
        if mode is None:
            return True
        slot = get_proxy_slot(t, mode.tracer, None)
        return slot is not None and getattr(slot, "constant", None) is None
    except Exception:  # pragma: no cover - torch internals changed: be conservative
        return True


@contextmanager
def _print_trace_time_values():
    """While tracing, printing a tensor (``print(x)`` for debugging) shows its trace-time
    values instead of failing the trace on the data reads of torch's formatter."""
    from torch import _tensor_str
    from torch.utils._python_dispatch import _disable_current_modes

    original = _tensor_str._str

    def _str(self, *args, **kwargs):
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    _tensor_str._str = _str
    try:
        yield
    finally:
        _tensor_str._str = original


_MAKE_FX_DATA_MSG = "trying to get value out of a tracing tensor"


def _is_data_dependent(exc: BaseException) -> bool:
    if isinstance(exc, DataDependentError):
        return True
    if isinstance(exc, RuntimeError) and _MAKE_FX_DATA_MSG in str(exc):
        return True
    name = type(exc).__name__
    return name in ("DataDependentOutputException", "DynamicOutputShapeException", "GuardOnDataDependentSymNode")


def _dynamic_shape_nodes(gm: torch.fx.GraphModule) -> list:
    """Recorded ops whose output shape depends on tensor values (nonzero, masked_select,
    unique, boolean-mask indexing ...): their shapes would be frozen into the graph."""
    bad = []
    for node in gm.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        if torch.Tag.dynamic_output_shape not in op.tags:
            continue
        if op.overloadpacket is torch.ops.aten.index:
            # integer indexing has a static shape; only boolean masks are data-dependent
            idx = node.args[1] if len(node.args) > 1 else ()
            if not any(_is_bool_node(i) for i in idx):
                continue
        bad.append(node)
    return bad


def _is_bool_node(n) -> bool:
    val = getattr(n, "meta", {}).get("val") if isinstance(n, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8)


_PKG_DIR = __file__.rsplit("/", 1)[0] + "/"


def _user_site(tb) -> str:
    """Where tracing failed, as 'file:line (func)': the innermost traceback frame in the
    user's code (outside torch and pyfunctorch), else the innermost outside torch."""
    user = lib = None
    for frame, lineno in traceback.walk_tb(tb):
        fname = frame.f_code.co_filename
        if _torch_or_generated(fname) or fname == __file__:
            continue
        here = f"{fname}:{lineno} ({frame.f_code.co_name})"
        if fname.startswith(_PKG_DIR):
            lib = here
        else:
            user = here
    return user or lib or "an unknown line"


def _internal(fname: str) -> bool:
    return fname.startswith(_PKG_DIR) or _torch_or_generated(fname)


def _torch_or_generated(fname: str) -> bool:
    return "/torch/" in fname or fname.startswith(("<eval_with_key", "<pyfunctorch", "<frozen"))


def _describe_data_dependence(exc: BaseException) -> str:
    msg = str(exc)
    if _MAKE_FX_DATA_MSG in msg:
        op = msg.split(" with ", 1)[1].split(" ", 1)[0] if " with " in msg else "a data read"
        what = f"Python reads the value of a tensor computed from the inputs ({op}: `if x.sum() > 0:`, `.item()`, `float(x)` ...)"
    elif isinstance(exc, _DataRead):
        what = msg
    else:
        what = (msg.splitlines() or [type(exc).__name__])[0]
    return f"{what} at {_user_site(exc.__traceback__)}"


# -- the compiled function ----------------------------------------------------------------


class _Unreplayable(TypeError):
    """The traced function returned something a graph cannot reproduce (a closure ...)."""


_CONSTANT_OUTPUTS = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
                     torch.memory_format, torch.Size)


_SINGLE = (_LEAF,)


class _Entry:
    """One cached signature: a graph to replay, or a remembered decision to run eagerly."""

    __slots__ = ("run", "graph", "tensor_pos", "out_struct", "out_template", "out_tensor_slots", "eager")

    def __init__(self):
        self.run = None
        self.graph = None
        self.tensor_pos = ()
        self.out_struct = None
        self.out_template = None
        self.out_tensor_slots = ()
        self.eager = False

    def outputs(self, outs) -> Any:
        if self.out_struct is _SINGLE:
            return outs[0]
        leaves = list(self.out_template)
        for slot, o in zip(self.out_tensor_slots, outs):
            leaves[slot] = o
        return _unflatten(self.out_struct, leaves)


class CompiledFunction:
    """The callable returned by :func:`compile`. See :func:`compile` for the semantics."""

    def __init__(self, fn: Callable, backend: Any = None, *, dynamic: bool | None = False, strict: bool = False):
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
        self._fn = fn
        self._backend = backend
        self._strict = strict
        self._cache: dict = {}
        self._hits = self._misses = self._traces = self._eager_calls = 0
        self._warned: set = set()
        functools.update_wrapper(self, fn)

    # -- public helpers --------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        """Hits, misses, successful traces, eager calls and cached entries so far."""
        return CacheInfo(self._hits, self._misses, self._traces, self._eager_calls, len(self._cache))

    def cache_clear(self) -> None:
        """Forget every traced graph (the next call of each signature retraces) and the counters."""
        self._cache.clear()
        self._hits = self._misses = self._traces = self._eager_calls = 0

    def graphs(self) -> list:
        """The traced FX GraphModules, one per cached signature (for inspection)."""
        return [e.graph for e in self._cache.values() if e.graph is not None]

    def __repr__(self) -> str:
        return f"<pyfunctorch.compile of {getattr(self._fn, '__name__', self._fn)!r}, backend={self._backend!r}>"

    # -- calls -----------------------------------------------------------------------
    @_core.opaque_to_compiler  # under torch.compile: one eager call (it traces and replays itself)
    def __call__(self, *args, **kwargs):
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
        entry = self._cache.get(key)
        if entry is None:
            self._misses += 1
            return self._trace(key, args, kwargs, leaves, n_args)
        self._hits += 1
        if entry.eager:
            self._eager_calls += 1
            return self._fn(*args, **kwargs)
        outs = entry.run(*[leaves[i] for i in entry.tensor_pos])
        return entry.outputs(outs)

    def _warn_once(self, what, message: str) -> None:
        if what in self._warned:
            return
        self._warned.add(what)
        level = 2
        f: FrameType | None = sys._getframe(1)
        while f is not None and _internal(f.f_code.co_filename):  # point at the user's call
            level, f = level + 1, f.f_back
        warnings.warn(message, PerformanceWarning, stacklevel=level)

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

        def flat_fn(*tensors):
            new_leaves = list(leaves)
            by_id = {id(leaves[p]): t for p, t in zip(tensor_pos, tensors)}
            for i, x in enumerate(leaves):
                if isinstance(x, torch.Tensor):
                    new_leaves[i] = by_id[id(x)]
            a = _unflatten(struct, new_leaves[:n_args])
            k = _unflatten(kstruct, new_leaves[n_args:]) if kstruct else {}
            with _DataReadGuard(), _print_trace_time_values():
                out = fn(*a, **k)
            out_leaves: list = []
            out_struct: list = []
            _flatten(out, out_leaves, out_struct)
            captured["struct"] = tuple(out_struct)
            captured["leaves"] = out_leaves
            return [o for o in out_leaves if isinstance(o, torch.Tensor)]

        try:
            gm = make_fx(flat_fn, tracing_mode="real")(*inputs)
            problem = self._check_graph(gm, captured)
        except Exception as exc:  # noqa: BLE001 - classified below
            return self._trace_failed(key, args, kwargs, inputs, versions, exc)
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
        entry.run = self._make_runner(gm)
        self._cache[key] = entry
        self._traces += 1
        return _unflatten(out_struct, out_leaves)

    def _check_graph(self, gm, captured):
        for o in captured["leaves"]:
            if isinstance(o, torch.Tensor) and (type(o) is not torch.Tensor and type(o) is not torch.nn.Parameter
                                                or o.layout is not torch.strided):
                return DataDependentError(
                    f"the function returned a {type(o).__name__} with layout {o.layout} (e.g. a ragged result "
                    "of per-example shapes), which a fixed graph cannot reproduce"
                )
            if not isinstance(o, torch.Tensor) and not isinstance(o, _CONSTANT_OUTPUTS):
                # e.g. vjp's vjp_fn or linearize's jvp_fn: a closure over this run's tensors
                return _Unreplayable(
                    f"the function returned a {type(o).__name__} (e.g. vjp_fn), which a replayed graph cannot "
                    "reproduce: only tensors and constants (numbers, strings, dtypes ...) can be returned"
                )
        bad = _dynamic_shape_nodes(gm)
        if bad:
            ops = ", ".join(sorted({str(n.target) for n in bad}))
            return DataDependentError(
                f"the traced function uses operations whose output shape depends on tensor values ({ops}); "
                "a replayed graph would freeze those shapes"
            )
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return None

    def _make_runner(self, gm):
        if self._backend is None:
            return _replay_fn(gm)
        return _BackendRunner(self, gm)

    def _trace_failed(self, key, args, kwargs, inputs, versions, exc):
        name = getattr(self._fn, "__name__", "the function")
        mutated = any(t._version != v for t, v in zip(inputs, versions))
        if not _is_data_dependent(exc):
            if self._strict or mutated:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(raised while pyfunctorch.compile traced {name})")
                raise exc
            out = self._fn(*args, **kwargs)  # an error of the function itself surfaces here
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
        self._cache[key] = entry
        self._warn_once(what, msg)


class _NotStraight(Exception):
    pass


def _replay_fn(gm):
    try:
        return _straight_line(gm)
    except (_NotStraight, SyntaxError):  # pragma: no cover - make_fx graphs are straight-line aten calls
        return gm.forward


class _BackendRunner:
    """``torch.compile(graph_module, backend=...)``, compiled on its first call. If the
    backend fails there (no C++ compiler, an unsupported op ...) and the plain replay
    works, warn once and replay the graph instead (``strict=True`` re-raises)."""

    def __init__(self, owner: "CompiledFunction", gm):
        self.owner = owner
        self.gm = gm
        self.compiled = torch.compile(gm, backend=owner._backend, dynamic=False, fullgraph=True)
        self.run = self._first

    def __call__(self, *tensors):
        return self.run(*tensors)

    def _first(self, *tensors):
        try:
            out = self.compiled(*tensors)
        except Exception as exc:  # noqa: BLE001
            if self.owner._strict:
                raise
            replay = _replay_fn(self.gm)
            out = replay(*tensors)  # raises too if the graph itself fails on these inputs
            self.run = replay
            self.owner._warn_once(
                ("backend", type(exc).__name__),
                f"pyfunctorch.compile: backend {self.owner._backend!r} failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]}); replaying the traced graph without it.",
            )
            return out
        self.run = self.compiled
        return out


_LITERALS = (int, bool, str, type(None))


def _straight_line(gm: torch.fx.GraphModule) -> Callable:
    """The graph as one straight-line Python function that calls each aten op's C++
    entry point (``OpOverload._op``) directly: the FX-generated ``forward`` goes through
    ``OpOverload.__call__``, a Python frame per op (~0.3-0.5 us). Intermediates are
    deleted after their last use, as FX's own code does."""
    nodes = list(gm.graph.nodes)
    names: dict = {}
    glb: dict = {}
    lines: list = []
    params: list = []
    last_use: dict = {}
    for i, n in enumerate(nodes):
        for m in n.all_input_nodes:
            last_use[m] = i

    def const(obj) -> str:
        if type(obj) in _LITERALS or (type(obj) is float and obj == obj and obj not in (float("inf"), float("-inf"))):
            return repr(obj)
        g = f"_k{len(glb)}"
        glb[g] = obj
        return g

    def render(a) -> str:
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, list) or (isinstance(a, tuple) and not hasattr(a, "_fields")):
            inner = ", ".join(render(b) for b in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, (list, tuple, dict, slice, torch.fx.Node)):
            raise _NotStraight(type(a))
        return const(a)

    out_expr = None
    for i, n in enumerate(nodes):
        v = f"v{i}"
        if n.op == "placeholder":
            names[n] = v
            params.append(v)
            continue
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            names[n] = const(obj)
            continue
        if n.op == "call_function":
            fn = n.target
            if isinstance(fn, torch._ops.OpOverload):
                fn = getattr(fn, "_op", fn)
            g = f"_f{len(glb)}"
            glb[g] = fn
            if any(keyword.iskeyword(k) or not k.isidentifier() for k in n.kwargs):
                raise _NotStraight(f"keyword argument names {list(n.kwargs)}")
            args = [render(a) for a in n.args] + [f"{k}={render(a)}" for k, a in n.kwargs.items()]
            lines.append(f"    {v} = {g}({', '.join(args)})")
            names[n] = v
        elif n.op == "output":
            out_expr = render(n.args[0])
            continue
        else:
            raise _NotStraight(n.op)
        dead = [names[m] for m in n.all_input_nodes if last_use.get(m) == i and names[m].startswith("v")]
        if n.users == {} and n.op == "call_function":
            dead.append(v)
        if dead:
            lines.append(f"    del {', '.join(sorted(set(dead)))}")
    src = f"def replay({', '.join(params)}):\n" + "\n".join(lines + [f"    return {out_expr}"]) + "\n"
    code = builtins_compile(src, f"<pyfunctorch.compile replay {id(gm):x}>", "exec")
    ns = dict(glb)
    exec(code, ns)
    fn = ns["replay"]
    fn._pyfunctorch_source = src
    return fn


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
