"""The core: levels, the interpreter stack and the wrapper-tensor base class.

Every transform call pushes an :class:`Interpreter` with a fresh, ever-increasing
integer level and pops it on exit (also on exceptions). Each level wraps the
tensors it transforms in a subclass of :class:`LevelTensor`, which carries
``(value, interpreter)``. ``LevelTensor.__torch_dispatch__`` peels the highest
live level among an op's arguments and hands the op to that level's
interpreter; the interpreter runs the op on the inner values (which may be
wrappers of lower levels, so dispatch recurses downwards) and rewraps.

Tensors of lower levels that an inner function closes over are constants at
the inner level: that is what keeps nested transforms free of perturbation
confusion.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.autograd.forward_ad as _fwAD
import torch._decomp  # noqa: F401  imported before any transform is live: some of torch's

with warnings.catch_warnings():  # torch's own module jit-scripts its decompositions at import, which
    # torch 2.13 reports as a DeprecationWarning (2.15: a FutureWarning); `python -W error -c "import
    # pyfunctorch"` must stay quiet
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script", category=FutureWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401  lazy imports jit-script torch.zeros & co.

from ._ops import _InplaceViewAliases, _OpSet, _mutated_returns, _return_aliases, aten_equivalent  # noqa: F401
from ._patching import (  # noqa: F401  (re-exported: the core's API for patches.py and the transforms)
    _PATCHES, _install_patches, _uninstall_patches, patch_while_active, hold_entry_points, swap_code_while_active,
)
from . import _saved_hooks
from ._state import _State, _state  # noqa: F401
from .errors import EscapedTensorError, MixedTransformsError

aten = torch.ops.aten

_level_counter = itertools.count(1)


def interpreter_stack() -> list["Interpreter"]:
    """The live interpreters of this thread, innermost last."""
    return _state.stack


class Interpreter:
    """One transform level. Subclasses implement :meth:`process` and :meth:`lift`."""

    kind = "base"
    # Differentiation levels run with inference mode off (as torch.func): autograd must
    # record this level's graph even when the transform is called under inference_mode.
    disables_inference_mode = False

    def __init__(self) -> None:
        self.level = next(_level_counter)
        self.alive = True
        # Trap 1: inside __torch_dispatch__ torch excludes autograd and every key
        # above Python. Ops on inner values must run with the key set that was in
        # force when this level was created.
        self.exclude = torch._C._dispatch_tls_local_exclude_set()

    def dispatch(self, func, args: tuple, kwargs: dict) -> Any:
        """Entry from ``__torch_dispatch__``: restore the level's key set, then ``process``."""
        if func is _IS_SAME_SIZE or func is _SAME_STORAGE_NUMEL:
            return _metadata_query(func, args)
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), self.exclude):
            return self.process(func, args, kwargs)

    def process(self, func, args: tuple, kwargs: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def lift(self, tensor: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Wrap a lower-level tensor as an unperturbed tensor of this level."""
        raise NotImplementedError

    def carries_derivative(self, t: "LevelTensor") -> bool:
        """Whether this level's wrapper ``t`` carries a derivative of this level."""
        return True

    def _writes_derivative(self, args, kwargs) -> bool:
        # Only a written value that carries this level's derivative would lose it; e.g.
        # forward AD updating a lower-level tangent in place writes a constant of this level.
        for a in itertools.chain(args, kwargs.values()):
            for b in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(b, LevelTensor) and b._interp is self and self.carries_derivative(b):
                    return True
        return False

    def wrap_created(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor created inside the transformed function (torch.zeros ...): it belongs
        to this level, so in-place writes of this level's data into it are recorded.
        Marked as created (``_pyf_created``: its version then), so that after the level ends,
        while never written, it is the plain constant it was made as (``_pristine``)."""
        w = self.lift(tensor)
        if w is not tensor:
            w._pyf_created = w._version
        return w

    def check_mutation(self, func, aliased, args, kwargs) -> None:
        """In-place/out= ops at this level must write into this level's own tensors:
        writing into a tensor from outside would silently drop this level's derivative."""
        for w in aliased:
            target = args[w] if isinstance(w, int) else kwargs.get(w)
            if target is None:
                continue
            owned = isinstance(target, LevelTensor) and target._interp is self and not getattr(target, "_pyf_captured", False)
            if not owned and self._writes_derivative(args, kwargs):
                raise RuntimeError(
                    f"pyfunctorch.{self.kind}: the in-place operation {func} writes a value that depends on "
                    f"the inputs being differentiated into a tensor that came from outside the function. "
                    "Its derivative would be lost. Pass that tensor in as an input, create it inside the "
                    "function, or use the out-of-place form (e.g. `y = x + b` instead of `x.add_(b)`)."
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level})"


class WrapperInterpreter(Interpreter):
    """A differentiation level (grad/vjp, jvp): unwrap this level's wrappers, run the op
    on the inner values (lower levels dispatch on their own), rewrap the outputs."""

    wrapper: type  # the LevelTensor subclass of this level
    disables_inference_mode = True

    def carries_derivative(self, t):
        if self.kind == "jvp":
            return _is_dual(t)
        return t.requires_grad

    def lift(self, tensor):
        return self.wrapper(tensor, self)

    def rewrap_detached(self, t):
        """Trap 2: autograd detaches wrappers internally (e.g. to save outputs); that must
        not cut the inner value's graph of lower levels: the same inner value, rewrapped."""
        return self.wrapper(t._value, self)

    def process(self, func, args, kwargs):
        if func is _DETACH:
            return self.rewrap_detached(args[0])
        if func is _ALIAS:  # (a differentiable view of the same value: kept whole at every level)
            return self.wrapper(args[0]._value, self)
        try:
            aliased = func._pyf_alias
        except AttributeError:
            aliased = _mutated_returns(func)
        if aliased is not None:
            self.check_mutation(func, aliased, args, kwargs)
        uargs = tuple([a._value if isinstance(a, LevelTensor) and a._interp is self else
                       unwrap_level(a, self) if isinstance(a, (list, tuple)) else a for a in args])
        ukwargs = {k: unwrap_level(v, self) for k, v in kwargs.items()} if kwargs else kwargs
        if _state.jvp_depth:
            uargs, ukwargs = lift_mixed(uargs, ukwargs)
            out = None
            if not ukwargs:
                if func in ADDITIVE:
                    uargs = zero_tangents_for_constants(uargs)
                elif func in PRODUCTS:
                    out = product_with_constants(func, uargs)
            if out is None:
                out = _run_inner(func, uargs, ukwargs, self.level)
        elif func in _NESTED_DECOMPOSED:
            out = _run_inner(func, uargs, ukwargs, self.level)
        else:  # (_run_inner's common case, inlined: this runs for every op at every level)
            out = func(*uargs, **ukwargs)
        if aliased is not None:
            return _return_aliases(aliased, args, kwargs, out)
        if type(out) is torch.Tensor:
            return self.wrapper(out, self)
        return wrap_level(out, self)


def _differentiated_below(level: int, kinds=("grad", "jvp")) -> bool:
    """Whether a level of one of ``kinds`` below ``level`` is live on this thread."""
    for it in _state.stack:
        if it.level >= level:
            return False
        if it.kind in kinds:
            return True
    return False


_JVP_ONLY = ("jvp",)


#: ops whose derivative formulas read non-differentiable statistics: decomposed when a lower
#: level differentiates them further; and backward kernels without a usable forward-AD
#: formula, decomposed under a lower jvp level (filled by ``_nested_decomp``)
NESTED_DECOMPOSITIONS: dict = {}
FORWARD_AD_DECOMPOSITIONS: dict = {}


_NESTED_DECOMPOSED = _OpSet(NESTED_DECOMPOSITIONS, "_pyf_nested_decomp")
_FORWARD_AD_DECOMPOSED = _OpSet(FORWARD_AD_DECOMPOSITIONS, "_pyf_fwad_decomp")


def _run_inner(func, args, kwargs, level: int):
    """Run ``func`` on the inner values of a differentiation level ``level``. Ops whose
    derivative formulas read non-differentiable statistics run decomposed when a lower
    level differentiates them further, and backward kernels without a usable forward-AD
    formula when a lower jvp level is live (see ``_nested_decomp``)."""
    if func in _NESTED_DECOMPOSED and _differentiated_below(level):
        out = NESTED_DECOMPOSITIONS[func](*args, **kwargs)
        if out is not NotImplemented:
            return out
    if _state.jvp_depth:
        if getattr(func, "namespace", None) == "prims":
            if _on_meta(args):
                # Speed: torch._refs computing the metadata of forward AD's zero tangents on meta
                # values. Nothing there has a derivative: the prims op itself, below autograd
                # (as aten, its meta kernel would run torch._refs a second time: ~130 us each)
                with torch._C._AutoDispatchBelowAutograd():
                    return func(*args, **kwargs)
            # trap 6 at a differentiation level: torch._refs (e.g. the metadata of forward AD's
            # zero tangents) emit prims.* ops, whose autograd kernels have no forward-AD formula
            func = aten_equivalent(func) or func
        if func in _FORWARD_AD_DECOMPOSED and _differentiated_below(level, _JVP_ONLY):
            return FORWARD_AD_DECOMPOSITIONS[func](*args, **kwargs)
        return call_op_at_vmap(func, args, kwargs)
    return func(*args, **kwargs)


def _on_meta(args) -> bool:
    """Every tensor argument (wrappers included) is on the meta device, and there is one."""
    found = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type != "meta":
                return False
            found = True
    return found


def call_op_at_vmap(func, args, kwargs):
    """Call the aten op ``func``; when its next level is a vmap level, below autograd.

    torch has one forward-AD level, so autograd would run the formulas of any lower-level
    dual among the arguments right here, on the vmap wrappers -- giving those wrappers
    tangents of their own (later refused as tangents: "a forward grad that itself has a
    forward gradient"; or batched writes into unbatched tangent buffers). A vmap level
    records nothing: go straight to its dispatch, where the lower levels' autograd runs on
    the inner values as it should. (Only for single aten ops: a composite called below
    autograd would skip the derivatives of its sub-ops on lower-level tensors.)"""
    top, _ = _find_top(args, kwargs)
    if top is not None and top.kind == "vmap":
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return func(*args, **kwargs)
    return func(*args, **kwargs)


def unwrap_level(x, interp):
    """``x`` with ``interp``'s wrappers replaced by their inner values (lists too)."""
    if isinstance(x, LevelTensor):
        return x._value if x._interp is interp else x
    if isinstance(x, (list, tuple)) and x and any(isinstance(y, LevelTensor) for y in x):
        return type(x)(unwrap_level(y, interp) for y in x)
    return x


def wrap_level(x, interp):
    """Every tensor in ``x`` wrapped as a fresh wrapper of ``interp``'s level."""
    if isinstance(x, torch.Tensor):
        return interp.wrapper(x, interp)
    if isinstance(x, (list, tuple)):
        return type(x)(wrap_level(y, interp) for y in x)
    return x


def peel(x, interp):
    """An output of the transformed function, seen from outside ``interp``'s level."""
    if isinstance(x, LevelTensor) and x._interp is interp:
        return x._value
    return x


# -- Python entry points patched while any transform is live: see _patching -------------


@contextmanager
def no_inference_mode() -> Iterator[None]:
    """Inference mode off for the block, grad and forward-grad modes left as they were
    (``torch.inference_mode(False)`` alone would switch them on). No-op when it is off."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    prev_grad = torch.is_grad_enabled()
    prev_fw = torch._C._is_fwd_grad_enabled()
    with torch.inference_mode(False):
        torch._C._set_grad_enabled(prev_grad)
        torch._C._set_fwd_grad_enabled(prev_fw)
        yield


@contextmanager
def push_interpreter(interp: Interpreter) -> Iterator[Interpreter]:
    """Push ``interp`` for the duration of the block; always pops, marks it dead."""
    if _functorch_active():
        raise MixedTransformsError(
            f"pyfunctorch.{interp.kind} was called inside a torch.func transform (e.g. torch.func's vmap "
            f"over pyfunctorch.{interp.kind}(f)). torch.func's C++ transforms cannot carry "
            "pyfunctorch's wrapper tensors. Use pyfunctorch for every level, e.g. "
            "pyfunctorch.vmap(pyfunctorch.grad(f)); torch.func transforms *inside* pyfunctorch ones "
            "(pyfunctorch.vmap over torch.func's grad) are fine."
        )
    if interp.disables_inference_mode and torch.is_inference_mode_enabled():
        with no_inference_mode():
            # the key set captured at creation excluded autograd (inference mode's keys)
            interp.exclude = torch._C._dispatch_tls_local_exclude_set()
            with push_interpreter(interp):
                yield interp
        return
    if interp.kind == "jvp" and not torch._C._is_fwd_grad_enabled():
        # as torch.func: a jvp level computes tangents whatever the caller's forward-grad mode
        torch._C._set_fwd_grad_enabled(True)
        try:
            with push_interpreter(interp):
                yield interp
        finally:
            torch._C._set_fwd_grad_enabled(False)
        return
    st = _state
    hooks_pushed = False
    if not st.stack:
        _install_patches()
        hooks_pushed = _saved_hooks.wrap_active_hooks(LevelTensor)
    st.stack.append(interp)
    try:
        yield interp
    finally:
        exit_hooks = interp.__dict__.get("exit_hooks")
        try:
            failed = sys.exc_info()[0] is not None
            while exit_hooks:  # while the level is still alive (its wrappers still usable)
                exit_hooks.pop()(failed)
        finally:
            interp.alive = False
            popped = st.stack.pop()
            assert popped is interp, "pyfunctorch: interpreter stack corrupted"
            if not st.stack:
                if hooks_pushed:
                    _saved_hooks.pop_hooks()
                _uninstall_patches()


@contextmanager
def lowered(level: int):
    """Run the block with only the interpreters below ``level`` on this thread's stack.
    The removed levels stay alive (their wrappers still dispatch); they are just not
    "current", so factories and random calls inside do not belong to them."""
    st = _state
    saved_stack = list(st.stack)
    st.stack[:] = [i for i in saved_stack if i.level < level]
    try:
        yield
    finally:
        st.stack[:] = saved_stack



def _find_top(args, kwargs):
    """The live interpreter of highest level among the (possibly nested) args."""
    top = None
    lvl = -1
    dead = False
    for a in itertools.chain(args, kwargs.values()) if kwargs else args:
        if isinstance(a, LevelTensor):
            it = a._interp
            if not it.alive:
                dead = True
            elif it.level > lvl:
                top, lvl = it, it.level
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, LevelTensor):
                    it = b._interp
                    if not it.alive:
                        dead = True
                    elif it.level > lvl:
                        top, lvl = it, it.level
    return top, dead


# torch.func's transforms keep a C++ stack of layers; this plain torch._C query says whether
# one is live on this thread (older torch: assume none).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _resolve_dead(x):
    """Replace wrappers of finished levels by what they stand for outside them."""
    if isinstance(x, LevelTensor):
        if x._interp.alive:
            return x
        return x._escaped()
    if isinstance(x, (list, tuple)):
        return type(x)(_resolve_dead(y) for y in x)
    return x


def _dead_level_of(args, kwargs):
    best = None
    for a in itertools.chain(args, kwargs.values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, LevelTensor) and not b._interp.alive:
                if best is None or b._interp.level > best._interp.level:
                    best = b
    return best


def _pristine(t) -> bool:
    """A wrapper a factory made inside a transform (``wrap_created``) that was never written
    since and carries no derivative: outside its level it is just the constant it was made
    as (e.g. a tensor the user memoized in the first call and reuses in later ones)."""
    created = t._pyf_created
    return created is not None and t._version == created and not t.requires_grad


def _only_pristine_dead(args, kwargs) -> bool:
    found = False
    for a in itertools.chain(args, kwargs.values()):
        for b in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(b, LevelTensor) and not b._interp.alive:
                if not _pristine(b):
                    return False
                found = True
    return found


def _dispatch_with_dead(func, args, kwargs):
    """An op reached a wrapper whose level has ended (an escaped tensor, or the saved
    graph that vjp_fn differentiates after vjp returned). Grad-type wrappers stand
    for their inner values; vmap wrappers raise (``_escaped``). The results are
    wrapped fresh at the dead level: autograd needs fresh outputs from
    __torch_dispatch__ (it may turn them into views)."""
    exemplar = _dead_level_of(args, kwargs)
    if func is torch.ops.aten.detach.default and args[0] is exemplar:
        # trap 2 again: autograd's own detach (unpacking a saved output in vjp_fn) must
        # not cut the graphs of the levels below
        return type(exemplar)(exemplar._value, exemplar._interp)
    rargs = _resolve_dead(args)
    rkwargs = {k: _resolve_dead(v) for k, v in kwargs.items()}
    aliased = _mutated_returns(func)
    if aliased is None and _only_pristine_dead(args, kwargs):
        # constants made inside an ended level: the op on their values, plain results (the
        # autograd kernels above this dispatch record what the live levels need)
        return func(*rargs, **rkwargs)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exemplar._interp.exclude):
        if _state.jvp_depth:
            # trap 5, as in WrapperInterpreter.process: the inner values of an ended level may
            # carry the tangents of two jvp levels (vjp_fn under two jvps: the cotangent at the
            # inner one, a saved operand at the outer one); unlifted, the inner level's kernel
            # took the outer tangent as its own (jvp(jvp(vjp_fn)), jvp(hessian) were wrong).
            # (Inside the key guard: with autograd's keys excluded no tangent is visible.)
            rargs, rkwargs = lift_mixed(rargs, rkwargs)
        if isinstance(exemplar._interp, WrapperInterpreter):
            out = _run_inner(func, rargs, rkwargs, exemplar._interp.level)
        else:
            out = func(*rargs, **rkwargs)
    if aliased is not None:
        return _return_aliases(aliased, args, kwargs, out)
    cls, interp = type(exemplar), exemplar._interp

    def rewrap(x):
        if isinstance(x, torch.Tensor):
            return cls(x, interp)
        if isinstance(x, (list, tuple)):
            return type(x)(rewrap(y) for y in x)
        return x

    return rewrap(out)


def _metadata_query(func, args):
    # Autograd's engine asks these about wrappers; answer from wrapper metadata
    # (trap 5: the inner values of two levels would give a different answer).
    if func is aten.is_same_size.default:
        return args[0].shape == args[1].shape
    if func is aten._has_same_storage_numel.default:
        return args[0].numel() == args[1].numel()
    return NotImplemented


_NoTorchFunction = torch._C.DisableTorchFunctionSubclass
_torch_function_on = torch._C._is_torch_function_enabled
_DETACH, _ALIAS = aten.detach.default, aten.alias.default
_IS_SAME_SIZE = aten.is_same_size.default
_SAME_STORAGE_NUMEL = aten._has_same_storage_numel.default
_METADATA_OPS = {_IS_SAME_SIZE, _SAME_STORAGE_NUMEL}


class LevelTensor(torch.Tensor):
    """Base of every wrapper: holds ``_value`` (the next-lower object, never a copy)
    and ``_interp`` (the level that owns the wrapper)."""

    _pyf_created = None  # version at creation, for tensors made by wrap_created (see _pristine)

    _value: torch.Tensor
    _interp: Interpreter

    __slots__ = ()

    # No __torch_function__ (it costs ~1 us per op); JvpTensor defines one for lifting,
    # BatchedTensor one for a user's pointwise calls (cheaper than the dispatcher).
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is _DETACH and len(args) == 1:
            # Speed: autograd saving a wrapper (an output of a grad/jvp level's op) detaches it:
            # at a live differentiation level that is the wrapper of the same inner value (trap
            # 2: WrapperInterpreter.process), no key guard or interpreter needed (~2 us)
            a = args[0]
            it = a._interp
            if it.alive and isinstance(it, WrapperInterpreter) and type(a) is it.wrapper:
                return it.rewrap_detached(a)
        if kwargs is None:
            kwargs = {}
        st = _state
        st.dispatch_depth += 1
        try:
            top, dead = _find_top(args, kwargs)
            # The ops our dispatch runs on inner values (and its reads of their shapes and
            # strides) skip the wrappers' __torch_function__ (JvpTensor's lifting, BatchedTensor's
            # fast path: ~1 us each, ~70 calls per HVP): the levels' process has lifted their
            # operands already. (torch.func's transforms, C++ dispatch keys, never call an inner
            # __torch_function__ either.)
            with _NoTorchFunction():
                if dead:
                    return _dispatch_with_dead(func, args, kwargs)
                return top.dispatch(func, args, kwargs)
        finally:
            st.dispatch_depth -= 1

    @staticmethod
    def _same_shape(cls, value: torch.Tensor, interp: "Interpreter", requires_grad: bool = False):
        """A wrapper of ``cls`` with ``value``'s metadata (grad and jvp levels). Few keyword
        arguments: this runs for every op's output, and each one costs (~1.5 us in all)."""
        if type(value) is not torch.Tensor and _torch_function_on():
            with _NoTorchFunction():  # (a BatchedTensor's metadata, read outside our dispatch)
                return LevelTensor._same_shape(cls, value, interp, requires_grad)
        shape = value.shape
        if not requires_grad and value.is_contiguous() and not value.storage_offset() and 1 not in shape \
                and 0 not in shape:
            # (the common case: the default strides and offset are exactly the value's --
            # contiguous, no size-1 or empty dim whose stride could be any value; ~0.35 us less)
            r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=value.dtype, device=value.device)
        elif requires_grad:
            r = torch.Tensor._make_wrapper_subclass(
                cls, value.shape, strides=value.stride(), storage_offset=value.storage_offset(),
                dtype=value.dtype, device=value.device, requires_grad=True,
            )
        else:
            r = torch.Tensor._make_wrapper_subclass(
                cls, value.shape, strides=value.stride(), storage_offset=value.storage_offset(),
                dtype=value.dtype, device=value.device,
            )
        r._value = value
        r._interp = interp
        if value.is_complex():
            # lazy conj/neg views: forward AD compares a view's tangent layout (these bits
            # included) with its primal's
            if value.is_conj():
                torch._C._set_conj(r, True)
            if value.is_neg():
                torch._C._set_neg(r, True)
        return r

    def __init__(self, *args, **kwargs):
        pass

    # -- what a user sees --------------------------------------------------
    def __repr__(self, *, tensor_contents=None) -> str:  # trap 11
        if not self._interp.alive:
            return self._escaped_repr()
        return f"{self._describe()}({_plain_repr(self)})"

    def _escaped_repr(self) -> str:
        # an escaped grad/jvp tensor is just its value now
        return _plain_repr(self)

    def _describe(self) -> str:
        return f"{type(self).__name__}[level {self._interp.level}]"

    def _detached(self) -> torch.Tensor:
        """This wrapper with every differentiation level cut (grad/jvp: a wrapper of this
        level, without gradient or tangent, around the detached inner value -- still this
        level's own tensor, as in torch.func, so writes into a clone of it are recorded;
        vmap overrides to keep the batch)."""
        return type(self)(detach_all_levels(self._value), self._interp)

    def _escaped(self) -> torch.Tensor:
        """What this wrapper stands for after its level ended (override)."""
        raise EscapedTensorError(
            f"pyfunctorch: a tensor created inside a {self._interp.kind} transform was used after "
            "that transform returned (it escaped, e.g. through a global variable or a list). "
            "Return it from the function instead (use has_aux=True for grad-type transforms)."
        )

    def numpy(self, *a, **k):
        raise TypeError(
            f"pyfunctorch: .numpy() is not available on a tensor inside a {self._interp.kind} "
            "transform; return the tensor from the transformed function and convert it outside."
        )

    def data_ptr(self):
        raise TypeError(
            f"pyfunctorch: data_ptr() has no meaning for a tensor inside a {self._interp.kind} "
            "transform (its storage is the transform's, not yours)."
        )

    def tolist(self):
        return self._tolist()

    def _tolist(self):  # override: vmap treats this as data-dependent
        return self._value.tolist()

    def __reduce_ex__(self, proto):
        raise TypeError("pyfunctorch: tensors inside a transform cannot be pickled or deep-copied.")




def _plain_repr(t) -> str:
    with torch._C.DisableTorchFunction():
        inner = t._value
        while isinstance(inner, LevelTensor):
            inner = inner._value
        s = repr(inner)
    return s


def _is_dual(t) -> bool:
    # an inference tensor (e.g. a vmap wrapper made under inference_mode) has no autograd
    # key, so _unpack_dual would reach its level's dispatch; it never carries a tangent
    return not t.is_inference() and torch._VF._unpack_dual(t, 0)[1] is not None


def lift_mixed(args, kwargs):
    """Lift lower-level dual tensors to the highest level among the arguments when that
    level differentiates (jvp or grad), so only its tangents reach the kernel."""
    top, _ = _find_top(args, kwargs)
    if top is None or top.kind == "vmap":
        return args, kwargs

    changed = False

    def lift(x):
        nonlocal changed
        if isinstance(x, LevelTensor):
            if x._interp is not top and x._interp.level < top.level and _is_dual(x):
                changed = True
                w = top.lift(x)
                # a tensor captured from a lower level, not one of this level's own: an
                # in-place write of this level's derivative into it would be lost with
                # this temporary wrapper (check_mutation refuses it)
                w._pyf_captured = True
                return w
            return x
        if isinstance(x, (list, tuple)) and x and any(isinstance(y, LevelTensor) for y in x):
            return type(x)(lift(y) for y in x)
        return x

    new_args = tuple(lift(a) for a in args)
    new_kwargs = {k: lift(v) for k, v in kwargs.items()} if kwargs else kwargs
    if not changed:
        return args, kwargs
    return new_args, new_kwargs


#: aten ops whose forward-AD formula adds the tangents of its operands (``self_t + other_t``)
ADDITIVE = _OpSet(dict.fromkeys((aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor)), "_pyf_additive")


_has_internal_overlap = torch._debug_has_internal_overlap  # 0: none, 1: yes, 2: too hard to tell


def zero_tangents_for_constants(args):
    """Speed, forward AD: ``x + b`` with a dual ``x`` and a constant ``b`` (a bias) makes torch's
    formula add an efficient zero tensor for ``b``'s missing tangent, whose add computes its
    result's metadata by running torch's *Python* meta kernel (``_refs.add``) on meta copies of
    the operands: ~250 us per op, mostly in events of our wrappers. An explicit zero tangent
    for ``b`` gives the same tangent (``x_t + 0``) for one small elementwise add. Only for the
    additive ops (a zero tangent in a product would give ``inf * 0 = nan`` where the efficient
    zero gives 0), functional overloads, constants no larger than the dual operand (so the
    extra work is at most the formula's own add), at a jvp level whose tangents are plain
    (no differentiation level below it). The caller checks the op."""
    top = dual = None
    for a in args:
        if isinstance(a, LevelTensor):
            it = a._interp
            if it.kind == "jvp" and (top is None or it.level > top.level):
                top, dual = it, a
    if top is None or not getattr(top, "plain_tangents", False) or not top.alive or not _is_dual(dual):
        return args
    n = dual.numel()
    new = None
    for i, a in enumerate(args):
        if type(a) is torch.Tensor and a.numel() <= n and a.is_floating_point() and a.device == dual.device \
                and _has_internal_overlap(a) == 0:
            # (an expanded constant -- a sum's backward broadcasts its gradient -- cannot be a
            # dual's primal: torch copies the tangent into the primal's overlapping layout and
            # raises; torch's own efficient zero then: hessian(hessian(log_softmax(x).sum())))
            if new is None:
                new = list(args)
            new[i] = _fwAD.make_dual(top.lift(a), aten.zeros_like.default(a))
    return args if new is None else tuple(new)


#: aten ops linear in each tensor operand (their forward-AD formula: ``a_t @ b + a @ b_t``)
PRODUCTS = _OpSet(dict.fromkeys((aten.mm.default, aten.mv.default, aten.dot.default, aten.bmm.default,
                                 aten.mul.Tensor, aten.matmul.default)), "_pyf_product")


def product_with_constants(func, args, drop_bias=False):
    """Speed, forward AD: ``W @ x`` or ``x * c`` with one dual operand ``x`` and constants for
    the rest. torch's formula (``x_t @ W + x @ W_t``) takes an efficient zero tensor for the
    missing ``W_t``, whose products and sums compute their results' metadata with torch's
    *Python* meta kernels (80-180 us per op in plain torch, several times that in events of
    our wrappers). The op is linear in ``x``, so its tangent is the op on ``x``'s tangent and
    the constants: exactly the formula's nonzero term (no ``0 * inf``: nothing is
    multiplied by a zero). ``drop_bias``: the third argument is an additive constant
    (``F.linear``'s bias), left out of the tangent. The result is that dual; None where this
    does not apply (keywords, not exactly one dual operand, a jvp level with wrapped
    tangents, a non-tensor operand). The caller checks the op."""
    top = dual = None
    n = 0
    for a in args:
        if isinstance(a, LevelTensor):
            it = a._interp
            if top is None or it.level > top.level:
                top = it
        elif not isinstance(a, torch.Tensor) and not (drop_bias and a is None):
            return None
    # (the jvp level must be the highest among the operands: the op runs there)
    if top is None or top.kind != "jvp" or not getattr(top, "plain_tangents", False) or not top.alive:
        return None
    if not _state.dispatch_depth and _state.stack[-1] is not top:
        return None  # a user's call under a higher level: own_fresh_results decides (make_dual gives a view)
    for i, a in enumerate(args):
        if isinstance(a, LevelTensor):
            if a._interp is top:
                primal, tangent = _fwAD.unpack_dual(a)
                if tangent is None:
                    return None  # (a lifted constant: its tangent would be a wrapper of this level)
                dual, n = i, n + 1
            # (a lower level is a vmap level: with plain tangents no jvp level is below this one,
            # and call_op_at_vmap keeps forward AD off the vmap wrappers)
        elif a is not None and _is_dual(a):  # (a dual the user made with torch's forward AD)
            return None
    if n != 1 or (drop_bias and dual == 2):
        return None
    out = func(*args[:dual], primal, *args[dual + 1:])
    targs = args[:dual] + (tangent,) + args[dual + 1:]
    return _fwAD.make_dual(out, func(*(targs[:2] if drop_bias else targs)))


def level_of(x: Any) -> int:
    """The level of ``x`` (0 for a plain tensor)."""
    return x._interp.level if isinstance(x, LevelTensor) else 0


# -- the user's detach: cut every differentiation level (trap 2) ---------------------


def detach_all_levels(x: torch.Tensor) -> torch.Tensor:
    """``x`` with no tangent or gradient at any level; vmap batching is kept."""
    if isinstance(x, LevelTensor):
        if not x._interp.alive:
            return detach_all_levels(x._escaped())
        return x._detached()
    return x.detach()
