"""The public ``vmap``: in_dims/out_dims handling, batch size, chunking, and the per-example re-run when the function's control flow depends on the data."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

from .. import _core
from .._compiler import opaque_to_compiler
from .._core import push_interpreter
from .._pytree import broadcast_prefix, tree_flatten, tree_map, tree_unflatten
from ..errors import DataDependentError, PerExampleSignal, PerformanceWarning, is_torch_internal_assert
from .interpreter import VmapInterpreter
from .randomness import draw_seed
from .tensor import BatchedTensor

_RANDOMNESS = ("error", "different", "same")


def vmap(
    func: Callable,
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: int | None = None,
    strict: bool = False,
) -> Callable:
    """Vectorize ``func`` over a batch dimension of its inputs.

    ``vmap(f)(x)`` equals ``torch.stack([f(x_i) for x_i in x.unbind(0)])`` for pure
    ``f``, computed with batched operations. ``in_dims`` says which dim of each input
    (a pytree prefix of the positional args; ``None`` = not batched) is the batch;
    ``out_dims`` where the batch dim goes in each output. ``randomness`` is
    ``'error'``, ``'different'`` or ``'same'``. ``chunk_size`` runs the batch in
    chunks of that size (less memory). Keyword arguments are passed unbatched.

    Examples:
        >>> import torch
        >>> from pyfunctorch import vmap
        >>> x = torch.randn(5, 3)
        >>> vmap(torch.dot)(x, x).shape
        torch.Size([5])
        >>> torch.allclose(vmap(torch.dot)(x, x), (x * x).sum(1))
        True
    """
    if randomness not in _RANDOMNESS:
        raise ValueError(
            f"vmap: randomness must be one of {_RANDOMNESS}; got {randomness!r}. 'error' raises on "
            "random ops, 'different' draws independently per example, 'same' shares one draw."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"vmap: chunk_size must be None or a positive int; got {chunk_size!r}.")
    _check_dims_type(in_dims, "in_dims")
    _check_dims_type(out_dims, "out_dims")

    @functools.wraps(func)
    @opaque_to_compiler
    def vmapped(*args, **kwargs):
        flat_args, args_spec = tree_flatten(args)
        flat_in = _leaf_in_dims(in_dims, args, flat_args, func)
        B = _batch_size(flat_args, flat_in, func)
        # randomness='different': one seed per vmap call, shared by all chunks
        rng = draw_seed() if randomness == "different" else None
        if chunk_size is not None and chunk_size < B:
            return _chunked(func, flat_args, args_spec, flat_in, out_dims, randomness, chunk_size, B, kwargs, strict, rng)
        return _vmap_impl(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, strict, rng,
                          orig_args=args)

    return vmapped


def _check_dims_type(dims, what):
    if dims is None or (isinstance(dims, int) and not isinstance(dims, bool)):
        return
    if isinstance(dims, (tuple, list, dict)):
        for d in dims.values() if isinstance(dims, dict) else dims:
            _check_dims_type(d, what)
        return
    raise ValueError(
        f"vmap: {what} must be an int, None, or a (nested) tuple/list/dict of those; got {dims!r} "
        f"of type {type(dims).__name__}."
    )


def _leaf_in_dims(in_dims, args, flat_args, func):
    if isinstance(in_dims, int) or in_dims is None:
        flat_in = [in_dims] * len(flat_args)
    else:
        if not isinstance(in_dims, tuple):
            raise ValueError(
                f"vmap({_name(func)}): in_dims must be an int, None or a tuple with one entry per "
                f"positional argument; got a {type(in_dims).__name__}. Wrap it in a tuple: in_dims=({in_dims!r},)."
            )
        if len(in_dims) != len(args):
            raise ValueError(
                f"vmap({_name(func)}): in_dims has {len(in_dims)} entries but the function was called "
                f"with {len(args)} positional arguments; give one in_dims entry per argument."
            )
        flat_in = broadcast_prefix(in_dims, args, f"vmap({_name(func)}): in_dims")
    for x, d in zip(flat_args, flat_in):
        if d is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"vmap({_name(func)}): in_dims says to batch a {type(x).__name__} input over dim {d}, "
                "but only tensors can be batched; use None for non-tensor inputs."
            )
        r = x.dim()
        if not -r <= d < r:
            raise ValueError(
                f"vmap({_name(func)}): in_dim {d} is out of range for an input of shape "
                f"{tuple(x.shape)} (it has {r} dims, so valid dims are {-r}..{r - 1})."
            )
    return [None if d is None else d % x.dim() for x, d in zip(flat_args, flat_in)]


def _batch_size(flat_args, flat_in, func) -> int:
    sizes = {x.shape[d] for x, d in zip(flat_args, flat_in) if d is not None}
    if not sizes:
        raise ValueError(
            f"vmap({_name(func)}): no input is batched (every in_dim is None or there are no tensor "
            "inputs). Batch at least one tensor input."
        )
    if len(sizes) > 1:
        detail = ", ".join(
            f"input {i} has size {x.shape[d]} in dim {d}" for i, (x, d) in enumerate(zip(flat_args, flat_in)) if d is not None
        )
        raise ValueError(
            f"vmap({_name(func)}): the batched inputs have different batch sizes ({detail}); they must all "
            "have the same size in their batch dims."
        )
    return sizes.pop()


def _new_level(B, randomness, rng, offset=0) -> "VmapInterpreter":
    interp = VmapInterpreter(B, randomness)
    interp.rng_base = rng
    interp.example_offset = offset
    return interp


def _rebuild_args(leaves, args_spec, flat_in, orig_args):
    """The positional args for the call: an argument with no batched leaf is passed as the
    caller's own object (a list the function mutates is the caller's list, not a copy)."""
    args = list(tree_unflatten(leaves, args_spec))
    if orig_args is not None and None in flat_in:
        i = 0
        for n, (a, spec) in enumerate(zip(orig_args, args_spec.children())):
            k = spec.num_leaves
            if k and all(d is None for d in flat_in[i : i + k]):
                args[n] = a
            i += k
    return args


def _empty_batch_layout(x, d, B):
    """An input's physical value and batch dim. With an empty batch (B = 0) the value holds no
    element, so its strides can be anything its maker chose (a batch dim in the middle, a
    transposed empty tensor), and the per-example layouts derived from them claim overlaps and
    orders no example has; torch's forward AD then asserts on views of such values (its tangents
    are laid out anew) and ``copy_`` refuses them as overlapping. The value is taken as a fresh
    copy with the batch dim in front and the standard strides: nothing to copy, the graph to
    the input kept (fuzzer seeds 69815, 306944)."""
    if B:
        return x, d
    return x.movedim(d, 0).clone(memory_format=torch.contiguous_format), 0


def _vmap_impl(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, strict=False, rng=None, offset=0,
               orig_args=None):
    # inference tensors (made under torch.inference_mode) have no version counter
    versions = [x._version if isinstance(x, torch.Tensor) and not x.is_inference() else None for x in flat_args]
    interp = _new_level(B, randomness, rng, offset)
    try:
        with push_interpreter(interp):
            batched = [x if d is None else BatchedTensor(*_empty_batch_layout(x, d, B), interp)
                       for x, d in zip(flat_args, flat_in)]
            out = func(*_rebuild_args(batched, args_spec, flat_in, orig_args), **kwargs)
            flat_out, out_spec = tree_flatten(out)
            flat_out = [_core._resolve_dead(o) for o in flat_out]
            flat_od = _leaf_out_dims(out_dims, out, flat_out, func)
            res = [_unwrap_out(interp, o, d, func) for o, d in zip(flat_out, flat_od)]
        return tree_unflatten(res, out_spec)
    except PerExampleSignal as signal:
        if signal.interp is not interp:
            raise  # another vmap level's business (or unclaimed: an ordinary DataDependentError)
        if strict:
            raise DataDependentError(str(signal) + " (strict=True: not falling back to a per-example loop)") from None
        if B == 0:
            raise DataDependentError(
                str(signal) + " The batch is empty (batch size 0), so there is no example to run the function "
                "on and the outputs' shapes are unknown. Skip the call for an empty batch, or make the "
                "control flow independent of the data."
            ) from None
        mutated = [i for i, (x, v) in enumerate(zip(flat_args, versions)) if v is not None and x._version != v]
        if mutated:
            raise DataDependentError(
                str(signal) + " vmap would re-run the function once per example, but the batched attempt "
                "already modified its inputs in place, so a re-run would see changed data. Move the "
                "in-place update after the data-dependent part, or make it out-of-place."
            ) from None
        _warn_per_example(signal)
        return _per_example(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, interp.rng_base, offset)
    except RuntimeError as e:
        if B == 0 and is_torch_internal_assert(e):
            # torch's own consistency checks on tensors with no element (forward AD's view
            # layouts, fuzzer seed 22145; torch.func fails the same way): say what happened
            raise RuntimeError(
                f"vmap({_name(func)}): the batch is empty (batch size 0) and torch failed an internal "
                f"check on the empty values ({str(e).splitlines()[0][:200]}). An empty batch has nothing "
                "to compute: skip the call when the batch size is 0 (the results are empty tensors of "
                "the per-example shapes with a batch dim of size 0)."
            ) from e
        raise


_WARNED_SITES: set = set()
_PKG_DIR = __file__.rsplit("/", 2)[0]  # the pyfunctorch package


def _user_site(tb):
    """The innermost traceback frame outside pyfunctorch and torch: the user's line."""
    site = None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if not fname.startswith(_PKG_DIR) and "/torch/" not in fname:
            site = (fname, tb.tb_lineno)
        tb = tb.tb_next
    return site


