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

from .._ops import aten_equivalent
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
        aten_op = aten_equivalent(op)
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




def _prims_rule(aten_op, rule):
    if rule is None:
        return None
    elementwise = torch.Tag.pointwise in aten_op.tags

    def run(op, args, kwargs, dims):
        if elementwise and not kwargs and _all_meta(args):
            return _elementwise_prim_on_meta(op, args, dims)
        return rule(aten_op, args, kwargs, dims)

    return run


def _all_meta(args) -> bool:
    """Every tensor argument is a plain meta tensor (not a wrapper of a lower level, whose
    forward AD would meet the prims op: prims have no forward-AD formulas)."""
    seen = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor or not a.is_meta:
                return False
            seen = True
    return seen


def _elementwise_prim_on_meta(op, args, dims):
    """Speed (forward AD's zero tangents). Where forward AD meets an operand without a tangent,
    torch's C++ formula adds an efficient zero tensor, whose add/mul computes the result's
    metadata by running torch's Python meta kernel (``_refs.add``) on meta copies of the
    operands; with a batched tangent its ``prims.*`` ops land here on meta values. The prims op
    on the broadcast meta values is the exact answer (prims take equal shapes: broadcast
    first); the aten equivalent would run the Python ``_refs`` meta kernel a second time."""
    r = max(_registry.rank(a, d) for a, d in zip(args, dims) if isinstance(a, torch.Tensor))
    padded = [_registry.pad_to_rank(a, d, r) if isinstance(a, torch.Tensor) else a for a, d in zip(args, dims)]
    tensors = [a for a in padded if isinstance(a, torch.Tensor)]
    it = iter(torch.broadcast_tensors(*tensors))
    return op(*[next(it) if isinstance(a, torch.Tensor) else a for a in padded]), 0
