"""Batching rules, one module per op family, all registered into ``BATCH_RULES``.

Where is the rule for ``aten.mm``?  ``grep -rn "aten.mm" src/pyfunctorch/batching``.
Lookup order for an op under vmap (see ``VmapInterpreter.process``):
1. an explicit rule in ``BATCH_RULES``;
2. ops tagged ``pointwise`` get the broadcasting rule (``lookup`` below);
3. a decomposition from ``torch._decomp`` into ops that have rules;
4. the per-example loop fallback (``vmap.loop_fallback``), which warns once per op.
"""

from __future__ import annotations

import torch

from . import _registry
from ._registry import BATCH_RULES, batch_rule  # noqa: F401
from . import pointwise  # noqa: F401  (registers rules)
from . import views  # noqa: F401
from . import reductions  # noqa: F401
from . import linalg  # noqa: F401
from . import nn  # noqa: F401
from . import indexing  # noqa: F401

_MISSING = object()
_TAG_CACHE: dict = {}


def lookup(op):
    """The batching rule for ``op``, or None (then: decomposition, else loop fallback)."""
    rule = BATCH_RULES.get(op)
    if rule is not None:
        return rule
    rule = _TAG_CACHE.get(op, _MISSING)
    if rule is _MISSING:
        rule = None
        if torch.Tag.pointwise in op.tags and not any(
            a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments
        ):
            rule = pointwise.broadcasting_rule
        _TAG_CACHE[op] = rule
    return rule