def _warn_per_example(signal) -> None:
    site = _user_site(signal.__traceback__)
    if site in _WARNED_SITES:
        return
    _WARNED_SITES.add(site)
    where = f"{site[0]}:{site[1]}" if site else "an unknown line"
    warnings.warn(
        f"{signal} Falling back to running the function once per example (slow but exact). "
        f"The data-dependent step is at {where}. Pass strict=True to vmap to make this an error.",
        PerformanceWarning,
        stacklevel=4,
    )


def _per_example(func, flat_args, args_spec, flat_in, out_dims, randomness, B, kwargs, rng=None, offset=0):
    """vmap's definition: call ``func`` on each example and stack the results."""
    same_rng = randomness == "same"
    if same_rng:
        states = _rng_states()
    outs = []
    for b in range(B):
        if same_rng:
            _set_rng_states(states)  # every example sees the same draws
        example = [x if d is None else x.select(d, b) for x, d in zip(flat_args, flat_in)]
        # A size-1 vmap level keeps the randomness flag in force for random factories.
        with push_interpreter(_new_level(1, randomness, rng, offset + b)) as one:
            out = func(*tree_unflatten(example, args_spec), **kwargs)
            # tensors the function created belong to the size-1 level: take their one example
            out = tree_map(lambda t: one.unwrap_value(t).select(0, 0) if isinstance(t, BatchedTensor) and t._interp is one
                           else t, out)
            outs.append(out)
    flat0, spec = tree_flatten(outs[0])
    cols = []
    for o in outs:
        flat, sp = tree_flatten(o)
        if sp != spec:
            raise DataDependentError(
                f"vmap({_name(func)}): the function returned differently structured outputs for different "
                f"examples ({spec} vs {sp}); vmap needs one output structure."
            )
        cols.append(flat)
    flat_od = _leaf_out_dims(out_dims, outs[0], flat0, func)
    res = [_combine_examples([c[i] for c in cols], d, func) for i, d in enumerate(flat_od)]
    return tree_unflatten(res, spec)


