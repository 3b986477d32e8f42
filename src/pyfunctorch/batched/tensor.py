"""BatchedTensor: a tensor batched at one vmap level (the whole batch's value plus its batch dim), and the helpers that read it."""

from __future__ import annotations


import weakref

import torch

from .. import _core
from .._core import Interpreter, LevelTensor, _state
from ..batching.pointwise import USER_POINTWISE
from ..errors import data_dependent

_NoTorchFunction = torch._C.DisableTorchFunctionSubclass
_torch_function_on = torch._C._is_torch_function_enabled
_SCALARS = (int, float, bool, complex)


def _user_calls(names):
    """The Python callables through which a user's code reaches these ops (``torch.sin``,
    ``x.sin()``, ``x * y`` -- reported as ``Tensor.mul`` --, ``F.gelu``)."""
    found = set()
    for owner in (torch._C.TensorBase, torch._C._VariableFunctions, torch._C._nn, torch._C._special):
        for name in names:
            fn = getattr(owner, name, None)
            if fn is not None:
                found.add(fn)
    return frozenset(found)


_DEFAULT_HANDLER = torch.Tensor.__torch_function__.__func__


def _own_handler(t) -> bool:
    """Whether tensor type ``t`` handles torch functions itself (not torch's default, not
    disabled, not a BatchedTensor)."""
    h = t.__torch_function__
    return getattr(h, "__func__", h) not in (_DEFAULT_HANDLER, torch._C._disabled_torch_function_impl) \
        and not issubclass(t, BatchedTensor)


#: a user's call of one of these on BatchedTensors takes the torch-function fast path
_FAST_CALLS = _user_calls(USER_POINTWISE)

_F = torch.nn.functional
#: torch.nn.functional's Python wrappers (nn.ReLU's F.relu ...) reach __torch_function__ with
#: keywords: the C function each calls, and the keywords it passes on positionally
_F_TWINS = {
    _F.relu: (torch.relu, ()), _F.relu6: (torch._C._nn.relu6, ()), _F.silu: (torch._C._nn.silu, ()),
    _F.mish: (torch._C._nn.mish, ()), _F.hardswish: (torch._C._nn.hardswish, ()),
    _F.hardsigmoid: (torch._C._nn.hardsigmoid, ()), _F.selu: (torch.selu, ()), _F.celu: (torch.celu, ("alpha",)),
    _F.elu: (torch._C._nn.elu, ("alpha",)), _F.leaky_relu: (torch._C._nn.leaky_relu, ("negative_slope",)),
    _F.hardtanh: (torch._C._nn.hardtanh, ("min_val", "max_val")), _F.threshold: (torch.threshold, ()),
}


def _twin_call(func, args, kwargs):
    """``(C function, args)`` for an out-of-place call of one of F's wrappers; else None."""
    c_func, names = _F_TWINS[func]
    if kwargs.get("inplace") or any(k != "inplace" and k not in names for k in kwargs):
        return None
    return c_func, args + tuple(kwargs[n] for n in names if n in kwargs)



