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


def backward_entry(original, args, kwargs):
    self = args[0]
    interp = _top_vmap([self])
    if interp is None:
        return original(*args, **kwargs)
    gradient = kwargs.pop("gradient", args[1] if len(args) > 1 else None)
    rest = {k: v for k, v in kwargs.items() if k in ("retain_graph", "create_graph", "inputs")}
    po = _phys(self, interp)
    pg = torch.ones_like(po) if gradient is None else (_phys(gradient, interp) if _phys(gradient, interp) is not None
                                                       else gradient.unsqueeze(0).expand(po.shape))
    if not po.requires_grad:
        raise _not_differentiable("backward")
    return original(po, pg, **rest)

