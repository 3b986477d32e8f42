"""``torch.autograd.Function`` under pyfunctorch transforms.

``Function.apply`` is not an op: it never reaches ``__torch_dispatch__``, and torch
runs ``forward`` under ``no_grad``, so without help a grad level above a custom
Function records nothing of it, and ``grad(grad(F.apply))`` is silently wrong.
While a transform is live, ``Function.apply`` is therefore replaced by
:func:`custom_function_call`, which handles one level at a time, from the highest
level among the arguments down (as functorch does):

- **grad level L**: unwrap the L-wrappers, call the Function on the inner values
  (which handles the lower levels), wrap the outputs at L and connect them to L's
  graph with a *bridge* ``autograd.Function`` applied to the L-wrappers. The bridge's
  ``setup_context`` is the user's, run on the L-level inputs and outputs (so the saved
  tensors are L-level wrappers and higher derivatives are right); its ``backward`` is
  the user's ``backward`` (so a custom backward is used, not the derivative of forward).
- **jvp level L**: the same, the bridge providing forward mode through the user's
  ``jvp`` staticmethod (a clear error if there is none).
- **vmap level L**: ``generate_vmap_rule = True`` runs ``forward``, ``setup_context``,
  ``backward`` and ``jvp`` under a fresh vmap of the unwrapped values (a generated
  Function, applied to the lower levels); a user ``vmap`` staticmethod is called with
  ``(info, in_dims, *args)``; with neither, the Function runs once per example (slow
  but correct; torch.func raises here) with a ``PerformanceWarning``.
- **no live level among the arguments**: the real ``Function.apply``.

While a level is processed, the interpreters of that level and above are taken off
the stack (functorch's ``interpreter.lower()``), so tensors the Function creates
(``torch.zeros`` ...) and random calls belong to the levels below only.

A backward formula that writes the batched grad_output in place into scratch it made
from unbatched values (``BatchedWriteError``) is re-run once per example
(:func:`call_backward`): for the user's Functions, and for the autograd kernels of
``torch.library`` custom ops (their ``register_autograd`` formulas).

Old-style Functions (``forward(ctx, ...)`` without ``setup_context``) raise a clear
error when they meet a transformed tensor, as in torch.func. Old-style Functions
defined inside torch itself (torch.library's autograd kernels, which run *inside* an
op's dispatch) keep the real ``apply``.

Known limits: the level is chosen from the tensor *arguments*, so a forward that
closes over transformed tensors (instead of taking them as arguments) is not seen;
under a generated vmap rule, tensors put on ``ctx`` as attributes are re-batched
only when they are the attribute's value itself (not inside a list/dict); the
per-example loop (no vmap rule) does not apply vmap's ``randomness`` flag.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.autograd.function import Function, _SingleLevelFunction

from . import _core
from ._core import push_interpreter
from .batched import BatchedTensor, BatchedWriteError, PerformanceWarning, VmapInterpreter
from .forward import JvpTensor
from .reverse import GradTensor

__all__ = ["custom_function_call", "VmapInfo"]

_ORIG_APPLY = Function.__dict__["apply"]  # a classmethod object


def _orig_apply(cls, *args, **kwargs):
    """The real ``Function.apply`` (level 0), also while the entry point is installed."""
    return _orig_apply_fn(cls, *args, **kwargs)


class VmapInfo(NamedTuple):
    """What a user ``vmap`` staticmethod receives as ``info``."""

    batch_size: int
    randomness: str


# -- what kind of Function is it ------------------------------------------------------


def _has_setup_context(cls) -> bool:
    return cls.setup_context is not _SingleLevelFunction.setup_context


def _has_jvp(cls) -> bool:
    return cls.jvp is not _SingleLevelFunction.jvp


def _has_vmap(cls) -> bool:
    return cls.vmap is not Function.vmap


def _user_backward(cls):
    bwd, vjp = cls.backward, cls.vjp
    if bwd is not Function.backward and vjp is not Function.vjp:
        raise RuntimeError(
            f"{cls.__name__}: implementing both 'backward' and 'vjp' for a custom Function is not allowed. "
            "You should only implement one of them."
        )
    return vjp if vjp is not Function.vjp else bwd


def _old_style_error(cls) -> RuntimeError:
    return RuntimeError(
        f"pyfunctorch: the autograd.Function {cls.__name__} was called on a tensor of a pyfunctorch transform "
        "(vmap, grad, vjp, jvp, jacrev, jacfwd, hessian), but it defines `forward(ctx, ...)` without a separate "
        "`setup_context` staticmethod. Transforms need the two split, as in torch.func: write "
        "`forward(*args)` (no ctx) that only computes the outputs, and "
        "`setup_context(ctx, inputs, output)` that saves what backward/jvp need "
        "(ctx.save_for_backward / ctx.save_for_forward). "
        "See https://pytorch.org/docs/stable/notes/extending.func.html"
    )


def _missing_jvp_error(cls) -> RuntimeError:
    return RuntimeError(
        f"pyfunctorch: the autograd.Function {cls.__name__} is used under forward-mode AD (jvp, jacfwd, "
        f"hessian, linearize), but {cls.__name__} does not define a `jvp` staticmethod. Define "
        "`jvp(ctx, *input_tangents)` returning the output tangents (save what it needs in setup_context, "
        "e.g. with ctx.save_for_forward), or use a reverse-mode transform (grad, vjp, jacrev)."
    )


# -- taking levels off the stack (functorch's interpreter.lower()) ---------------------


@contextmanager
def _lowered(level: int):
    """Run the block with only the interpreters below ``level`` on this thread's stack.
    The removed levels stay alive (their wrappers still dispatch); they are just not
    "current", so factories and random calls inside do not belong to them."""
    st = _core._state
    saved_stack = list(st.stack)
    saved_attrs = st.saved_attrs
    st.stack[:] = [i for i in saved_stack if i.level < level]
    try:
        yield
    finally:
        # (an emptied stack makes a push inside re-install the already installed
        # patches; restoring saved_attrs keeps the originals for the final uninstall)
        st.stack[:] = saved_stack
        st.saved_attrs = saved_attrs


# -- small tree helpers (Function inputs are positional; containers one level deep) ----


def _map_tensors(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map_tensors(fn, y) for y in x)
    return x


def _leaves(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for y in x:
            _leaves(y, out)
    return out


def _has_tensor_kwargs(kwargs) -> bool:
    return bool(kwargs) and bool(_leaves(list(kwargs.values()), []))


def _wrap_outputs(outputs, inner_inputs, orig_inputs, wrap_fn):
    """Wrap a Function's outputs at a level. An output that *is* one of the unwrapped
    inputs becomes that very input wrapper again (mark_dirty / view semantics need the
    identity)."""
    ids = {id(u): o for u, o in zip(_leaves(inner_inputs, []), _leaves(orig_inputs, []))}

    def one(t, *d):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in ids:
            return ids[id(t)]
        return wrap_fn(t, *d)

    if isinstance(outputs, tuple):
        return tuple(one(t) for t in outputs)
    return one(outputs)


# -- the entry point ------------------------------------------------------------------


def _bind(cls, args, kwargs):
    """As torch's apply does for new-style Functions: bind defaults of forward."""
    sig = inspect.signature(cls.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.args), dict(bound.kwargs)


