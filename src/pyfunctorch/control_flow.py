"""Control-flow operators that stay batched and differentiable: ``cond``, ``while_loop``, ``scan``.

Python ``if``/``while`` on a batched tensor forces vmap to run the function once per
example. These operators express the same control flow so that vmap keeps it batched:
when the predicate is batched, ``cond`` evaluates both branches and selects per example
with ``torch.where``; ``while_loop`` keeps stepping while *any* example's condition
holds and freezes the examples whose condition is false. Both are ordinary torch code
underneath, so grad, jvp and their compositions differentiate them exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._core import LevelTensor
from ._pytree import tree_flatten, tree_unflatten
from .batched import BatchedTensor


def _is_batched(t: Any) -> bool:
    """Whether ``t`` carries a vmap batch dimension at any level."""
    while isinstance(t, LevelTensor):
        if isinstance(t, BatchedTensor) and t._interp.alive:
            return True
        t = t._value
    return False


def _physical(t: torch.Tensor) -> torch.Tensor:
    while isinstance(t, LevelTensor):
        t = t._value
    return t


def _check_pred(pred: Any, who: str) -> Any:
    if isinstance(pred, bool):
        return pred
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"{who}: the predicate must be a bool or a boolean tensor; got {type(pred).__name__}.")
    if pred.numel() != 1:
        raise ValueError(
            f"{who}: the predicate must have one element per example; got shape {tuple(pred.shape)}. "
            "Reduce it (e.g. .all() or .any()) first."
        )
    return pred.reshape(())


def _select(pred: torch.Tensor, a: Any, b: Any, who: str) -> Any:
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb:
        raise ValueError(f"{who}: both branches must return the same structure; got {sa} and {sb}.")
    out = []
    for x, y in zip(fa, fb):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            if x is y or x == y:
                out.append(x)
                continue
            raise TypeError(f"{who}: branch outputs that differ must be tensors; got {x!r} and {y!r}.")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(
                f"{who}: both branches must return tensors of the same shape and dtype; got "
                f"{tuple(x.shape)}/{x.dtype} and {tuple(y.shape)}/{y.dtype}."
            )
        out.append(torch.where(pred, x, y))
    return tree_unflatten(out, sa)


def cond(pred: Any, true_fn: Callable, false_fn: Callable, operands: tuple = ()) -> Any:
    """``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``, batched under vmap.

    Examples:
        >>> import torch
        >>> from pyfunctorch import vmap, cond
        >>> relu = lambda x: cond(x > 0, lambda x: x, lambda x: x * 0, (x,))
        >>> vmap(relu)(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if not isinstance(operands, (tuple, list)):
        raise TypeError(f"cond: operands must be a tuple; got {type(operands).__name__}. Use (x,) for one operand.")
    pred = _check_pred(pred, "cond")
    if isinstance(pred, bool) or not _is_batched(pred):
        return true_fn(*operands) if bool(pred) else false_fn(*operands)
    return _select(pred, true_fn(*operands), false_fn(*operands), "cond")


def while_loop(cond_fn: Callable, body_fn: Callable, carry: Any) -> Any:
    """``while cond_fn(carry): carry = body_fn(carry)``; batched under vmap.

    ``carry`` is a pytree; ``body_fn`` must return the same structure, shapes and dtypes.
    Under vmap the loop runs until every example's condition is false; finished examples
    keep their values.

    Examples:
        >>> import torch
        >>> from pyfunctorch import vmap, while_loop
        >>> halve = lambda x: while_loop(lambda x: x > 1, lambda x: x / 2, x)
        >>> vmap(halve)(torch.tensor([1.0, 3.0, 10.0]))
        tensor([1.0000, 0.7500, 0.6250])
    """
    while True:
        pred = _check_pred(cond_fn(carry), "while_loop")
        if isinstance(pred, bool) or not _is_batched(pred):
            if not bool(pred):
                return carry
            carry = body_fn(carry)
            continue
        if not bool(_physical(pred).any()):
            return carry
        carry = _select(pred, body_fn(carry), carry, "while_loop")


def scan(fn: Callable, init: Any, xs: Any) -> tuple[Any, Any]:
    """JAX's scan: ``carry, y = fn(carry, x)`` for each ``x`` along dim 0 of ``xs``;
    returns ``(final_carry, stacked_ys)``. Exact under every transform.

    Examples:
        >>> import torch
        >>> from pyfunctorch import scan
        >>> carry, ys = scan(lambda c, x: (c + x, c * x), torch.tensor(0.0), torch.arange(4.0))
        >>> carry, ys
        (tensor(6.), tensor([0., 0., 2., 9.]))
    """
    flat_xs, spec = tree_flatten(xs)
    if not flat_xs:
        raise ValueError("scan: xs must contain at least one tensor.")
    n = flat_xs[0].shape[0]
    for x in flat_xs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != n:
            raise ValueError("scan: every leaf of xs must be a tensor with the same size in dim 0.")
    carry = init
    ys = []
    for i in range(n):
        carry, y = fn(carry, tree_unflatten([x[i] for x in flat_xs], spec))
        ys.append(y)
    flat_y0, yspec = tree_flatten(ys[0])
    cols = [tree_flatten(y)[0] for y in ys]
    stacked = [torch.stack([c[j] for c in cols]) for j in range(len(flat_y0))]
    return carry, tree_unflatten(stacked, yspec)
