"""Facts about aten and prims ops that the core and the rules share: which arguments an op mutates and returns, and the aten op a prims op stands for."""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _mutated_returns(func) -> tuple | None:
    """For ops whose outputs alias a written input (in-place and out= ops): for each
    output, where the written input is (an int position or a kwarg name). Cached."""
    try:
        return func._pyf_alias  # cached on the OpOverload: cheaper than hashing it
    except AttributeError:
        pass
    schema = func._schema
    res = None
    if schema.is_mutable:
        where = []
        for ret in schema.returns:
            ai = ret.alias_info
            loc = None
            if ai is not None and ai.is_write:
                for i, arg in enumerate(schema.arguments):
                    if arg.alias_info is not None and arg.alias_info.is_write and set(arg.alias_info.before_set) & set(ai.before_set):
                        loc = arg.name if arg.kwarg_only else i
                        break
            where.append(loc)
        if any(w is not None for w in where):
            if torch.Tag.inplace_view in func.tags:
                res = _InplaceViewAliases(where)
                res.func = func
            else:
                res = tuple(where)
    try:
        func._pyf_alias = res
    except AttributeError:
        pass
    return res


class _InplaceViewAliases(tuple):
    """Marks in-place view ops (squeeze_, transpose_, as_strided_ ...): they change the
    inner value's metadata, so the wrapper's own size/stride must be fixed too (trap 4)."""


def _return_aliases(aliased, args, kwargs, out):
    """In-place and out= ops return the caller's own (wrapper) tensors."""
    res = tuple(args[w] if isinstance(w, int) else kwargs[w] for w in aliased)
    if type(aliased) is _InplaceViewAliases:
        from torch.utils._mode_utils import no_dispatch

        # replay on the wrapper itself, below autograd and Python: only its metadata changes
        with no_dispatch(), torch._C._AutoDispatchBelowADInplaceOrView():
            aliased.func(*args, **kwargs)
    return res[0] if len(res) == 1 else res


def aten_equivalent(op):
    """The aten overload that a ``prims.*`` op stands for (prims.add -> aten.add.Tensor)."""
    if getattr(op, "namespace", None) != "prims":
        return None
    packet = getattr(aten, op.overloadpacket.__name__, None)
    if packet is None:
        return None
    n = len(op._schema.arguments)
    for name in ("Tensor", "default"):
        cand = getattr(packet, name, None)
        if cand is not None and len([a for a in cand._schema.arguments if not a.kwarg_only]) >= n:
            return cand
    return None


class _OpSet:
    """Membership of OpOverloads in a table, read from a flag on the op (``OpOverload.__hash__``
    is a Python method: a dict lookup costs more than the attribute read)."""

    def __init__(self, table: dict, flag: str) -> None:
        self.table, self.flag = table, flag

    def __contains__(self, func) -> bool:
        try:
            return getattr(func, self.flag)
        except AttributeError:
            found = func in self.table
            try:
                setattr(func, self.flag, found)
            except AttributeError:  # not an OpOverload
                pass
            return found