def custom_function_call(cls, args: tuple, kwargs: dict):
    """``cls.apply(*args, **kwargs)`` at the highest live level among the arguments."""
    new_style = _has_setup_context(cls)
    if new_style:
        args, kwargs = _bind(cls, args, kwargs)
    # dead grad/jvp wrappers stand for their values (torch.func: unwrap_dead_wrappers)
    args = tuple(_core._resolve_dead(a) for a in args)
    if kwargs:
        kwargs = {k: _core._resolve_dead(v) for k, v in kwargs.items()}
    top, _ = _core._find_top(args, kwargs or {})
    if top is None:
        out = _orig_apply(cls, *args, **kwargs)
        _check_no_closure(cls, out)
        return out
    if not new_style:
        raise _old_style_error(cls)
    if _has_tensor_kwargs(kwargs):
        raise NotImplementedError(
            f"pyfunctorch: {cls.__name__}.apply got tensors as keyword arguments inside a transform; "
            "pass tensors to an autograd.Function positionally."
        )
    if top.kind == "grad":
        return _grad_rule(top, cls, args, kwargs)
    if top.kind == "jvp":
        return _jvp_rule(top, cls, args, kwargs)
    if top.kind == "vmap":
        return _vmap_rule(top, cls, args, kwargs)
    raise NotImplementedError(f"pyfunctorch: autograd.Function under a {top.kind} level is not supported.")


