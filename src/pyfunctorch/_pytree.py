"""Small pytree helpers on top of torch.utils._pytree."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves

_flatten, _unflatten = pytree.tree_flatten, pytree.tree_unflatten
_NODES = pytree.SUPPORTED_NODES  # (live: registrations made later are seen)
_LEAF_SPEC = _flatten(0)[1]
_FLAT_SPECS: dict = {}  # (tuple or list, n) -> the spec of n tensor leaves
_FLAT_KIND: dict = {}  # id(that spec) -> (tuple or list, n)


def tree_flatten(tree: Any):
    """torch's ``tree_flatten``, with a fast path for a tensor and a short flat tuple/list of
    tensors, what every transform call flattens (arguments, results): ~0.3 us instead of
    0.6-2.6 us."""
    t = type(tree)
    if t is tuple or t is list:
        n = len(tree)
        if n <= 16:
            for x in tree:
                if not isinstance(x, torch.Tensor) or type(x) in _NODES:
                    return _flatten(tree)
            spec = _FLAT_SPECS.get((t, n))
            if spec is None:
                spec = _FLAT_SPECS[(t, n)] = _flatten(tree)[1]
                _FLAT_KIND[id(spec)] = (t, n)
            return list(tree), spec
    elif isinstance(tree, torch.Tensor) and t not in _NODES:
        return [tree], _LEAF_SPEC
    return _flatten(tree)


def tree_unflatten(leaves: Any, spec: Any):
    """torch's ``tree_unflatten`` (fast for the specs of ``tree_flatten``'s fast path)."""
    if spec is _LEAF_SPEC and len(leaves) == 1:
        return leaves[0]
    kind = _FLAT_KIND.get(id(spec))
    if kind is not None and len(leaves) == kind[1]:
        return kind[0](leaves)
    return _unflatten(leaves, spec)


def broadcast_prefix(prefix: Any, tree: Any, what: str, is_leaf: Callable[[Any], bool] | None = None) -> list:
    """Expand ``prefix`` (a pytree prefix of ``tree``, e.g. ``in_dims``) to one entry per leaf.

    Raises ValueError naming ``what`` when the structures do not match.
    """
    out: list = []

    def go(p: Any, t: Any, path: str) -> None:
        if p is None or isinstance(p, int) and not isinstance(p, bool):
            out.extend([p] * len(pytree.tree_leaves(t)))
            return
        if isinstance(p, (tuple, list)):
            if not isinstance(t, (tuple, list)) or len(p) != len(t):
                raise ValueError(
                    f"{what}{path} is a {type(p).__name__} of length {len(p)}, but the matching "
                    f"input is {_describe(t)}: the structure of {what} must match the inputs "
                    "(or use a single int/None for the whole subtree)."
                )
            for i, (pp, tt) in enumerate(zip(p, t)):
                go(pp, tt, f"{path}[{i}]")
            return
        if isinstance(p, dict):
            if not isinstance(t, dict) or set(p) != set(t):
                raise ValueError(
                    f"{what}{path} is a dict with keys {sorted(map(str, p))}, but the matching input is "
                    f"{_describe(t)}: the keys must match."
                )
            for k in t:  # leaves come in the input's key order
                go(p[k], t[k], f"{path}[{k!r}]")
            return
        raise ValueError(
            f"{what}{path} must be an int, None, or a tuple/list/dict of those matching the inputs; "
            f"got {p!r} of type {type(p).__name__}."
        )

    go(prefix, tree, "")
    return out


def _describe(t: Any) -> str:
    if isinstance(t, (tuple, list)):
        return f"a {type(t).__name__} of length {len(t)}"
    if isinstance(t, dict):
        return f"a dict with keys {sorted(map(str, t))}"
    return f"a {type(t).__name__}"


def tensor_leaves(x, out: list) -> list:
    """Append the tensors of ``x`` (a tensor, or tuples/lists of them, nested) to ``out``."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for y in x:
            tensor_leaves(y, out)
    return out