def _combine_examples(vals, d, func):
    if d is None:
        first = vals[0]
        same = all(torch.equal(v, first) if isinstance(v, torch.Tensor) else v == first for v in vals)
        if not same:
            raise ValueError(
                f"vmap({_name(func)}): out_dims is None for an output that differs between examples; "
                "give it an int out_dim."
            )
        return first
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    if len(tensors) != len(vals):  # e.g. the seed's relu: `return x` or `return 0`
        if not all(isinstance(v, (torch.Tensor, bool, int, float, complex)) for v in vals):
            raise ValueError(
                f"vmap({_name(func)}): the function returned a non-tensor output where out_dims is {d}; "
                "only tensors and numbers can be stacked."
            )
        ref = tensors[0] if tensors else None
        vals = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=None if ref is None else ref.dtype,
                                                                          device=None if ref is None else ref.device)
                for v in vals]
    shapes = {tuple(v.shape) for v in vals}
    if len(shapes) == 1:
        r = vals[0].dim() + 1
        if not -r <= d < r:
            raise ValueError(f"vmap({_name(func)}): out_dim {d} is out of range for outputs with {r - 1} dims.")
        return torch.stack(vals, dim=d)
    if d != 0:
        raise DataDependentError(
            f"vmap({_name(func)}): the examples' outputs have different shapes ({sorted(shapes)[:3]}...), so "
            "the result is ragged; a ragged result can only be batched along out_dim 0."
        )
    return _ragged(vals)


