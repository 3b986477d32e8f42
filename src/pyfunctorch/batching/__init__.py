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
from . import convolution  # noqa: F401
from . import normalization  # noqa: F401
from . import embedding  # noqa: F401
from . import losses  # noqa: F401
from . import attention  # noqa: F401
from . import recurrent  # noqa: F401
from . import indexing  # noqa: F401
from . import factories  # noqa: F401

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
        aten_op = _aten_equivalent(op)
        if aten_op is not None:  # trap 6: torch._refs emit prims.* ops
            rule = _prims_rule(aten_op, lookup(aten_op))
        # (aten.equal is tagged pointwise but returns one Python bool: not elementwise)
        if torch.Tag.pointwise in op.tags and not _registry.is_out_overload(op) and _returns_tensors(op):
            rule = pointwise.broadcasting_rule
        _TAG_CACHE[op] = rule
    return rule


def _returns_tensors(op) -> bool:
    rets = op._schema.returns
    return bool(rets) and all(isinstance(r.type, torch.TensorType) for r in rets)


def _aten_equivalent(op):
    """The aten overload that a ``prims.*`` op stands for (prims.add -> aten.add.Tensor)."""
    if getattr(op, "namespace", None) != "prims":
        return None
    packet = getattr(torch.ops.aten, op.overloadpacket.__name__, None)
    if packet is None:
        return None
    n = len(op._schema.arguments)
    for name in ("Tensor", "default"):
        cand = getattr(packet, name, None)
        if cand is not None and len([a for a in cand._schema.arguments if not a.kwarg_only]) >= n:
            return cand
    return None


def _prims_rule(aten_op, rule):
    if rule is None:
        return None

    def run(op, args, kwargs, dims):
        return rule(aten_op, args, kwargs, dims)

    return run
