"""Input signatures of a compiled call: a fast flatten of (args, kwargs) and its cache key."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

#
# torch.utils._pytree.tree_flatten costs ~30 us for a dict of four tensors plus two more;
# replaying a small graph costs about that much. Exact tuples, lists and dicts (the usual
# containers of arguments) are flattened here; any other registered pytree node falls
# back to torch's flatten for that subtree (its TreeSpec becomes part of the key).

_TUPLE, _LIST, _DICT, _LEAF, _NODE = 0, 1, 2, 3, 4
_is_leaf = getattr(pytree, "tree_is_leaf", None) or pytree._is_leaf


def _flatten(x: Any, leaves: list, struct: list) -> None:
    t = type(x)
    if t is tuple:
        struct.append((_TUPLE, len(x)))
        for y in x:
            _flatten(y, leaves, struct)
    elif t is list:
        struct.append((_LIST, len(x)))
        for y in x:
            _flatten(y, leaves, struct)
    elif t is dict:
        struct.append((_DICT, tuple(x)))
        for y in x.values():
            _flatten(y, leaves, struct)
    elif isinstance(x, torch.Tensor) or x is None or t in (int, float, bool, str) or _is_leaf(x):
        struct.append(_LEAF)
        leaves.append(x)
    else:  # a registered pytree node (namedtuple, OrderedDict, dataclass ...)
        sub, spec = pytree.tree_flatten(x)
        struct.append((_NODE, spec))
        leaves.extend(sub)


def _unflatten(struct: tuple, leaves: list) -> Any:
    return _build(iter(struct), iter(leaves))


def _build(it_struct, it_leaves) -> Any:
    # (a plain recursive function: a self-referencing closure would be a reference cycle
    # that keeps the output tensors alive until the cyclic GC runs)
    s = next(it_struct)
    if s == _LEAF:
        return next(it_leaves)
    kind, info = s
    if kind is _TUPLE:
        return tuple([_build(it_struct, it_leaves) for _ in range(info)])
    if kind is _LIST:
        return [_build(it_struct, it_leaves) for _ in range(info)]
    if kind is _DICT:
        return {k: _build(it_struct, it_leaves) for k in info}
    return pytree.tree_unflatten([next(it_leaves) for _ in range(info.num_leaves)], info)


class _Uncacheable(Exception):
    """The call cannot be keyed (an unhashable argument): run it eagerly."""


def _signature(args: tuple, kwargs: dict):
    """``(leaves, n_args_leaves, key)``: the flat leaves of (args, kwargs), how many of them
    come from args, and a hashable key of everything the traced graph is specialized to."""
    leaves: list = []
    struct: list = []
    _flatten(args, leaves, struct)
    n_args = len(leaves)
    kstruct: list = []
    if kwargs:
        _flatten(kwargs, leaves, kstruct)
    metas: list = []
    seen: dict = {}
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            tp = type(x)
            if (tp is not torch.Tensor and tp is not torch.nn.Parameter) or x.layout is not torch.strided:
                raise _Uncacheable(
                    f"an input is a {tp.__name__} with layout {x.layout} (only plain strided tensors are traced)"
                )
            first = seen.setdefault(id(x), i)  # the same tensor passed twice must stay shared
            metas.append((x.shape, x.stride(), x.dtype, x.device, x.requires_grad, first))
        else:
            try:
                hash(x)
            except TypeError:
                raise _Uncacheable(f"an argument of type {type(x).__name__} is not hashable") from None
            metas.append((type(x), x))
    return leaves, n_args, (tuple(struct), tuple(kstruct), tuple(metas), torch.is_grad_enabled(),
                          torch.get_default_dtype())

