"""``torch.autograd.grad`` and ``Tensor.backward`` called inside vmap.

Per example, ``torch.autograd.grad(f(x_i), x_i)`` is well defined when ``x`` requires
grad outside vmap. Examples are independent under vmap, so for inputs batched at the
vmap level the per-example gradients are exactly the gradient of the *summed* physical
outputs with respect to the physical input; inputs that are not batched need one
backward pass per example. ``Tensor.backward()`` on a batched output accumulates every
example's gradient into the leaves' ``.grad``, as the per-example loop would.
Under grad/vjp levels these APIs differentiate the wrappers of that level, which is
also what the per-example function means (a leaf created inside has its own graph).
"""

from __future__ import annotations

import torch

from ._core import LevelTensor
from .batched import BatchedTensor


def _top_vmap(tensors):
    top = None
    for t in tensors:
        if isinstance(t, LevelTensor) and t._interp.alive:
            if top is None or t._interp.level > top.level:
                top = t._interp
    return top if top is not None and top.kind == "vmap" else None


def _phys(t, interp):
    if isinstance(t, BatchedTensor) and t._interp is interp:
        return t._value.movedim(t._bdim, 0) if t._bdim else t._value
    return None


def _not_differentiable(what: str) -> RuntimeError:
    return RuntimeError(
        f"torch.autograd.{what} inside vmap: the batched tensors involved do not require grad, so there "
        "is no graph to differentiate. Inside transforms, use pyfunctorch.grad / pyfunctorch.vjp "
        "(e.g. vmap(grad(f))(x)), or make the input require grad before calling vmap."
    )


def grad_entry(original, args, kwargs):
    params = dict(zip(("outputs", "inputs", "grad_outputs", "retain_graph", "create_graph"), args))
    params.update(kwargs)
    outputs, inputs = params["outputs"], params["inputs"]
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    ins = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    interp = _top_vmap(outs + ins)
    if interp is None:
        return original(*args, **kwargs)
    gouts = params.get("grad_outputs")
    gouts = [None] * len(outs) if gouts is None else ([gouts] if isinstance(gouts, torch.Tensor) else list(gouts))
    B = interp.batch_size
    p_outs, p_gouts = [], []
    for o, g in zip(outs, gouts):
        po = _phys(o, interp)
        if po is None:
            po = o.unsqueeze(0).expand((B,) + o.shape) if isinstance(o, torch.Tensor) else o
        if g is None:
            pg = torch.ones_like(po)
        else:
            pg = _phys(g, interp)
            pg = g.unsqueeze(0).expand(po.shape) if pg is None else pg
        p_outs.append(po)
        p_gouts.append(pg)
    if not any(po.requires_grad for po in p_outs):
        raise _not_differentiable("grad")
    retain = params.get("retain_graph")
    create = bool(params.get("create_graph", False))
    allow_unused = params.get("allow_unused")
    results = [None] * len(ins)
    batched_idx = [i for i, x in enumerate(ins) if _phys(x, interp) is not None]
    other_idx = [i for i in range(len(ins)) if i not in batched_idx]
    if batched_idx:
        # examples are independent: d(sum of outputs)/d(physical input) is per-example
        phys_in = [_phys(ins[i], interp) for i in batched_idx]
        gs = torch.autograd.grad(p_outs, phys_in, p_gouts, retain_graph=True if other_idx else retain,
                                 create_graph=create, allow_unused=allow_unused)
        for i, g in zip(batched_idx, gs):
            results[i] = None if g is None else BatchedTensor(g, 0, interp)
    if other_idx:
        # an input shared by every example: one backward pass per example
        per = []
        for b in range(B):
            per.append(torch.autograd.grad([po[b] for po in p_outs], [ins[i] for i in other_idx],
                                           [pg[b] for pg in p_gouts], retain_graph=True if b < B - 1 else retain,
                                           create_graph=create, allow_unused=allow_unused))
        for k, i in enumerate(other_idx):
            col = [p[k] for p in per]
            results[i] = None if col[0] is None else BatchedTensor(torch.stack(col), 0, interp)
    return tuple(results)