def _check_no_closure(cls, out) -> None:
    """torch runs forward under no_grad: a forward that reads a differentiated tensor from a
    closure (not an argument) would silently drop its derivative. Refuse instead."""
    for o in _leaves(out if isinstance(out, (tuple, list)) else [out], []):
        if isinstance(o, _core.LevelTensor) and o._interp.alive and o._interp.kind in ("grad", "jvp"):
            raise RuntimeError(
                f"pyfunctorch: {cls.__name__}.forward used a tensor that a {o._interp.kind} transform is "
                "differentiating without receiving it as an argument (e.g. through a closure or a global). "
                "Its derivative would be lost: pass that tensor to apply() as an argument."
            )


# -- grad and jvp levels: a bridge Function on the level's wrappers ---------------------

_tls = threading.local()


def _pending() -> list:
    p = getattr(_tls, "pending", None)
    if p is None:
        p = _tls.pending = []
    return p


def _bridge(cls):
    """A Function applied to one level's wrappers: its forward returns the outputs
    computed below (handed over through ``_pending``), its setup_context / backward /
    jvp are the user's."""
    b = cls.__dict__.get("_pyfunctorch_bridge")
    if b is not None:
        return b
    user_bwd = _user_backward(cls)
    boxed = bool(getattr(cls, "boxed_grads_call", False))

    def forward(*operands):
        return _pending().pop()

    def setup_context(ctx, inputs, output):
        ctx._pyfunctorch_interp = _core._find_top(inputs, {})[0]
        return cls.setup_context(ctx, inputs, output)

    def backward(ctx, *grads):
        # vjp_fn runs this after its level ended, possibly with no transform live: a
        # Function called by the user's backward must still see the (dead) wrappers
        # resolved, so keep the entry point installed meanwhile (torch.func: apply
        # always unwraps dead wrappers).
        with _entry_installed():
            return call_backward(user_bwd, ctx, grads, cls.__name__)

    def jvp(ctx, *tangents):
        # The tangents as tensors of this level: the user's jvp mixes them with saved
        # tensors of this level, in place too (mark_dirty Functions update the tangent).
        interp = ctx._pyfunctorch_interp
        if interp is None or interp.kind != "jvp":
            return cls.jvp(ctx, *tangents)
        lifted = {}

        def lift(t):
            if not isinstance(t, torch.Tensor) or (isinstance(t, JvpTensor) and t._interp is interp):
                return t
            w = JvpTensor(t, interp)
            lifted[id(w)] = t
            return w

        out = cls.jvp(ctx, *(lift(t) for t in tangents))
        # a tangent returned as-is (the in-place case) must be the input's own tangent
        if isinstance(out, tuple):
            return tuple(lifted.get(id(o), o) for o in out)
        return lifted.get(id(out), out)

    b = type(
        cls.__name__,
        (Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "boxed_grads_call": boxed,
            "clear_saved_tensors_on_access": bool(getattr(cls, "clear_saved_tensors_on_access", False)),
            "__module__": getattr(cls, "__module__", __name__),
            "__qualname__": getattr(cls, "__qualname__", cls.__name__),
        },
    )
    try:
        setattr(cls, "_pyfunctorch_bridge", b)
    except (AttributeError, TypeError):  # pragma: no cover - exotic metaclass
        pass
    return b


def _unwrap_level(x, cls_, interp):
    return _map_tensors(lambda t: t._value if isinstance(t, cls_) and t._interp is interp else t, x)


