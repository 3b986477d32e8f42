"""autograd.Function at vmap levels: the user's vmap staticmethod, generate_vmap_rule (the Function vmapped over one level), or the per-example loop."""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import Function

from .._core import lowered as _lowered, push_interpreter
from ..batched.interpreter import VmapInterpreter
from ..batched.tensor import BatchedTensor
from ..batched.user_rules import _norm_dim, _unwrap_batched, _wrap_batched_outputs, run_vmap_rule
from ..errors import PerformanceWarning
from ._common import _has_jvp, _has_vmap, _user_backward
from .entry import custom_function_call, level_rule


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
            return x._lazy_plain, None
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


@level_rule("vmap")
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
                    vals.append(t._lazy_plain)
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
