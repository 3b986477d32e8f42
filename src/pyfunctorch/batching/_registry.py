"""The batching-rule table and the helpers rules share.

A batching rule has the signature ::

    rule(op, args, kwargs, dims) -> (out, out_dims)

``args`` are the op's positional arguments with every tensor that is batched at
the current vmap level replaced by its physical value *with the batch dimension
moved to the front* (so ``args[i].shape[0]`` is the batch size). ``dims``
mirrors ``args``: ``0`` for a batched tensor, ``None`` for anything else (a
tensor-list argument gets a list of ``0``/``None``). ``out_dims`` mirrors the
output: the batch dimension of each tensor output, or ``None`` if it is not
batched.

A tensor batched at this level in ``kwargs`` (keyword-only schema arguments such as
``searchsorted(sorter=)`` or attention's ``attn_mask``) reaches only rules registered
with ``@batch_rule(op, batched_kwargs=True)``; those are called as
``rule(op, args, kwargs, dims, kwarg_dims)``, with such tensors unwrapped in ``kwargs``
like ``args`` and ``kwarg_dims`` mapping each keyword to ``0`` or ``None``. Other rules
never see a batched keyword argument: the dispatcher sends those calls to the loop
fallback.

Register with ``@batch_rule(aten.mm.default)`` (an ``OpOverload``) or with an
``OpOverloadPacket`` to cover every overload. ``grep -rn "aten.mm" batching/``
finds the rule for ``aten.mm``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..errors import PerExampleSignal

aten = torch.ops.aten

#: OpOverload -> batching rule
BATCH_RULES: dict[Any, Callable] = {}


def batch_rule(*ops, batched_kwargs: bool = False) -> Callable[[Callable], Callable]:
    """Register the decorated function as the batching rule of ``ops``.

    ``batched_kwargs=True``: the rule also takes batched keyword arguments (it is called
    with a fifth argument, ``kwarg_dims``; see the module docstring)."""

    def register(fn: Callable) -> Callable:
        if batched_kwargs:
            fn._pyf_batched_kwargs = True
        for op in ops:
            if isinstance(op, torch._ops.OpOverloadPacket):
                for name in op.overloads():
                    BATCH_RULES[getattr(op, name)] = fn
            else:
                BATCH_RULES[op] = fn
        return fn

    return register


def plain_apply(function_class) -> Callable:
    """``function_class.apply`` for a rule's own ``autograd.Function`` on plain physical tensors,
    as torch's C++ apply: torch's Python ``apply`` (and the entry point pyfunctorch swaps in while
    transforms are live) only add checks that plain tensors pass, ~10 us a call."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, function_class)


def shared_by_examples(t) -> bool:
    """A plain physical operand whose examples are one tensor (batch stride 0) and that autograd
    differentiates: an input a grad level inside vmap differentiates per example (reverse._Shadow
    expands it along the batch). Products and convolutions with it run once (linalg, convolution)."""
    return type(t) is torch.Tensor and t.stride(0) == 0 and t.shape[0] > 1 and t.requires_grad \
        and torch.is_grad_enabled()


def differentiated(t) -> bool:
    """A physical value whose derivative some level takes: it requires grad (torch's autograd
    records the physical batch: per-sample gradients) or it is a lower level's wrapper (a grad or
    jvp level around vmap). A rule whose fold is right as a function but not as a derivative
    (embedding's padding row, embedding_bag's frequencies) computes per example then."""
    return t is not None and (type(t) is not torch.Tensor or t.requires_grad)


def overloads(*packets, only: Sequence[str] | None = None):
    """Every OpOverload of the given packets (optionally only the named overloads)."""
    out = []
    for p in packets:
        for name in p.overloads():
            if only is None or name in only:
                out.append(getattr(p, name))
    return out


def is_out_overload(op) -> bool:
    """Whether ``op`` writes into a keyword-only ``out=`` tensor (vmap handles those
    generically: the functional overload, then a copy into ``out``)."""
    return any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def non_out_overloads(*names: str) -> list:
    """Every overload of the named aten packets except the ``out=`` ones (names this torch
    lacks are skipped)."""
    ops = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        ops.extend(op for op in (getattr(packet, ov) for ov in packet.overloads()) if not is_out_overload(op))
    return ops


def functional_overloads(*names: str) -> list:
    """The functional overloads of the named aten packets: neither ``out=`` nor in-place
    (their outputs would be unbatched); names this torch lacks are skipped."""
    out = []
    for n in names:
        packet = getattr(aten, n, None)
        if packet is None:
            continue
        for o in packet.overloads():
            op = getattr(packet, o)
            if not op._schema.is_mutable:
                out.append(op)
    return out


def map_outputs(fn, out):
    """Apply ``fn`` to every tensor of an op's output (a tensor or a tuple; None stays)."""
    if isinstance(out, (tuple, list)):
        return type(out)(None if o is None else fn(o) for o in out)
    return fn(out)