def _through_bridge(interp, cls, args, kwargs, wrapper_cls):
    inner = tuple(_unwrap_level(a, wrapper_cls, interp) for a in args)
    with _lowered(interp.level):
        inner_out = custom_function_call(cls, inner, kwargs)
    wrapped = _wrap_outputs(inner_out, inner, args, lambda t: wrapper_cls(t, interp))
    pend = _pending()
    pend.append(wrapped)
    n = len(pend)
    try:
        with _lowered(interp.level + 1):
            return _orig_apply(_bridge(cls), *args)
    finally:
        del pend[n - 1 :]  # forward did not run (an error before it): drop the hand-over


def _grad_rule(interp, cls, args, kwargs):
    if _core._state.jvp_depth:
        # tangents of lower jvp levels must not reach this level's bridge (trap 5)
        args, _ = _core.lift_mixed(args, {})
    return _through_bridge(interp, cls, args, kwargs, GradTensor)


def _jvp_rule(interp, cls, args, kwargs):
    args, _ = _core.lift_mixed(args, {})
    if not _has_jvp(cls):
        for t in _leaves(args, []):
            if isinstance(t, JvpTensor) and t._interp is interp and _core._is_dual(t):
                raise _missing_jvp_error(getattr(cls, "_pyf_origin", cls))
    return _through_bridge(interp, cls, args, kwargs, JvpTensor)


# -- vmap levels ----------------------------------------------------------------------


def _unwrap_batched(x, interp):
    """(physical value, bdim) for a top-level argument; nested containers give nested dims."""
    if isinstance(x, BatchedTensor) and x._interp is interp:
        if x._lazy:  # created inside, never written per example: unbatched
            return x._value.select(0, 0), None
        return x._value, x._bdim
    if isinstance(x, (tuple, list)) and any(isinstance(y, torch.Tensor) for y in x):
        pairs = [_unwrap_batched(y, interp) for y in x]
        dims = tuple(d for _, d in pairs)
        return type(x)(v for v, _ in pairs), (dims if any(d is not None for d in dims) else None)
    return x, None


def _norm_dim(d, t):
    return d % t.dim() if d < 0 else d


def _wrap_tree(x, d, interp):
    if d is None or x is None:
        return x
    if isinstance(x, torch.Tensor):
        if not isinstance(d, int):
            raise ValueError(f"pyfunctorch: expected an int batch dim for a tensor, got {d!r}.")
        return BatchedTensor(x, _norm_dim(d, x), interp)
    if isinstance(x, (tuple, list)):
        if isinstance(d, int):
            return type(x)(_wrap_tree(y, d, interp) for y in x)
        if isinstance(d, (tuple, list)) and len(d) == len(x):
            return type(x)(_wrap_tree(y, e, interp) for y, e in zip(x, d))
        raise ValueError(f"pyfunctorch: batch dims {d!r} do not match the structure of {type(x).__name__} of length {len(x)}.")
    return x


def _unwrap_tree(x, interp):
    if isinstance(x, BatchedTensor) and x._interp is interp:
        if x._lazy:
            return x._value.select(0, 0), None
        return x._value, x._bdim
    if isinstance(x, (tuple, list)):
        pairs = [_unwrap_tree(y, interp) for y in x]
        return type(x)(v for v, _ in pairs), tuple(d for _, d in pairs)
    return x, None


def _run_vmapped(fn, args, dims, batch_size, randomness):
    """functorch's restore_vmap: run ``fn(interp, *args)`` under a fresh vmap level with
    ``args`` batched at ``dims``; returns (physical outputs, their batch dims)."""
    interp = VmapInterpreter(batch_size, randomness)
    with push_interpreter(interp):
        wrapped = _wrap_tree(tuple(args), tuple(dims), interp)
        out = fn(interp, *wrapped)
        return _unwrap_tree(out, interp)


