"""Small pytree helpers on top of torch.utils._pytree."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


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
