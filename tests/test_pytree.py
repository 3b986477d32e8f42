"""pyfunctorch._pytree's fast flatten/unflatten against torch.utils._pytree (the oracle): same
leaves (the same objects, in the same order), the same spec, the same rebuilt structure."""

from __future__ import annotations

import collections
import random

import pytest
import torch
from torch.utils import _pytree as P

from pyfunctorch._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

NT = collections.namedtuple("NT", "a b")


class Box:  # a leaf
    def __init__(self, x):
        self.x = x


class Sub(dict):  # an unregistered dict subclass: a leaf for torch's pytree
    pass


def _random_tree(rng, depth=0):
    t = torch.zeros(1)
    r = rng.random()
    if depth >= 3 or r < 0.3:
        return rng.choice([t, t.clone(), 3, 2.5, None, "s", True, Sub(a=t)])
    kind = rng.choice(["tuple", "list", "dict", "nt", "odict", "empty"])
    kids = [_random_tree(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "tuple":
        return tuple(kids)
    if kind == "list":
        return kids
    if kind == "dict":
        return {f"k{i}" if i % 2 else i: k for i, k in enumerate(kids)}
    if kind == "nt":
        return NT(kids[0] if kids else t, tuple(kids))
    if kind == "odict":
        return collections.OrderedDict((str(i), k) for i, k in enumerate(kids))
    return rng.choice([(), [], {}])


def _check(tree):
    leaves, spec = tree_flatten(tree)
    want_leaves, want_spec = P.tree_flatten(tree)
    assert spec == want_spec
    assert len(leaves) == len(want_leaves) and all(a is b for a, b in zip(leaves, want_leaves))
    assert tree_leaves(tree) == leaves
    rebuilt = tree_unflatten(leaves, spec)
    r_leaves, r_spec = P.tree_flatten(rebuilt)
    assert r_spec == want_spec and all(a is b for a, b in zip(r_leaves, want_leaves))
    assert type(rebuilt) is type(P.tree_unflatten(want_leaves, want_spec))
    mapped = tree_map(Box, tree)
    assert P.tree_flatten(mapped)[1] == want_spec
    assert all(type(m) is Box and m.x is x for m, x in zip(P.tree_leaves(mapped), want_leaves))


@pytest.mark.parametrize("seed", range(300))
def test_random_structures_match_torch(seed):
    tree = _random_tree(random.Random(seed))
    _check(tree)
    _check(tree)  # (the second time from the cache)


def test_named_cases_match_torch():
    t = torch.zeros(1)
    for tree in [t, (t,), (t, t, t), [t, {"a": t, "b": (t, None, 3)}], {"x": [t, t], "y": None}, (), [], {},
                 None, 3, (None,), [None, t], (t, 3), {1: t, (2, 3): t}, NT(t, t), collections.OrderedDict(a=t),
                 torch.return_types.max((t, t)), [[[]]], ({},), Sub(a=t), (Sub(a=t), t)]:
        _check(tree)


def test_unflatten_of_a_foreign_spec_and_wrong_leaf_count():
    t = torch.zeros(1)
    spec = P.tree_flatten({"a": t, "b": [t, t]})[1]  # (torch's own spec object, never cached here)
    assert P.tree_flatten(tree_unflatten([1, 2, 3], spec))[0] == [1, 2, 3]
    _, cached = tree_flatten({"a": t, "b": [t, t]})
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        tree_unflatten([1, 2], cached)  # (torch's own error for a wrong number of leaves)