def _vmap_rule(interp, cls, args, kwargs):
    pairs = [_unwrap_batched(a, interp) for a in args]
    phys = tuple(v for v, _ in pairs)
    in_dims = tuple(d for _, d in pairs)
    if all(d is None for d in in_dims):  # only lazy (unbatched) tensors of this level
        with _lowered(interp.level):
            return custom_function_call(cls, phys, kwargs)
    gen = bool(getattr(cls, "generate_vmap_rule", False))
    has_vmap = _has_vmap(cls)
    if gen and has_vmap:
        raise RuntimeError(
            f"pyfunctorch.vmap: {cls.__name__} has both generate_vmap_rule=True and a vmap staticmethod. "
            "Set generate_vmap_rule=False or delete the vmap staticmethod to avoid ambiguity."
        )
    B, randomness = interp.batch_size, interp.randomness
    if gen:
        vm = _vmapify(cls, in_dims, B, randomness)
        with _lowered(interp.level):
            res = custom_function_call(vm, phys, kwargs)
        outputs, out_dims = _unpack_outputs(res)
    elif has_vmap:
        return run_vmap_rule(interp, cls.vmap, f"the vmap staticmethod of {cls.__name__}", cls.__name__, phys,
                             in_dims, args, kwargs)
    else:
        return _loop(interp, cls, phys, in_dims, kwargs)
    return _wrap_batched_outputs(interp, cls.__name__, outputs, out_dims, phys, args)


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


def _unpack_outputs(outputs):
    """A generated Function returns (*outputs, out_dims) or (output, out_dim)."""
    out_dims = outputs[-1]
    if isinstance(out_dims, tuple):
        return tuple(outputs[:-1]), out_dims
    return outputs[0], out_dims


_WARNED_LOOP: set = set()


def _loop(interp, cls, phys, in_dims, kwargs):
    """No vmap rule: run the Function once per example (torch.func raises instead)."""
    if cls not in _WARNED_LOOP:
        _WARNED_LOOP.add(cls)
        warnings.warn(
            f"pyfunctorch.vmap: the autograd.Function {cls.__name__} has neither generate_vmap_rule = True nor a "
            "vmap staticmethod; running it once per example (correct but slow; torch.func would raise). Set "
            "generate_vmap_rule = True (if forward/setup_context/backward are written with batchable torch ops) "
            "or define vmap to batch it.",
            PerformanceWarning,
            stacklevel=4,
        )

    def select(x, d, b):
        if d is None:
            return x
        if isinstance(x, torch.Tensor):
            return x.select(d, b)
        return type(x)(select(y, e, b) for y, e in zip(x, d))

    outs = []
    with _lowered(interp.level):
        for b in range(interp.batch_size):
            outs.append(custom_function_call(cls, tuple(select(x, d, b) for x, d in zip(phys, in_dims)), kwargs))

        def combine(col):
            first = col[0]
            if isinstance(first, torch.Tensor):
                shapes = {tuple(c.shape) for c in col}
                if len(shapes) != 1:
                    raise RuntimeError(
                        f"pyfunctorch.vmap: {cls.__name__} returned tensors of different shapes for different "
                        f"examples ({sorted(shapes)[:3]}); a batched output needs one shape."
                    )
                return BatchedTensor(torch.stack(col), 0, interp)
            try:
                same = all(c is first or bool(c == first) for c in col)
            except Exception:  # e.g. numpy arrays
                same = False
            if same:
                return first
            raise RuntimeError(
                f"pyfunctorch.vmap: {cls.__name__} returned a different non-tensor output for different examples."
            )

        if isinstance(outs[0], tuple):
            return tuple(combine(list(col)) for col in zip(*outs))
        return combine(outs)


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


# -- generate_vmap_rule: the Function vmapped over one level --------------------------


class _Stashed:
    """A tensor the user put on ctx as an attribute (``ctx.y = y``) under a generated
    vmap rule: its physical value and its batch dim at each enclosing generated level
    (outermost first), re-batched when backward/jvp read it."""

    __slots__ = ("value", "dims")

    def __init__(self, value, dims):
        self.value, self.dims = value, dims