def _ragged(vals):
    """A torch.nested tensor whose i-th component is the i-th example's output."""
    if any(v.is_nested for v in vals):
        raise DataDependentError(
            "vmap: the examples' outputs are themselves ragged (nested) tensors of different shapes: a vmap "
            "over a vmap whose results are ragged would need a tensor ragged in two dims, which torch.nested "
            "does not have. Batch the inner call over the outer examples with a for-loop instead."
        )
    ranks = {v.dim() for v in vals}
    if len(ranks) != 1:
        raise DataDependentError("vmap: the examples' outputs have different numbers of dims; cannot batch them.")
    if vals[0].dim() >= 1 and len({tuple(v.shape[1:]) for v in vals}) == 1:
        return torch.nested.nested_tensor(vals, layout=torch.jagged)
    return torch.nested.nested_tensor(vals)


def _leaf_out_dims(out_dims, out, flat_out, func):
    if isinstance(out_dims, int) or out_dims is None:
        return [out_dims] * len(flat_out)
    if isinstance(out_dims, tuple) and not isinstance(out, tuple):
        if len(out_dims) == 1:
            return broadcast_prefix(out_dims[0], out, f"vmap({_name(func)}): out_dims")
    return broadcast_prefix(out_dims, out, f"vmap({_name(func)}): out_dims")


def _unwrap_out(interp, o, d, func):
    if not isinstance(o, torch.Tensor):
        if d is None:
            return o
        if isinstance(o, (bool, int, float, complex)):
            # one Python number for every example: the loop's stack of it (as the per-example
            # path stacks numbers that differ between examples)
            return interp.unwrap_value(torch.as_tensor(o), 0).contiguous()
        raise ValueError(
            f"vmap({_name(func)}): the function returned a {type(o).__name__} where out_dims is {d}; "
            "only tensors can carry a batch dim. Return tensors, or set that out_dim to None."
        )
    if d is None:
        if isinstance(o, BatchedTensor) and o._interp is interp and o._lazy:
            return o._lazy_plain  # created inside and never written per example
        if isinstance(o, BatchedTensor) and o._interp is interp:
            raise ValueError(
                f"vmap({_name(func)}): out_dims is None for an output that depends on the batched "
                "inputs; it has a batch dim, so give it an int out_dim."
            )
        return o
    # (a batch of this level: its physical rank, read without the wrapper's __torch_function__)
    r = o._value.dim() if type(o) is BatchedTensor and o._interp is interp else o.dim() + 1
    if not -r <= d < r:
        raise ValueError(
            f"vmap({_name(func)}): out_dim {d} is out of range for an output with {o.dim()} dims "
            f"(plus the batch dim: valid dims are {-r}..{r - 1})."
        )
    return interp.unwrap_value(o, d % r)


def _chunked(func, flat_args, args_spec, flat_in, out_dims, randomness, chunk_size, B, kwargs, strict=False, rng=None):
    starts = list(range(0, B, chunk_size))
    pieces = []
    # randomness='same': one draw for the whole batch, so every chunk replays the first
    # chunk's draws (the generators end where one unchunked call leaves them)
    same = _rng_states() if randomness == "same" else None
    for s in starts:
        if same is not None:
            _set_rng_states(same)
        n = min(chunk_size, B - s)
        chunk = [x if d is None else x.narrow(d, s, n) for x, d in zip(flat_args, flat_in)]
        pieces.append(_vmap_impl(func, chunk, args_spec, flat_in, out_dims, randomness, n, kwargs, strict, rng, s))
    flat0, spec = tree_flatten(pieces[0])
    flat_od = _leaf_out_dims(out_dims, pieces[0], flat0, func)
    cols = [tree_flatten(p)[0] for p in pieces]
    res = []
    for i, d in enumerate(flat_od):
        if d is None:
            res.append(flat0[i])
        else:
            res.append(torch.cat([c[i] for c in cols], dim=d))
    return tree_unflatten(res, spec)


def _rng_states():
    """The states of torch's default generators (CPU, and CUDA where it is in use)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)