# -- shared rule helpers (nn families) ---------------------------------------------


def full_args(op, args, kwargs, dims):
    """Positional args (and their dims) with the schema's defaults filled in: dispatch drops
    trailing defaults."""
    args, dims = list(args), list(dims)
    for a in op._schema.arguments[len(args):]:
        if a.kwarg_only:
            break
        args.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        dims.append(None)
    return args, dims


def loop_examples(op, args, dims, B):
    """One call per example, inside a rule: for rare corners a fold cannot express."""
    outs = [op(*[a.select(0, b) if d is not None else a for a, d in zip(args, dims)]) for b in range(B)]
    return torch.stack(outs), 0


def batch_into_channels(x, has_n):
    """``(B, N, C, *S)`` (or ``(B, C, *S)`` without N) -> ``(N, B*C, *S)``."""
    if not has_n:
        x = x.unsqueeze(1)
    return x.movedim(0, 1).flatten(1, 2)


def unbatch_channels(y, B, has_n):
    """``(N, B*C, *S)`` -> the batched result and its batch dim."""
    y = y.reshape((y.shape[0], B, -1) + y.shape[2:])
    if not has_n:
        return y.squeeze(0), 0
    return y, 1


def normalize_args(op, args, kwargs, dims):
    """Positional form of every non-kwarg-only argument (defaults filled in), so rules can
    unpack by position whatever way the caller passed them. Kwarg-only ones stay in kwargs."""
    args, dims, kwargs = list(args), list(dims), dict(kwargs)
    for i, a in enumerate(op._schema.arguments):
        if a.kwarg_only:
            break
        if i < len(args):
            continue
        if a.name in kwargs:
            args.append(kwargs.pop(a.name))
        elif a.has_default_value():
            args.append(a.default_value)
        else:
            break
        dims.append(None)
    return args, kwargs, dims


def flat_examples(t: torch.Tensor, B: int | None = None) -> torch.Tensor:
    """``t`` as (B, elements of one example); ``reshape(B, -1)`` but also defined for an
    empty batch (B == 0), where -1 would be ambiguous. ``B`` defaults to ``t.shape[0]``."""
    if B is None:
        B = t.shape[0]
    if B:
        return t.reshape(B, -1)
    return t.reshape(0, math.prod(t.shape[1:]) if t.dim() > 1 else 0)


# -- shared dimension bookkeeping (JAX's bdim_at_front / matchaxis) -----------------


def rank(x: torch.Tensor, d) -> int:
    """Logical rank of ``x`` whose batch dim is ``d`` (0 or None)."""
    return x.dim() - (d is not None)


def batch_size_of(args, dims) -> int:
    for a, d in zip(args, dims):
        if d is not None:
            if isinstance(d, list):
                for b, e in zip(a, d):
                    if e is not None:
                        return b.shape[e]
            else:
                return a.shape[d]
    raise AssertionError("no batched argument")


def pad_to_rank(x: torch.Tensor, d, r: int) -> torch.Tensor:
    """Insert size-1 dims after the batch dim so that ``x``'s logical rank is ``r``.

    Unbatched tensors need no padding: broadcasting aligns them from the right.
    """
    if d is None:
        return x
    missing = r - (x.dim() - 1)
    if missing <= 0:
        return x
    return x.reshape(x.shape[:1] + (1,) * missing + x.shape[1:])


def materialize(x: torch.Tensor, d, B: int) -> torch.Tensor:
    """``x`` with a batch dim at the front, expanding it if it had none."""
    if d is not None:
        return x
    return x.unsqueeze(0).expand((B,) + x.shape)


def wrap_dim(dim: int, r: int) -> int:
    """Normalise a (possibly negative) logical dim of a rank-``r`` tensor."""
    if r == 0:
        r = 1  # torch accepts dim 0 / -1 on scalars
    if dim < -r or dim >= r:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-r}, {r - 1}], but got {dim})")
    return dim + r if dim < 0 else dim


def physical_dim(dim: int, r: int) -> int:
    """The physical dim (batch dim at front) of logical dim ``dim`` of a rank-``r`` tensor."""
    return wrap_dim(dim, r) + 1


def move_bdim(x: torch.Tensor, d, to: int = 0) -> torch.Tensor:
    if d is None or d == to:
        return x
    return x.movedim(d, to)


def per_example_signal(msg: str) -> Exception:
    """An exception asking the vmap level that runs the calling rule to re-run the function
    once per example (as ``.item()`` on a batched tensor does), e.g. when the examples'
    results differ in shape. Rules are not told their level: the signal is raised level-free
    and the vmap level whose dispatch runs the rule claims it (``VmapInterpreter.dispatch``).
    Raise what it returns."""
    return PerExampleSignal(msg)


