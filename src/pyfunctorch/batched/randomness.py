"""Random ops under vmap: randomness='error'/'different'/'same', per-example key streams, and the random torch entry points that never reach a BatchedTensor (trap 7)."""

from __future__ import annotations


import torch

from .. import _core
from .. import _traced_random
from .. import random as _random
from .._core import Interpreter, LevelTensor
from .._ops import _mutated_returns, _return_aliases
from .._pytree import tree_flatten, tree_map
from ..errors import RandomnessError, randomness_error
from .fallbacks import decomposition, stack_results
from .tensor import BatchedTensor, slice_example



# -- does this call draw? ------------------------------------------------------------
# An op tagged ``nondeterministic_seeded`` is random only when the call draws: attention with
# ``dropout_p=0.``, ``native_dropout(x, p, train=False)``, ``_cudnn_rnn(dropout=0.)``,
# ``rrelu(training=False)`` compute a deterministic function of their inputs. The probability
# and train-flag arguments are found in the op's schema, once per op.

_PROBABILITY_ARGS = ("dropout_p", "dropout")  # (and ``p`` of ops whose name says dropout;
# not ``_fused_dropout``'s, which is the probability of *keeping* an element)
_TRAIN_ARGS = ("train", "training")


def draw_predicate(func):
    """For a random-tagged op with a dropout probability or a train flag in its schema, a
    function ``draws(args, kwargs) -> bool`` telling whether this call draws anything;
    ``None`` for ops that always draw (``randn_like``, ``bernoulli``, ...)."""
    schema = func._schema
    prob = train = None
    for i, a in enumerate(schema.arguments):
        kind = str(a.type).removeprefix("Optional[").removesuffix("]").removesuffix("?")
        if a.name in _PROBABILITY_ARGS or (a.name == "p" and "dropout" in schema.name and "_fused_dropout" not in schema.name):
            if kind == "float":
                prob = (i, a.name, a.default_value if a.has_default_value() else None, a.kwarg_only)
        elif a.name in _TRAIN_ARGS and kind == "bool":
            train = (i, a.name, a.default_value if a.has_default_value() else None, a.kwarg_only)
    if prob is None and train is None:
        return None

    def value(spec, args, kwargs):
        i, name, default, kwarg_only = spec
        if not kwarg_only and i < len(args):
            return args[i]
        return kwargs.get(name, default)

    def draws(args, kwargs) -> bool:
        if prob is not None:
            p = value(prob, args, kwargs)
            if isinstance(p, (int, float)) and p == 0:
                return False
        if train is not None and value(train, args, kwargs) is False:
            return False
        return True

    return draws


def random_op(interp: "Interpreter", func, args, kwargs):
    mode = interp.randomness
    if mode == "error":
        raise randomness_error(func)
    aliased = _mutated_returns(func)
    if interp.batch_size == 0:
        return _empty_batch_draw(interp, func, args, kwargs, aliased)
    uargs, dims = interp._unwrap_args(args)
    any_batched = any(d is not None for d in dims)
    if mode == "same":
        if aliased is not None:
            # in-place fill of a batched tensor: draw one example, write it to all
            self_ = args[0]
            if any(d is not None for d in dims[1:]):
                raise RandomnessError(
                    f"vmap: randomness='same' cannot be honoured for {func} with batched parameters "
                    "(each example has its own distribution). Use randomness='different'."
                )
            one = torch.empty(self_.shape, dtype=self_.dtype, device=self_.device)
            func(one, *args[1:], **kwargs)
            self_.copy_(one)
            return self_
        if func.overloadpacket.__name__.endswith("_like") and dims[0] is not None and \
                not any(d is not None for d in dims[1:]):
            # rand_like(x): x only gives the shape, so one draw serves every example
            return func(uargs[0][0], *uargs[1:], **kwargs)
        if any_batched:
            raise RandomnessError(
                f"vmap: randomness='same' cannot be honoured for {func} with batched tensor inputs "
                "(each example has its own distribution). Use randomness='different'."
            )
        return func(*args, **kwargs)
    # 'different': every example draws from its own stream (see example_keys)
    if aliased is not None and dims and dims[0] is None:
        raise RandomnessError(
            f"vmap: randomness='different' needs {func} to write different values for each example "
            "into a tensor that is not batched. Create the tensor inside the function from a batched one."
        )
    has_generator = any(a.name == "generator" for a in func._schema.arguments)
    if not has_generator:
        decomp = decomposition(func)
        if decomp is not None:  # e.g. native_dropout -> bernoulli_, which takes a generator
            return decomp(*args, **kwargs)
        B = interp.batch_size
        out = func(*[_materialize_arg(a, d, B) for a, d in zip(uargs, dims)], **kwargs)
        return _return_aliases(aliased, args, kwargs, out) if aliased is not None else interp._wrap(out, 0)
    keys = example_keys(interp)
    if _traced_random.tracing() and len(func._schema.returns) == 1 and \
            not any(isinstance(u, LevelTensor) for u in uargs):
        # pyfunctorch.compile is tracing: the same loop as below, as one recorded op
        try:
            out = _traced_random.keyed_draws(func, list(uargs), list(dims), kwargs,
                                             _traced_random.stacked_keys(keys), aliased is not None,
                                             _device_of(args))
        except LookupError:
            pass
        else:
            return _return_aliases(aliased, args, kwargs, None) if aliased is not None else interp._wrap(out, 0)
    outs = []
    for b in range(interp.batch_size):
        a_b = tuple(slice_example(a, interp, b) for a in args)
        outs.append(func(*a_b, **dict(kwargs, generator=_random.generator_for(keys[b], _device_of(args)))))
    if aliased is not None:
        return _return_aliases(aliased, args, kwargs, None)
    return stack_results(interp, func, outs)


