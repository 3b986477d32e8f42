"""Introspection for coverage reports (scripts/coverage.py, tests/test_opdb.py).

Not part of the public API. Nothing here changes how ops are served: ``served_by``
mirrors the lookup order of ``VmapInterpreter.process`` and ``trace_vmap`` only
observes it.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

from . import batched
from .batching import BATCH_RULES, lookup

#: how an op is served under vmap, cheapest first
SERVED_ORDER = ("rule", "pointwise-tag", "decomposition", "loop")


def served_by(op) -> str:
    """How vmap serves the aten ``OpOverload`` ``op``: ``'random'`` (the randomness
    path), ``'rule'`` (an explicit entry in ``BATCH_RULES``), ``'pointwise-tag'``
    (the broadcasting rule for ops tagged pointwise; a custom op's own ``register_vmap``
    rule counts as ``'rule'``), ``'decomposition'``
    (``torch._decomp``, whose sub-ops are served in turn) or ``'loop'`` (the
    per-example loop fallback).

    A rule-served call whose kwargs hold a batched tensor still goes to the loop;
    that depends on the call, see :func:`trace_vmap`.
    """
    if torch.Tag.nondeterministic_seeded in op.tags:
        return "random"
    if op in BATCH_RULES or batched.custom_op_vmap_fn(op) is not None:
        return "rule"  # (a torch.library custom op's own register_vmap rule counts as one)
    if lookup(op) is not None:
        return "pointwise-tag"
    if batched.decomposition(op) is not None:
        return "decomposition"
    return "loop"


class VmapTrace:
    """What :func:`trace_vmap` saw: ``ops`` counts every aten op that reached a vmap
    level; ``loop`` counts the calls that ran on the loop fallback."""

    def __init__(self) -> None:
        self.ops: Counter = Counter()
        self.loop: Counter = Counter()

    def how(self) -> dict:
        """op name -> how it was served (``'loop'`` if any call of it looped)."""
        out = {}
        for op in self.ops:
            out[str(op)] = "loop" if op in self.loop else served_by(op)
        return out

    def worst(self) -> str | None:
        """The slowest path any op took (``None`` if no op reached vmap)."""
        hows = set(self.how().values())
        for h in reversed(SERVED_ORDER):
            if h in hows:
                return h
        return "random" if hows else None


@contextmanager
def trace_vmap() -> Iterator[VmapTrace]:
    """Record the aten ops that reach ``VmapInterpreter.process`` while active."""
    trace = VmapTrace()
    cls = batched.VmapInterpreter
    # the entry point every op takes into a vmap level (``dispatch`` where the
    # interpreter has one, else ``process``)
    name = "dispatch" if hasattr(cls, "dispatch") else "process"
    orig = cls.__dict__.get(name)

    def hook(self, func, *args, **kwargs):
        trace.ops[func] += 1
        return getattr(super(cls, self), name)(func, *args, **kwargs) if orig is None else orig(self, func, *args, **kwargs)

    before = dict(batched.FALLBACK_COUNTS)
    setattr(cls, name, hook)
    try:
        yield trace
    finally:
        if orig is None:
            delattr(cls, name)
        else:
            setattr(cls, name, orig)
        for op, n in batched.FALLBACK_COUNTS.items():
            d = n - before.get(op, 0)
            if d:
                trace.loop[op] += d