# -- per-example shape checks (rank-polymorphic ops) ---------------------------------------
#
# A rule that runs the op on the whole physical batch (the batch dim in front) lets an op
# that accepts several ranks (linalg ops batch over leading dims, matmul broadcasts) read the
# batch dim as one of its own: ``vmap(torch.linalg.det)`` of a batch of vectors would return
# the determinant of the whole batch. ``per_example_checked(rule)`` first runs the op on
# meta tensors of one example's shape and strides, so each example is checked as the op
# itself checks it and the op's own error is raised. The verdict is cached per op and
# argument signature: a hit costs building the key (~2-3 us, measured on mm).

_UNSET = object()


def _example_key(a, d):
    if isinstance(a, torch.Tensor):
        return (a.shape, a.stride(), a.dtype, d)  # (the whole batch's: cheaper than slicing)
    if isinstance(a, (list, tuple)):
        ds = d if isinstance(d, list) else [d] * len(a)
        return tuple(_example_key(b, e) for b, e in zip(a, ds))
    return a


def _example_meta(a, d):
    if isinstance(a, torch.Tensor):
        shape, stride = (a.shape[1:], a.stride()[1:]) if d is not None else (a.shape, a.stride())
        return torch.empty_strided(shape, stride, dtype=a.dtype, device="meta")
    if isinstance(a, (list, tuple)):
        ds = d if isinstance(d, list) else [d] * len(a)
        return type(a)(_example_meta(b, e) for b, e in zip(a, ds))
    return a


def check_example(op, args, kwargs, dims, kernel: bool = False) -> None:
    """Raise the op's own error if one example's arguments are invalid for it (see above).
    ``kernel=True``: skip the meta kernel (one that checks less than the kernel) and run the
    kernel on the first example (for rare argument shapes only: it costs a real call)."""
    if kernel:
        _first_example(op, args, kwargs, dims)
        return
    if kwargs and any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return  # (batched keyword tensors: not checked)
    try:
        cache = op._pyf_example_checks  # per op, on the op (hashing an OpOverload is slow)
    except AttributeError:
        cache = {}
        try:
            op._pyf_example_checks = cache
        except AttributeError:
            pass
    try:
        key = (*[_example_key(a, d) for a, d in zip(args, dims)], *kwargs.items()) if kwargs else \
            tuple([_example_key(a, d) for a, d in zip(args, dims)])
        err = cache.get(key, _UNSET)
    except TypeError:  # an unhashable argument: check without caching
        key, err = None, _UNSET
    if err is None:
        return
    if err is _UNSET:
        from torch.utils._mode_utils import no_dispatch

        err = None
        try:
            try:
                with no_dispatch():
                    op(*[_example_meta(a, d) for a, d in zip(args, dims)], **kwargs)
            except NotImplementedError:
                # no meta kernel (geqrf ...): the kernel on the first example checks instead, once
                # per argument layout (a function op's only; an in-place one would write into it)
                if not op._schema.is_mutable:
                    _first_example(op, args, kwargs, dims)
        except (RuntimeError, IndexError, ValueError, TypeError) as e:
            err = (type(e), e.args)  # (not the exception: its traceback would keep tensors alive)
        except AssertionError as e:  # some Python meta kernels assert where the kernel raises RuntimeError
            err = (RuntimeError, e.args)
        if key is not None:
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = err
        if err is None:
            return
    # the example is invalid for the op: its own kernel on the first example raises the
    # op's own error (meta kernels sometimes word it differently)
    if batch_size_of(args, dims):
        _first_example(op, args, kwargs, dims)
        return  # (the kernel accepts what its meta kernel refused: trust the kernel)
    raise err[0](*err[1])


def _first_example(op, args, kwargs, dims):
    if not batch_size_of(args, dims):
        return
    op(*[a.select(0, 0) if isinstance(a, torch.Tensor) and d is not None else
         ([b.select(0, 0) if e is not None else b for b, e in zip(a, d)] if isinstance(d, list) else a)
         for a, d in zip(args, dims)], **kwargs)


def per_example_checked(rule: Callable = None, *, valid: Callable | None = None) -> Callable:
    """``rule`` preceded by ``check_example``: for rules of rank-polymorphic ops. ``valid(op,
    args, dims)``: a cheap test that the examples are certainly valid (then the check, a
    cache lookup of a few us, is skipped); False means "not known", not "invalid"."""
    if rule is None:
        return lambda r: per_example_checked(r, valid=valid)

    def checked(op, args, kwargs, dims, *rest):
        if valid is None or kwargs or not valid(op, args, dims):
            check_example(op, args, kwargs, dims)
        return rule(op, args, kwargs, dims, *rest)

    checked.__name__ = getattr(rule, "__name__", "rule")
    checked.__doc__ = rule.__doc__
    if getattr(rule, "_pyf_batched_kwargs", False):
        checked._pyf_batched_kwargs = True
    return checked