def _empty_batch_draw(interp, func, args, kwargs, aliased):
    """A random op on an empty batch draws nothing: an empty result of one example's shape
    (found on meta tensors), or, in place, nothing to write."""
    if aliased is not None:
        return _return_aliases(aliased, args, kwargs, None)

    def meta(x):
        if isinstance(x, torch.Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        if isinstance(x, (list, tuple)):
            return type(x)(meta(y) for y in x)
        return x

    out = func(*meta(tuple(args)), **{k: meta(v) for k, v in kwargs.items() if k != "generator"})
    device = _device_of(args)
    if isinstance(out, torch.Tensor):
        return BatchedTensor(torch.empty((0,) + tuple(out.shape), dtype=out.dtype, device=device), 0, interp)
    return type(out)(BatchedTensor(torch.empty((0,) + tuple(o.shape), dtype=o.dtype, device=device), 0, interp)
                     for o in out)


def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def example_keys(interp: "Interpreter") -> list:
    """Per-example keys for the next random op at this level: they depend on the vmap
    call's seed, the op's position among the level's random ops, and the example's index
    in the *whole* batch -- so chunk_size never changes the draws."""
    if interp.rng_base is None:
        interp.rng_base = draw_seed()
    call_key = _random.fold_in(interp.rng_base, interp.rng_calls)
    interp.rng_calls += 1
    idx = torch.arange(interp.batch_size, dtype=torch.int64) + interp.example_offset
    return list(_random._mix(call_key ^ _random._mix(idx + 0x2545F4914F6CDD1D)).unbind(0))


def draw_seed() -> torch.Tensor:
    # one draw from torch's global generator: torch.manual_seed still makes runs repeat.
    # (= _random.key(int(seed)) without reading the value into Python: traceable)
    return _random._mix(torch.ops.aten.randint.low(0, 2**62, (), dtype=torch.int64))


def _materialize_arg(a, d, B):
    if isinstance(a, torch.Tensor) and d is None and a.dim() >= 0:
        return a.unsqueeze(0).expand((B,) + a.shape).contiguous()
    return a


DROPOUTS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")


def _vmap_levels():
    return [i for i in _core._state.stack if i.kind == "vmap"]


def random_entry_point(original, args, kwargs):
    """A random torch call whose tensor arguments are all plain (or absent): it never
    reaches a BatchedTensor, so vmap's randomness flag is applied here (trap 7)."""
    name = getattr(original, "__name__", "")
    if name in DROPOUTS and original.__module__ == "torch.nn.functional":
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        if not training or p == 0:
            return original(*args, **kwargs)
    leaves, _ = tree_flatten((args, kwargs))
    if any(isinstance(x, LevelTensor) for x in leaves):
        return original(*args, **kwargs)  # reaches __torch_dispatch__, where the level decides
    levels = _vmap_levels()
    if not levels:
        return original(*args, **kwargs)
    inplace = name.endswith("_")
    for lv in levels:
        if lv.randomness == "error":
            raise randomness_error(original)
        if lv.randomness == "different":
            if inplace:
                raise RandomnessError(
                    f"vmap: randomness='different' needs {name} to write different values for each "
                    "example into a tensor that is not batched. Create the tensor from a batched input "
                    "(e.g. torch.empty_like(x)) instead."
                )
    different = [lv for lv in levels if lv.randomness == "different"]
    if not different:
        return original(*args, **kwargs)
    first_tensor = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
    if first_tensor is not None:
        # a random op on a plain tensor (rand_like(w), F.dropout(w)): make the tensor batched
        # at the innermost 'different' level, so the op reaches vmap's dispatch
        lv = different[-1]
        lifted = BatchedTensor(first_tensor.unsqueeze(0).expand((lv.batch_size,) + first_tensor.shape), 0, lv)
        new_args, new_kwargs = tree_map(lambda x: lifted if x is first_tensor else x, (args, kwargs))
        return original(*new_args, **new_kwargs)
    # a factory: one draw per example (of every 'different' level), each from its own stream
    keys = [None]
    for lv in different:  # outermost first
        lv_keys = example_keys(lv)
        keys = [k if prev is None else _random.fold_in(prev, k) for prev in keys for k in lv_keys]
    draws = None
    if not keys:  # an empty batch: no draws, an empty result of the draw's shape
        one = original(*args, **dict(kwargs, device="meta"))
        draws = torch.empty((0,) + tuple(one.shape), dtype=one.dtype, device=kwargs.get("device"))
    elif _traced_random.tracing():  # pyfunctorch.compile is tracing: the same loop, as one recorded op
        try:
            draws = _traced_random.keyed_draws(original, list(args), [None] * len(args), kwargs,
                                               _traced_random.stacked_keys(keys), False, None)
        except LookupError:
            pass
    if draws is None:
        draws = torch.stack([original(*args, **dict(kwargs, generator=_random.generator_for(k))) for k in keys])
    out = draws.reshape(tuple(lv.batch_size for lv in different) + draws.shape[1:])
    for lv in different:  # outermost first: each level peels one leading dim
        out = BatchedTensor(out, 0, lv)
    return out
