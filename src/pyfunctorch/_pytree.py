"""Small pytree helpers on top of torch.utils._pytree."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

_flatten, _unflatten = pytree.tree_flatten, pytree.tree_unflatten
_NODES = pytree.SUPPORTED_NODES  # (live: registrations made later are seen)
_LEAF_SPEC = _flatten(0)[1]
_SPECS: dict = {}  # structure key (see _key) -> torch's TreeSpec of that structure
_BUILDERS: dict = {}  # id(a cached TreeSpec) -> (its structure key, number of leaves, tuple/list if flat)
_FLAT_SPECS: dict = {}  # (tuple or list, n) -> the cached spec of n leaves in one tuple/list
_NONE = type(None)
_NONE_IS_LEAF = len(_flatten(None)[0]) == 1  # (torch's pytree: a leaf, or a node without leaves)


class _Slow(Exception):
    """A structure the fast path leaves to torch (a registered or subclassed container)."""


def _key(tree, leaves: list):
    """The structure of ``tree`` as a hashable key, appending its leaves to ``leaves``; for
    tuples, lists, dicts (exactly those types), None and leaves. torch's pytree flattens these
    the same way (dict values in insertion order; None as torch treats it: see _NONE_IS_LEAF)."""
    t = type(tree)
    if t is tuple or t is list:
        return (t, *[_key(c, leaves) for c in tree])
    if t is dict:
        return (dict, tuple(tree), *[_key(c, leaves) for c in tree.values()])
    if t is _NONE and not _NONE_IS_LEAF:
        return None
    if t in _NODES and t is not _NONE or isinstance(tree, (tuple, list, dict)):  # (namedtuples, OrderedDict, registered nodes)
        raise _Slow
    leaves.append(tree)
    return 0


def _build(key, it):
    """The structure ``key`` with its leaves taken from the iterator ``it``."""
    if key == 0:
        return next(it)
    if key is None:
        return None
    t = key[0]
    if t is dict:
        return {k: _build(c, it) for k, c in zip(key[1], key[2:])}
    return t([_build(c, it) for c in key[1:]])


def tree_flatten(tree: Any):
    """torch's ``tree_flatten`` with a fast path for what transform calls flatten (arguments,
    results: tensors in tuples, lists, dicts): ~1-3 us instead of 3-30 us. The spec is torch's
    own (cached per structure), so it works with everything that takes one."""
    t = type(tree)
    if t is not tuple and t is not list and t is not dict:
        if isinstance(tree, torch.Tensor) and t not in _NODES:
            return [tree], _LEAF_SPEC
        return _flatten(tree)
    if t is not dict and len(tree) <= 16:  # (a short flat tuple/list of tensors: the commonest)
        for x in tree:
            if not isinstance(x, torch.Tensor) or type(x) in _NODES:
                break
        else:
            spec = _FLAT_SPECS.get((t, len(tree)))
            if spec is not None:
                return list(tree), spec
    leaves: list = []
    try:
        key = _key(tree, leaves)
    except _Slow:
        return _flatten(tree)
    spec = _SPECS.get(key)  # (hashable: types, dict keys, 0 and None)
    if spec is None:
        spec = _flatten(tree)[1]
        if len(_SPECS) >= 4096:
            _SPECS.clear()
            _BUILDERS.clear()
            _FLAT_SPECS.clear()
        _SPECS[key] = spec
        flat = (t is tuple or t is list) and all(k == 0 for k in key[1:])
        if flat:
            _FLAT_SPECS[(t, len(tree))] = spec
        _BUILDERS[id(spec)] = (key, len(leaves), t if flat else None)
    return leaves, spec


def tree_unflatten(leaves: Any, spec: Any):
    """torch's ``tree_unflatten`` (fast for the specs of ``tree_flatten``'s fast path)."""
    if spec is _LEAF_SPEC and len(leaves) == 1:
        return leaves[0]
    built = _BUILDERS.get(id(spec))
    if built is not None and len(leaves) == built[1] and _SPECS.get(built[0]) is spec:
        # (the last test: not a spec dropped from the cache whose id was reused)
        flat = built[2]
        return flat(leaves) if flat is not None else _build(built[0], iter(leaves))
    return _unflatten(leaves, spec)


def tree_map(fn: Callable, tree: Any) -> Any:
    """torch's ``tree_map`` (through the fast paths above)."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(x) for x in leaves], spec)


def tree_leaves(tree: Any) -> list:
    """torch's ``tree_leaves`` (through the fast path above)."""
    return tree_flatten(tree)[0]


def broadcast_prefix(prefix: Any, tree: Any, what: str, is_leaf: Callable[[Any], bool] | None = None) -> list:
    """Expand ``prefix`` (a pytree prefix of ``tree``, e.g. ``in_dims``) to one entry per leaf.

    Raises ValueError naming ``what`` when the structures do not match.
    """
    out: list = []

    def go(p: Any, t: Any, path: str) -> None:
        if p is None or isinstance(p, int) and not isinstance(p, bool):
            out.extend([p] * len(tree_flatten(t)[0]))
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