def _graph_leaves(roots):
    """The plain leaves (tensors that accumulate ``.grad``) the graphs of ``roots`` reach."""
    seen, leaves, stack = set(), [], [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and type(node).__name__ == "AccumulateGrad":
            leaves.append(var)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return leaves


class _PerExampleGrads:
    """The ``.grad`` of plain leaves that ``Tensor.backward`` reached inside one vmap level.

    Per example (the loop's meaning) every leaf, also one shared by all examples, gets its
    own gradient: while the level is live ``leaf.grad`` is a batched tensor, so each example
    reads its own value. When the level ends, ``leaf.grad`` becomes the plain accumulation
    the loop leaves behind (what it held before + every example's gradient); if the
    function raised, what it held before."""

    def __init__(self, interp):
        self.interp = interp
        self.entries: dict = {}  # id(leaf) -> [leaf, grad before vmap, base, sum over examples, batched grad set]
        interp.__dict__.setdefault("exit_hooks", []).append(self.finish)

    @classmethod
    def of(cls, interp):
        reg = interp.__dict__.get("_pyf_backward_grads")
        if reg is None:
            reg = interp._pyf_backward_grads = cls(interp)
        return reg

    def accumulate(self, leaf, per_example):
        interp = self.interp
        e = self.entries.get(id(leaf))
        cur = leaf.grad
        if e is None:
            e = self.entries[id(leaf)] = [leaf, cur, None, None, None]
        if not (e[4] is not None and cur is e[4]):
            # first write in this vmap, or the user reset/replaced .grad since: start over
            e[2], e[3] = cur, None
        total = per_example.sum(0)
        e[3] = total if e[3] is None else e[3] + total
        new = BatchedTensor(per_example, 0, interp)
        if e[2] is not None:
            new = new + e[2]
        with torch.no_grad():
            leaf.grad = new
        e[4] = new

    def finish(self, failed: bool):
        for leaf, before, base, total, batched in self.entries.values():
            if failed:
                leaf.grad = before
            elif leaf.grad is batched:
                leaf.grad = total if base is None else base + total
            elif isinstance(leaf.grad, BatchedTensor) and leaf.grad._interp is self.interp:
                # the function replaced .grad by another per-example value: the batch's sum
                leaf.grad = leaf.grad._value.sum(leaf.grad._bdim)


def backward_entry(original, args, kwargs):
    self = args[0]
    interp = _top_vmap([self])
    if interp is None:
        return original(*args, **kwargs)
    kwargs = dict(kwargs)
    gradient = kwargs.pop("gradient", args[1] if len(args) > 1 else None)
    retain = kwargs.get("retain_graph", args[2] if len(args) > 2 else None)
    create = bool(kwargs.get("create_graph", args[3] if len(args) > 3 else False))
    inputs = kwargs.get("inputs", args[4] if len(args) > 4 else None)
    po = _phys(self, interp)
    pg = torch.ones_like(po) if gradient is None else (_phys(gradient, interp) if _phys(gradient, interp) is not None
                                                       else gradient.unsqueeze(0).expand(po.shape))
    if not po.requires_grad:
        raise _not_differentiable("backward")
    if inputs is None:
        leaves = _graph_leaves([po])
    else:
        leaves = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if any(isinstance(leaf, LevelTensor) for leaf in leaves):
        raise RuntimeError(
            "Tensor.backward inside vmap: `inputs` must be tensors from outside the transform that require "
            "grad. To differentiate with respect to values inside the function use pyfunctorch.grad / vjp."
        )
    if not leaves:
        return None
    # One backward pass per example: a leaf shared by all examples (a weight) must
    # receive each example's own gradient, as the per-example loop gives.
    B = interp.batch_size
    per = [torch.autograd.grad(po[b], leaves, pg[b], retain_graph=True if b < B - 1 else retain,
                               create_graph=create, allow_unused=True) for b in range(B)]
    reg = _PerExampleGrads.of(interp)
    for k, leaf in enumerate(leaves):
        col = [p[k] if p[k] is not None else torch.zeros_like(leaf) for p in per]
        if all(p[k] is None for p in per):
            continue
        reg.accumulate(leaf, torch.stack(col) if col else leaf.new_zeros((0,) + leaf.shape))
    return None