class BatchedTensor(LevelTensor):
    """A tensor that is batched at one vmap level: ``_value`` holds the whole batch,
    with the batch in dimension ``_bdim``; the wrapper has the per-example shape."""

    _bdim: int
    _lazy = False  # a tensor created inside the function: see lazy_wrap
    _lazy_views: "list[weakref.ref[BatchedTensor]]"
    _lazy_root: "BatchedTensor"

    @staticmethod
    def __new__(cls, value: torch.Tensor, bdim: int, interp: "Interpreter"):
        if type(value) is not torch.Tensor and _torch_function_on():
            with _NoTorchFunction():  # (an outer level's BatchedTensor, outside our dispatch)
                return BatchedTensor.__new__(cls, value, bdim, interp)
        if bdim == 0:
            r = _front_wrapper(cls, value, interp)
            if r is not None:
                return r
        shape, stride = value.shape, value.stride()
        shape, stride = shape[:bdim] + shape[bdim + 1:], stride[:bdim] + stride[bdim + 1:]
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
        if value.is_complex():  # keep lazy conj/neg bits visible on the wrapper
            if value.is_conj():
                torch._C._set_conj(r, True)
            if value.is_neg():
                torch._C._set_neg(r, True)
        return r

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Speed: a user's pointwise call (``x * 1.01``, ``torch.sin(x)``) on tensors batched
        # at one level runs on the physical values right here, before torch's dispatcher:
        # ~5-6 us per op instead of ~11 through __torch_dispatch__ (see _pointwise_call);
        # so does F.linear (_linear_call).
        if not _state.jvp_depth:
            if not kwargs:
                out = _pointwise_call(func, args) if func in _FAST_CALLS else \
                    _linear_call(args) if func is _LINEAR else None
            elif func in _F_TWINS:
                call = _twin_call(func, args, kwargs)
                out = None if call is None else _pointwise_call(*call)
            else:
                out = None
            if out is not None:
                return out
        if len(types) > 1:
            others = tuple(t for t in types if t is not BatchedTensor and _own_handler(t))
            if others:  # the other subclasses' handlers (JvpTensor's lifting), as if we had none
                for t in others:
                    out = t.__torch_function__(func, others, args, kwargs or {})
                    if out is not NotImplemented:
                        return out
                return NotImplemented
        # everything else: exactly as without a __torch_function__ (one of our patched entry
        # points is called as the original it wraps: its handler has run already)
        func = getattr(func, "_pyf_original", func)
        with _NoTorchFunction():
            return func(*args, **kwargs) if kwargs else func(*args)

    def _describe(self) -> str:
        return f"BatchedTensor[vmap level {self._interp.level}, batch dim {self._bdim}]"

    def _tolist(self):
        if self._lazy:  # one value for every example
            return self._lazy_plain.tolist()
        if self._interp.batch_size == 1:
            return self._value.select(self._bdim, 0).tolist()
        raise data_dependent("tolist", self._interp)

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

    def _escaped(self):
        # a tensor made inside the function and never written per example stands for its one
        # value after the level ended (e.g. memoized by the user); anything else escaped
        if self._lazy and _core._pristine(self):
            return self._lazy_plain
        return super()._escaped()


def _pointwise_call(func, args):
    """``func(*args)`` for an elementwise op whose tensor arguments are all batched at one
    live level, in front, with one logical rank and one dtype, the rest Python numbers:
    then broadcasting and type promotion of the whole batch are each example's, and the op
    on the physical values is the batched result (what broadcasting_rule's fast path does
    after torch's dispatcher). Autograd and lower levels see the op on the values as usual.
    None where another case is met (the call then takes the dispatcher)."""
    interp = None
    with _NoTorchFunction():  # (metadata reads of the wrappers and lower-level values)
        n = len(args)
        if n == 1 or n == 2 and type(args[1]) in _SCALARS:  # (x.sin(), x * 2: the common cases)
            a = args[0]
            if type(a) is not BatchedTensor or a._bdim or a._lazy or a.requires_grad:
                return None
            interp = a._interp
            values = (a._value,) if n == 1 else (a._value, args[1])
        else:
            values = []
            for a in args:
                if type(a) is BatchedTensor:
                    # (batch dim in front, not a lazy buffer, not a wrapper that records itself)
                    if a._bdim or a._lazy or a.requires_grad:
                        return None
                    v = a._value
                    if interp is None:
                        interp, rank, dtype = a._interp, v.dim(), v.dtype
                    elif a._interp is not interp or v.dim() != rank or v.dtype is not dtype:
                        return None
                    values.append(v)
                elif type(a) in _SCALARS or a is None:
                    values.append(a)
                else:
                    return None
            if interp is None:
                return None
        if not interp.alive:
            return None
    out = func(*values)
    if type(out) is not torch.Tensor:
        if not isinstance(out, torch.Tensor):
            return None
        with _NoTorchFunction():
            return BatchedTensor(out, 0, interp)
    return _fresh_batched(out, interp)