def _stash(value, interp):
    if isinstance(value, _Stashed):
        t, rest = value.value, value.dims
    elif isinstance(value, torch.Tensor):
        t, rest = value, []
    else:
        return value
    if isinstance(t, BatchedTensor) and t._interp is interp:
        return _Stashed(t._value, [t._bdim] + rest)
    if rest:
        return _Stashed(t, [None] + rest)
    return value


def _unstash(value, interp):
    if not isinstance(value, _Stashed):
        return value
    d, rest = value.dims[0], value.dims[1:]
    t = value.value if d is None else BatchedTensor(value.value, d, interp)
    return _Stashed(t, rest) if rest else t


class _WrappedCtx:
    """Forwards attribute access to the real ctx; tensors batched at this generated
    level are stored unbatched (with their batch dims) and re-batched on reading."""

    _pyf_own = ("_pyf_inner", "_pyf_interp")

    def __init__(self, ctx, interp):
        object.__setattr__(self, "_pyf_inner", ctx)
        object.__setattr__(self, "_pyf_interp", interp)

    def __getattr__(self, name):
        return _unstash(getattr(self._pyf_inner, name), self._pyf_interp)

    def __setattr__(self, name, value):
        if name in type(self)._pyf_own:
            object.__setattr__(self, name, value)
        else:
            setattr(self._pyf_inner, name, _stash(value, self._pyf_interp))


class _CtxSave(_WrappedCtx):
    """ctx in setup_context under a generated vmap rule: save_for_backward/forward store
    physical values and remember their batch dims."""

    _pyf_own = _WrappedCtx._pyf_own + ("_pyf_bwd_dims", "_pyf_fwd_dims")

    def __init__(self, ctx, interp):
        super().__init__(ctx, interp)
        object.__setattr__(self, "_pyf_bwd_dims", ())
        object.__setattr__(self, "_pyf_fwd_dims", ())

    def _phys(self, tensors):
        vals, dims = [], []
        for t in tensors:
            if isinstance(t, BatchedTensor) and t._interp is self._pyf_interp:
                if t._lazy:
                    vals.append(t._value.select(0, 0))
                    dims.append(None)
                else:
                    vals.append(t._value)
                    dims.append(t._bdim)
            else:
                vals.append(t)
                dims.append(None)
        return vals, tuple(dims)

    def save_for_backward(self, *tensors):
        vals, dims = self._phys(tensors)
        self._pyf_inner.save_for_backward(*vals)
        object.__setattr__(self, "_pyf_bwd_dims", dims)

    def save_for_forward(self, *tensors):
        vals, dims = self._phys(tensors)
        self._pyf_inner.save_for_forward(*vals)
        object.__setattr__(self, "_pyf_fwd_dims", dims)

    def mark_non_differentiable(self, *tensors):
        self._pyf_inner.mark_non_differentiable(*self._phys(tensors)[0])

    def mark_dirty(self, *tensors):
        self._pyf_inner.mark_dirty(*self._phys(tensors)[0])


class _CtxRead(_WrappedCtx):
    """ctx in backward/jvp under a generated vmap rule: saved tensors re-batched."""

    _pyf_own = _WrappedCtx._pyf_own + ("_pyf_saved",)

    def __init__(self, ctx, interp, saved):
        super().__init__(ctx, interp)
        object.__setattr__(self, "_pyf_saved", tuple(saved))

    @property
    def saved_tensors(self):
        return self._pyf_saved


def _book(ctx, name) -> dict:
    try:
        d = getattr(ctx, name)
    except AttributeError:
        d = {}
        setattr(ctx, name, d)
    return d


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _reductify(grads, grad_dims, in_dims, B, shapes=None):
    """Bring per-input results to the input's batch dim (sum over the batch for an
    unbatched input, expand for a batched input with an unbatched result); with
    ``shapes`` also reduce per-example broadcasting to the input's shape."""
    grads, grad_dims, in_dims = _as_tuple(grads), _as_tuple(grad_dims), _as_tuple(in_dims)
    if shapes is None:
        shapes = (None,) * len(grads)
    if len(in_dims) < len(grads):
        in_dims = in_dims + (None,) * (len(grads) - len(in_dims))
    return tuple(_reductify_leaf(g, gd, d, B, s) for g, gd, d, s in zip(grads, grad_dims, in_dims, shapes))


