"""Trace-time helpers: data-dependence checks, trace-error classification, RNG state, nested torch.compile."""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

from .. import _core
from ..errors import DataDependentError, is_torch_internal_assert


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


_COMPILE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PKG_DIR = os.path.dirname(_COMPILE_DIR.rstrip(os.sep)) + os.sep


def _user_site(tb) -> str:
    """Where tracing failed, as 'file:line (func)': the innermost traceback frame in the
    user's code (outside torch and pyfunctorch), else the innermost outside torch."""
    user = lib = None
    for frame, lineno in traceback.walk_tb(tb):
        fname = frame.f_code.co_filename
        if _torch_or_generated(fname) or fname.startswith(_COMPILE_DIR):
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



# Where the tracer itself raises (make_fx's proxy mode, fake tensors, dynamo, the dispatch
# helpers): an exception whose innermost frame is in one of these is the tracer's failure.
# Anything else -- a ``raise`` in the user's code, pyfunctorch's own checks, an operator's
# error (its innermost Python frame is torch/_ops.py, calling the kernel) -- would happen
# eagerly too.
_TRACER_PATHS = tuple(
    os.sep + os.path.join("torch", *p.split("/")) for p in
    ("fx/", "_subclasses/", "_dynamo/", "utils/_python_dispatch.py", "_guards.py", "_higher_order_ops/")
)


def _is_tracer_error(exc: BaseException) -> bool:
    """Did the tracer (not the traced function) raise ``exc``? Also where torch failed one of
    its internal checks (``INTERNAL ASSERT FAILED``, possibly as the cause of a pyfunctorch
    error): never the function's own error, and seen only while tracing (fuzzer seed 105118: an
    empty batch under jvp, where the eager run computes the result); the eager run decides."""
    if is_torch_internal_assert(exc):
        return True
    last = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        last = frame.f_code.co_filename
    if last is None:
        return False
    return any(p in last for p in _TRACER_PATHS)


# -- checks of a finished trace, RNG state, nested torch.compile -------------------------


class _Unreplayable(TypeError):
    """The traced function returned something a graph cannot reproduce (a closure ...)."""


_CONSTANT_OUTPUTS = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.layout,
                     torch.memory_format, torch.Size)


def _check_graph(gm, captured):
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


def _rng_state():
    """torch's global generator states (CPU, and CUDA where initialized)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def _nested_dynamo_runs_eagerly():
    """While tracing, a ``torch.compile``d function called by the traced one runs its
    original Python code (so make_fx records its aten ops) instead of raising dynamo's
    "FX to symbolically trace a dynamo-optimized function" error."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:  # nothing was torch.compiled yet
        yield
        return
    config = dynamo.config
    saved = config.error_on_nested_fx_trace
    config.error_on_nested_fx_trace = False
    try:
        yield
    finally:
        config.error_on_nested_fx_trace = saved
