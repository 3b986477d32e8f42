"""Forward mode: the jvp interpreter, JvpTensor, and ``jvp`` and ``linearize``.

torch has a single forward-AD level (``dual_level`` cannot nest), so one global
dual level is entered while any jvp level is live and every jvp level gets its
own wrapper objects (trap 5). Tangents of two levels must never meet in one
autograd kernel: wherever lower-level dual tensors reach an op together with
higher-level wrappers they are first *lifted* (re-wrapped, without tangent) to
the highest level among the arguments -- in ``JvpTensor.__torch_function__`` for
user calls and in ``process`` before an op runs on unwrapped values.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD

from . import _core, _ownership
from ._compiler import opaque_to_compiler
from ._core import Interpreter, LevelTensor, WrapperInterpreter, peel, push_interpreter
from ._pytree import tree_flatten, tree_map, tree_unflatten
from .errors import ArgumentError, ArgumentTypeError
from .reverse import _check_diff_inputs, _split_aux

aten = torch.ops.aten


class JvpTensor(LevelTensor):
    """A tensor at one jvp level; its tangent lives on the wrapper as a forward-AD dual."""

    @staticmethod
    def __new__(cls, value: torch.Tensor, interp: Interpreter):
        return LevelTensor._same_shape(cls, value, interp)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Trap 5: lift lower-level duals before the autograd kernel sees the call, so
        # tangents of two jvp levels never meet in one forward-AD formula.
        if kwargs is None:
            kwargs = {}
        if _core._state.dispatch_depth or func in _METADATA_READS or getattr(func, "__name__", None) == "__get__":
            # Speed: our own dispatch reads a wrapper's metadata (shape, strides: ~70 times per
            # call of an HVP) and runs ops on inner values it has already lifted (process ->
            # lift_mixed); a metadata read (a property getter, .stride()) never needs lifting.
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        scalar_op = _SCALAR_OPS.get(func)
        if scalar_op is not None and len(args) == 2 and not kwargs and isinstance(args[1], (int, float)) \
                and not isinstance(args[1], bool) and isinstance(args[0], torch.Tensor) \
                and not _dispatch_modes():
            # trap 6: `x * 2` on a dual tensor is aten.mul.Tensor with a wrapped number, whose
            # forward formula goes through torch._refs (~120 us); the .Scalar overload is ~8 us.
            # (Not under a dispatch mode: traced by pyfunctorch.compile's make_fx, the .Scalar
            # overload's tangent at the outer of two jvp levels killed the process with a
            # segmentation fault inside torch -- fuzzer seed 7793, jvp(jvp(lambda x: (x @ c) * 2.5)).)
            out = scalar_op(args[0], args[1])
            if isinstance(out, JvpTensor):
                out = _ownership.own_fresh_results(out, args, kwargs)
            return out
        args, kwargs = _core.lift_mixed(args, kwargs)
        args, kwargs = _lift_duals_into_vmap(func, args, kwargs)
        out = None
        with torch._C.DisableTorchFunctionSubclass():
            if not kwargs:
                if func in _ADDITIVE_CALLS:
                    args = _core.zero_tangents_for_constants(args)
                elif func in _PRODUCT_CALLS:
                    out = _core.product_with_constants(func, args, drop_bias=func is _LINEAR)
            if out is None:
                out = func(*args, **kwargs)
        if isinstance(out, JvpTensor):
            out = _ownership.own_fresh_results(out, args, kwargs)
        return out

    def _describe(self) -> str:
        return f"JvpTensor[jvp level {self._interp.level}]"

    def _escaped(self):
        return _core._resolve_dead(self._value)


def _lift_duals_into_vmap(func, args, kwargs):
    """A user call whose highest level is a vmap level, with a dual of a lower jvp level
    among its arguments (``vmap(lambda x: F.linear(x, w))`` inside ``jacfwd`` over ``w``):
    the dual is lifted into the vmap level as an unbatched (lazy) tensor, so autograd above
    the vmap level sees no tangent -- with one forward-AD level it would run the dual's
    formula on the vmap wrappers -- and the dual's own forward AD runs on the inner values,
    where each of the call's aten ops meets it (``VmapInterpreter._process_lazy``). The tensor an
    in-place call writes into is not lifted (the write must reach it)."""
    top, _ = _core._find_top(args, kwargs)
    if top is None or top.kind != "vmap" or _core._state.dispatch_depth:
        return args, kwargs
    # only the user's own code (frames: this function, __torch_function__, the caller)
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller.startswith(("torch.", "pyfunctorch.")) or caller in ("torch", "pyfunctorch"):
        return args, kwargs
    name = getattr(func, "__name__", "")
    writes_first = (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"
    changed = False

    def lift(x):
        nonlocal changed
        if isinstance(x, LevelTensor) and x._interp.level < top.level and x._interp.alive and _core._is_dual(x):
            changed = True
            return top.wrap_created(x)
        if isinstance(x, (list, tuple)) and x and any(isinstance(y, LevelTensor) for y in x):
            return type(x)(lift(y) for y in x)
        return x

    new_args = tuple(a if (i == 0 and writes_first) else lift(a) for i, a in enumerate(args))
    new_kwargs = {k: (v if k == "out" else lift(v)) for k, v in kwargs.items()} if kwargs else kwargs
    if not changed:
        return args, kwargs
    return new_args, new_kwargs


class JvpInterpreter(WrapperInterpreter):
    kind = "jvp"
    wrapper = JvpTensor


_T = torch.Tensor
#: methods that only read a tensor's metadata (property getters are recognized by name)
_METADATA_READS = frozenset({_T.stride, _T.storage_offset, _T.size, _T.dim, _T.numel, _T.is_floating_point,
                             _T.is_complex, _T._is_view, _T.is_inference, _T.is_contiguous, _T.element_size})

#: the user-level forms of _core.ADDITIVE (functional only: an in-place write must reach its target)
_ADDITIVE_CALLS = frozenset({_T.__add__, _T.__radd__, _T.add, torch.add, _T.__sub__, _T.__rsub__, _T.sub, torch.sub,
                             _T.subtract, torch.subtract, torch.rsub})

#: the user-level forms of _core.PRODUCTS, and F.linear (a product plus a constant bias)
_LINEAR = torch._C._nn.linear
_PRODUCT_CALLS = frozenset({_T.__matmul__, _T.matmul, torch.matmul, _T.mm, torch.mm, _T.mv, torch.mv, _T.dot,
                            torch.dot, _T.bmm, torch.bmm, _T.__mul__, _T.__rmul__, _T.mul, torch.mul, _T.multiply,
                            torch.multiply, _LINEAR})

_dispatch_modes = torch._C._len_torch_dispatch_stack

_SCALAR_OPS = {
    torch.Tensor.__mul__: aten.mul.Scalar, torch.Tensor.__rmul__: aten.mul.Scalar, torch.Tensor.mul: aten.mul.Scalar,
    torch.mul: aten.mul.Scalar, torch.Tensor.__add__: aten.add.Scalar, torch.Tensor.__radd__: aten.add.Scalar,
    torch.Tensor.add: aten.add.Scalar, torch.add: aten.add.Scalar, torch.Tensor.__sub__: aten.sub.Scalar,
    torch.Tensor.sub: aten.sub.Scalar, torch.sub: aten.sub.Scalar, torch.Tensor.__rsub__: aten.rsub.Scalar,
    torch.Tensor.__truediv__: aten.div.Scalar, torch.Tensor.div: aten.div.Scalar, torch.div: aten.div.Scalar,
}


_peel = peel


# -- the single global dual level ---------------------------------------------------


# torch has one forward-AD level for the whole process (``dual_level`` cannot nest, not
# even from two threads). It is entered by the first jvp level live in any thread and left
# by the last one: a count under a lock. Each jvp level of each thread has its own wrapper
# objects, so the levels never share a tangent; leaving the dual level drops every
# tangent, which is why it is only left when no jvp level is live anywhere.
_dual_lock = threading.Lock()
_dual_users = 0


def _enter_shared_dual_level() -> None:
    global _dual_users
    with _dual_lock:
        if _dual_users == 0:
            fwAD.enter_dual_level()
        _dual_users += 1


def _exit_shared_dual_level() -> None:
    global _dual_users
    with _dual_lock:
        _dual_users -= 1
        if _dual_users == 0:
            fwAD.exit_dual_level()


class _jvp_level:
    """Push a jvp interpreter; the outermost of this thread takes a share of the dual level."""

    def __init__(self):
        self.interp = JvpInterpreter()

    def __enter__(self):
        st = _core._state
        if st.jvp_depth == 0:
            _enter_shared_dual_level()
        st.jvp_depth += 1
        self.ctx = push_interpreter(self.interp)
        try:
            return self.ctx.__enter__()
        except BaseException:
            self._leave()
            raise

    def _leave(self):
        st = _core._state
        st.jvp_depth -= 1
        if st.jvp_depth == 0:
            _exit_shared_dual_level()

    def __exit__(self, *exc):
        try:
            self.ctx.__exit__(*exc)
        finally:
            self._leave()
        return False


def _vmap_levels(x) -> set:
    out = set()
    while isinstance(x, LevelTensor):
        if x._interp.kind == "vmap" and x._interp.alive:
            out.add(x._interp)
        x = x._value
    return out


def _batched_like(t, p):
    """The tangent ``t`` batched at every vmap level at which its primal ``p`` is (as
    functorch's ``_make_dual`` batching rule does): forward-AD formulas update tangents in
    place (``y.clone().mul_(x)`` inside ``vmap(jvp(...))``), and an unbatched tangent cannot
    take per-example values."""
    if not isinstance(p, LevelTensor) or not isinstance(t, torch.Tensor):
        return t
    missing = _vmap_levels(p) - _vmap_levels(t)
    if not missing:
        return t
    return t + torch.zeros_like(p)


def _check_primals_tangents(primals, tangents, who):
    if not isinstance(primals, (tuple, list)):
        raise ArgumentTypeError(f"{who}: primals must be a tuple of the function's positional arguments; got {type(primals).__name__}. Use ({type(primals).__name__.lower()},) for one argument.")
    if not isinstance(tangents, (tuple, list)):
        raise ArgumentTypeError(f"{who}: tangents must be a tuple with the same structure as primals; got {type(tangents).__name__}.")
    p_flat, p_spec = tree_flatten(tuple(primals))
    t_flat, t_spec = tree_flatten(tuple(tangents))
    if not p_flat:
        raise RuntimeError(f"{who}: primals must contain at least one tensor to differentiate; got {tuple(primals)!r}. "
                           "Pass the function's inputs as a tuple, e.g. (x,).")
    if p_spec != t_spec:
        raise ArgumentError(f"{who}: tangents must have the same structure as primals; got {t_spec} for primals {p_spec}.")
    _check_diff_inputs(p_flat, who)
    for p, t in zip(p_flat, t_flat):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{who}: every tangent must be a tensor; got {type(t).__name__}.")
        if t.shape != p.shape:
            raise ArgumentError(f"{who}: a tangent has shape {tuple(t.shape)} but its primal has shape {tuple(p.shape)}; they must match.")
    return p_flat, p_spec, t_flat


@opaque_to_compiler
def jvp(func: Callable, primals: Any, tangents: Any, *, strict: bool = False, has_aux: bool = False):
    """Jacobian-vector product by true forward mode: returns ``(func(*primals), J @ tangents)``
    (and ``aux`` with ``has_aux=True``) at the cost of about one forward pass.

    Examples:
        >>> import torch
        >>> from pyfunctorch import jvp
        >>> x = torch.tensor([0.1, 0.2])
        >>> out, tangent = jvp(torch.sin, (x,), (torch.ones(2),))
        >>> torch.allclose(tangent, torch.cos(x))
        True
    """
    p_flat, p_spec, t_flat = _check_primals_tangents(primals, tangents, "jvp")
    # as torch.func: forward AD on even where it was switched off (autograd.Function.forward)
    with fwAD._set_fwd_grad_enabled(True), _jvp_level() as interp:
        lift = _ownership.lift_into_live_levels
        lvl = interp.level
        # A tangent is a value at this level, as the primal is: wrapped (without a tangent of
        # its own) so that it may carry the derivatives of lower levels inside; forward AD
        # refuses a tangent that is itself a dual (torch has a single dual level).
        # (only needed under another differentiation level: at the outermost one the
        # tangents stay plain, and their formulas' ops never reach Python dispatch)
        nested = _core._differentiated_below(lvl)
        interp.plain_tangents = not nested  # (see _core.zero_tangents_for_constants)
        duals = []
        for p, t in zip(p_flat, t_flat):
            if type(p) is torch.Tensor and _core._has_internal_overlap(p) == 1:
                # an expanded primal (several elements at one memory location) cannot carry a
                # tangent: torch copies the tangent into the primal's layout and raises (so does
                # torch.func); the same values, one element each, can
                p = p.contiguous()
            p = lift(p, lvl)
            t = lift(_batched_like(t, p), lvl)
            duals.append(fwAD.make_dual(JvpTensor(p, interp), JvpTensor(t, interp) if nested else t))
        out = func(*tree_unflatten(duals, p_spec))
        out, aux = _split_aux(out, has_aux, "jvp")
        out_flat, out_spec = tree_flatten(out)
        primal_out, tangent_out = [], []
        for o in out_flat:
            if not isinstance(o, torch.Tensor):
                raise ArgumentTypeError(f"jvp: the function's outputs must be tensors (or pytrees of tensors); got {type(o).__name__}.")
            if isinstance(o, JvpTensor) and o._interp is interp:
                p, t = fwAD.unpack_dual(o)
                primal_out.append(_peel(p, interp))
                tangent_out.append(torch.zeros_like(o._value) if t is None else _peel(t, interp))
            else:
                primal_out.append(o)
                tangent_out.append(torch.zeros_like(o))
        aux = tree_map(lambda x: _peel(x, interp) if isinstance(x, torch.Tensor) else x, aux)
    res = (tree_unflatten(primal_out, out_spec), tree_unflatten(tangent_out, out_spec))
    if has_aux:
        return res + (aux,)
    return res


@opaque_to_compiler
def linearize(func: Callable, *primals: Any):
    """Returns ``(func(*primals), jvp_fn)`` where ``jvp_fn(*tangents)`` computes the
    JVP at ``primals`` (the forward pass is not re-traced per call in torch.func; here
    each call runs forward mode again, with the primal output computed once).

    Examples:
        >>> import torch
        >>> from pyfunctorch import linearize
        >>> x = torch.tensor([0.1, 0.2])
        >>> out, jvp_fn = linearize(torch.sin, x)
        >>> torch.allclose(jvp_fn(torch.ones(2)), torch.cos(x))
        True
    """
    p_flat, p_spec = tree_flatten(primals)
    _check_diff_inputs(p_flat, "linearize")
    out = func(*primals)
    out_flat, out_spec = tree_flatten(out)

    @opaque_to_compiler
    def jvp_fn(*tangents):
        t_flat, t_spec = tree_flatten(tangents)
        if t_spec != p_spec:
            raise ValueError(f"linearize: jvp_fn expects tangents with the structure of the primals ({p_spec}); got {t_spec}.")
        _, tangent_out = jvp(func, primals, tangents)
        return tangent_out

    return out, jvp_fn