def _reductify_leaf(g, gd, d, B, shape):
    if g is None or not isinstance(g, torch.Tensor):
        return g
    if not isinstance(d, int):  # unbatched (or non-tensor / nested) input
        d = None
    if gd is None and d is None:
        return g
    if d is None:
        return g.sum(gd)
    if gd is None:
        g = g.unsqueeze(0).expand((B,) + tuple(g.shape))
    else:
        g = g.movedim(gd, 0)
    if shape is not None:
        shape = tuple(shape)
        extra = g.dim() - 1 - len(shape)
        if extra > 0:
            g = g.sum(dim=tuple(range(1, 1 + extra)))
        red = [i + 1 for i, s in enumerate(shape) if s == 1 and g.shape[i + 1] != 1]
        if red:
            g = g.sum(dim=red, keepdim=True)
    return g.movedim(0, d) if d else g


def _vmapify(cls, in_dims, B, randomness):
    """A Function equal to ``cls`` vmapped over one level (the inputs batched at
    ``in_dims``): forward/setup_context/backward/jvp of ``cls`` under a fresh vmap."""
    user_bwd = _user_backward(cls)
    boxed = bool(getattr(cls, "boxed_grads_call", False))

    def forward(*operands, **kw):
        outputs, out_dims = _run_vmapped(lambda _i, *a: cls.forward(*a, **kw), operands, in_dims, B, randomness)
        if isinstance(outputs, torch.Tensor) or not isinstance(outputs, tuple):
            return outputs, out_dims
        return (*outputs, out_dims)

    def setup_context(ctx, inputs, outputs):
        outs, out_dims = _unpack_outputs(outputs)
        key = id(Vmapped)

        def inner(interp, inputs_b, outs_b):
            wctx = _CtxSave(ctx, interp)
            cls.setup_context(wctx, tuple(inputs_b), outs_b)
            _book(ctx, "_pyf_bk_input_shapes")[key] = tuple(
                tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs_b
            )
            _book(ctx, "_pyf_bk_bwd_dims")[key] = wctx._pyf_bwd_dims
            _book(ctx, "_pyf_bk_fwd_dims")[key] = wctx._pyf_fwd_dims

        _run_vmapped(inner, (tuple(inputs), outs), (tuple(in_dims), out_dims), B, randomness)
        _book(ctx, "_pyf_bk_out_dims")[key] = out_dims

    def backward(ctx, *grad_outputs):
        key = id(Vmapped)
        gouts = grad_outputs[:-1]
        od = _as_tuple(ctx._pyf_bk_out_dims[key])
        g_dims = tuple(d if g is not None else None for g, d in zip(gouts, od))
        saved = tuple(ctx.saved_tensors)
        s_dims = ctx._pyf_bk_bwd_dims[key]
        s_dims = s_dims + (None,) * (len(saved) - len(s_dims))

        def inner(interp, saved_b, gouts_b):
            wctx = _CtxRead(ctx, interp, saved_b)
            if boxed:
                return user_bwd(wctx, list(gouts_b))
            return user_bwd(wctx, *gouts_b)

        grads, grad_dims = _run_vmapped(inner, (saved, tuple(gouts)), (s_dims, g_dims), B, randomness)
        return _reductify(grads, grad_dims, in_dims, B, ctx._pyf_bk_input_shapes[key])

    def jvp(ctx, *tangents):
        key = id(Vmapped)
        t_dims = tuple(None if t is None else d for t, d in zip(tangents, in_dims))
        s_dims = ctx._pyf_bk_fwd_dims[key]
        saved = tuple(ctx.saved_tensors) if s_dims else ()

        def inner(interp, saved_b, tans_b):
            return cls.jvp(_CtxRead(ctx, interp, saved_b), *tans_b)

        outs, o_dims = _run_vmapped(inner, (saved, tuple(tangents)), (s_dims, t_dims), B, randomness)
        res = _reductify(outs, o_dims, ctx._pyf_bk_out_dims[key], B)
        return (*res, None)

    Vmapped = type(
        f"Vmapped{cls.__name__}",
        (Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp) if _has_jvp(cls) else Function.jvp,
            "generate_vmap_rule": True,
            "_pyf_origin": getattr(cls, "_pyf_origin", cls),
            "__module__": getattr(cls, "__module__", __name__),
        },
    )
    return Vmapped