def _front_wrapper(cls, value, interp):
    """The wrapper of ``value`` batched in front when its layout is the common one (a fresh
    result: contiguous, no offset, no size-1 or empty dim whose stride could be any value, not
    complex -- the default strides are then exactly the example's; fewer keyword arguments make
    this ~0.35 us cheaper than the general constructor), else None."""
    shape = value.shape
    if not value.is_contiguous() or value.storage_offset() or 1 in shape or 0 in shape:
        return None
    dt = value.dtype
    if dt.is_complex:  # (conj/neg bits: the general constructor)
        return None
    r = _make_wrapper(cls, shape[1:], dtype=dt, device=value.device)
    r._value = value
    r._bdim = 0
    r._interp = interp
    return r


def _fresh_batched(out, interp):
    """``BatchedTensor(out, 0, interp)`` for a plain tensor just computed on the whole batch (the
    fast paths' results), without the constructor's call and subclass checks."""
    r = _front_wrapper(BatchedTensor, out, interp)
    return r if r is not None else _new_batched(BatchedTensor, out, 0, interp)


_new_batched = BatchedTensor.__new__
_make_wrapper = torch.Tensor._make_wrapper_subclass
_LINEAR = torch._C._nn.linear
_GEMM_DTYPES = (torch.float32, torch.float64)


def _linear_call(args):
    """``F.linear(x, w[, b])`` (every ``nn.Linear``) for a 2-D ``x`` per example, on float32/float64
    tensors batched in front at the innermost level -- the bottom one -- or plain, right here
    instead of through torch's dispatcher (there: ``t`` and ``addmm``, two Python dispatches and
    the general addmm rule; ~40 us per linear, here ~17, torch.func ~15-20): a shared weight and
    bias, one ``linear`` over every example's rows; each example its own weight (ensembles), one
    ``baddbmm``; both add the bias as each example's ``addmm`` does. None for anything else (other
    ranks, dtypes, batch dims, levels; a per-example bias with a shared weight): the dispatcher."""
    n = len(args)
    if n != 2 and n != 3:
        return None
    interp = None
    vals, dims = [], []
    with _NoTorchFunction():  # (metadata reads of the wrappers)
        for a in args:
            t = type(a)
            if t is BatchedTensor:
                # (batch dim in front, not a lazy buffer, not a wrapper that records itself)
                if a._bdim or a._lazy or a.requires_grad:
                    return None
                if interp is None:
                    interp = a._interp
                elif a._interp is not interp:
                    return None
                vals.append(a._value)
                dims.append(0)
            elif t is torch.Tensor or t is torch.nn.Parameter or a is None and len(vals) == 2:
                vals.append(a)
                dims.append(None)
            else:
                return None
        st = _state.stack
        if interp is None or not interp.bottom or not st or st[-1] is not interp or interp.grad_shadow is not None \
                or not interp.batch_size or args[0].dim() != 2 or args[1].dim() != 2:
            return None
    x, w = vals[0], vals[1]
    b = vals[2] if n == 3 else None
    dx, dw = dims[0], dims[1]
    db = dims[2] if b is not None else None
    if x.dtype not in _GEMM_DTYPES or w.dtype is not x.dtype \
            or b is not None and (b.dtype is not x.dtype or b.dim() != 1 + (db is not None)):
        return None
    if dw is None:
        if db is not None or dx is None:
            return None
        out = _LINEAR(x, w, b)  # (a layer's weight and bias, shared: one product over every example's rows)
    else:  # every example its own weight
        xe = x if dx is not None else x.expand((w.shape[0],) + x.shape)
        wt = w.transpose(1, 2)
        out = torch.bmm(xe, wt) if b is None else torch.baddbmm(b.unsqueeze(1) if db is not None else b, xe, wt)
    return _fresh_batched(out, interp)


def batched_here(x, interp) -> bool:
    if isinstance(x, BatchedTensor):
        return x._interp is interp
    if isinstance(x, (list, tuple)):
        return any(isinstance(y, BatchedTensor) and y._interp is interp for y in x)
    return False


def slice_example(x, interp, b):
    if isinstance(x, BatchedTensor) and x._interp is interp:
        return x._value.select(x._bdim, b)
    if isinstance(x, (list, tuple)):
        return type(x)(slice_example(y, interp, b) for y in x)
    return x
