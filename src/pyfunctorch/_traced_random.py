"""vmap(randomness='different') under pyfunctorch.compile: per-example keyed draws as one traceable op.

Eagerly, vmap's 'different' randomness draws example ``b`` of a random op from a
``torch.Generator`` seeded with ``int(keys[b])`` (see ``batched/randomness.py: example_keys``). That
``int()`` reads a tensor's value, which a traced graph cannot contain. While
``pyfunctorch.compile`` traces, the per-example loop therefore runs inside one custom
operator, ``pyfunctorch::keyed_draws(keys, tensors, token)``, whose inputs are the keys
tensor (computed in the graph from a seed the graph draws from torch's global generator,
as eager vmap does) and the op's tensors; the Python parts of the call (the op, its
non-tensor arguments, which argument is batched along which dim) are kept in a table
under ``token``. The operator runs the same loop as eager vmap, so a replay draws
bit-for-bit what an eager call would draw after the same ``torch.manual_seed``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import random as _random

_SPECS: dict = {}  # token -> _Spec (kept for the life of the process: graphs refer to tokens)
_TOKENS: dict = {}  # hashable description of a call -> its token


class _Spec:
    __slots__ = ("func", "template", "kwargs", "device", "inplace", "out_shape", "out_dtype")

    def __init__(self, func, template, kwargs, device, inplace):
        self.func = func
        self.template = template  # per argument: ("t", index, bdim or None) or ("c", constant)
        self.kwargs = kwargs
        self.device = device
        self.inplace = inplace
        self.out_shape = None
        self.out_dtype = None


def _run(keys: torch.Tensor, tensors: list, token: int) -> torch.Tensor:
    spec = _SPECS[token]
    outs = []
    for b in range(keys.shape[0]):
        args = []
        for kind, *rest in spec.template:
            if kind == "c":
                args.append(rest[0])
            else:
                i, bdim = rest
                args.append(tensors[i] if bdim is None else tensors[i].select(bdim, b))
        gen = _random.generator_for(keys[b], spec.device)
        outs.append(spec.func(*args, **dict(spec.kwargs, generator=gen)))
    if spec.inplace:
        return keys.new_empty(0)
    out = torch.stack(outs)
    spec.out_shape, spec.out_dtype = out.shape, out.dtype
    return out


def _fake(keys, tensors, token):
    spec = _SPECS[token]
    if spec.inplace or spec.out_shape is None:
        return keys.new_empty(0)
    return torch.empty(spec.out_shape, dtype=spec.out_dtype, device=spec.device or keys.device)


_OP = None


def _op():
    global _OP
    if _OP is None:
        lib_op = torch.library.custom_op(
            "pyfunctorch::keyed_draws", _run, mutates_args=("tensors",),
            schema="(Tensor keys, Tensor(a!)[] tensors, int token) -> Tensor",
        )
        lib_op.register_fake(_fake)
        _OP = torch.ops.pyfunctorch.keyed_draws.default
    return _OP


def tracing() -> bool:
    """Is make_fx (pyfunctorch.compile) recording right now?"""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None


def keyed_draws(func: Callable, args: list, bdims: list, kwargs: dict, keys: torch.Tensor, inplace: bool,
                device) -> torch.Tensor | None:
    """Run ``func(*args_b, generator=generator_for(keys[b]))`` for every example ``b`` as one
    recorded op; ``args_b`` selects example ``b`` of each tensor argument whose entry in
    ``bdims`` is not None. Returns the stacked results (``None`` for an in-place op,
    whose batched argument is updated). Raises ``LookupError`` when the call cannot be
    expressed this way (the caller then runs its eager loop)."""
    template: list = []
    tensors: list = []
    for a, bdim in zip(args, bdims):
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                raise LookupError("a tensor that requires grad (the keyed op has no autograd formula)")
            template.append(("t", len(tensors), bdim))
            tensors.append(a)
        elif isinstance(a, (list, tuple)) and any(isinstance(y, torch.Tensor) for y in a):
            raise LookupError("a list of tensors")
        else:
            template.append(("c", a))
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        raise LookupError("a tensor keyword argument")
    spec = _Spec(func, tuple(template), dict(kwargs), device, inplace)
    try:  # the same call (a retrace, another graph) reuses its token: the table stays small
        ident = (func, spec.template, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])), device, inplace,
                 tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors), keys.shape)
        token = _TOKENS.setdefault(ident, len(_SPECS))
    except TypeError:  # an unhashable constant
        token = len(_SPECS)
    _SPECS.setdefault(token, spec)
    out = _op()(keys, tensors, token)
    return None if inplace else out


def stacked_keys(keys: Any) -> torch.Tensor:
    """The per-example keys as one int64 tensor of shape [B]."""
    return keys if isinstance(keys, torch.Tensor) else torch.stack(list(keys))