# -- installing the entry point -----------------------------------------------------------
#
# ``_core.patch_while_active`` cannot express this patch: it installs a plain-function
# wrapper with ``setattr``, which (1) loses the classmethod binding of ``Function.apply``
# (``MyFn.apply(x)`` would not see ``MyFn``) and (2) misses every ``MyFn.apply`` bound
# *before* the transform started (``vmap(MyFn.apply)``, ``jacrev(MyFn.apply)``: the
# bound method holds the original function). So the original function's *code* is
# swapped instead, registered in ``_core._PATCHES`` with the same install/uninstall
# timing as every other patch (only while a transform is live; other threads see the
# entry check their own, empty, stack and go to the original). The original code keeps
# running as a copy of the function (``_orig_apply_fn``).


def _apply_entry(cls, args, kwargs):
    if not _core._state.stack:
        # (installed only by _entry_installed: a backward run after its level ended)
        if any(isinstance(a, _core.LevelTensor) for a in _leaves(list(args) + list(kwargs.values()), [])):
            args = tuple(_core._resolve_dead(a) for a in args)
            kwargs = {k: _core._resolve_dead(v) for k, v in kwargs.items()}
        return _orig_apply_fn(cls, *args, **kwargs)
    if _is_torch_internal_old_style(cls):
        if cls.__module__ == "torch._library.autograd" and "apply" not in cls.__dict__:
            # a torch.library custom op's autograd kernel: its backward may later run under
            # a vmap (vmap(grad), or vmap over a vjp_fn) and need the per-example re-run
            cls = _per_example_backward_class(cls)
        return _orig_apply_fn(cls, *args, **kwargs)
    return custom_function_call(cls, args, kwargs)


@contextmanager
def _entry_installed():
    fn = _APPLY_FN
    if fn.__code__ is _ENTRY_CODE:
        yield
        return
    fn.__code__ = _ENTRY_CODE
    try:
        yield
    finally:
        fn.__code__ = _APPLY_CODE


def _is_torch_internal_old_style(cls) -> bool:
    """Old-style Functions defined inside torch keep the real apply, as before this
    module: some run *inside* an op's dispatch (torch.library's autograd kernels, e.g.
    for prims reached through a decomposition), where the levels are already handled."""
    if _has_setup_context(cls):
        return False
    mod = getattr(cls, "__module__", None) or ""
    return mod == "torch" or mod.startswith("torch.")


def _entry_code():
    __class__ = None  # one free variable, like the original (its super() cell)

    def apply(cls, *args, **kwargs):
        __class__  # noqa: B018
        from pyfunctorch.custom_function import _apply_entry

        return _apply_entry(cls, args, kwargs)

    return apply.__code__


_APPLY_FN = _ORIG_APPLY.__func__
_orig_apply_fn = types.FunctionType(
    _APPLY_FN.__code__, _APPLY_FN.__globals__, _APPLY_FN.__name__, _APPLY_FN.__defaults__, _APPLY_FN.__closure__
)
_orig_apply_fn.__kwdefaults__ = _APPLY_FN.__kwdefaults__
_orig_apply_fn.__qualname__ = _APPLY_FN.__qualname__
_ENTRY_CODE = _entry_code()
_APPLY_CODE = _APPLY_FN.__code__
assert len(_ENTRY_CODE.co_freevars) == len(_APPLY_FN.__closure__ or ()), "torch changed Function.apply"
_core._PATCHES.append((_APPLY_FN, "__code__", _APPLY_FN.__code__, _ENTRY_CODE))
