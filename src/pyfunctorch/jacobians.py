"""Jacobians and Hessians: ``jacrev`` (vmap over vjp), ``jacfwd`` (vmap over jvp), ``hessian``."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ._compiler import opaque_to_compiler
from ._core import hold_entry_points
from ._pytree import tree_flatten, tree_map, tree_unflatten
from .errors import ArgumentError
from .reverse import _check_argnums, _check_diff_inputs, _vjp_impl
from .forward import jvp
from .batched import vmap


def _partial_over(func, args, nums):
    """``func`` as a function of the args at ``nums`` only, the others fixed."""

    def f(*diff):
        new = list(args)
        for n, d in zip(nums, diff):
            new[n] = d
        return func(*new)

    return f


def _basis(flat, dtype_like=None):
    """Rows of the identity, cut into one tensor per leaf: (total, *leaf.shape)."""
    sizes = [x.numel() for x in flat]
    total = sum(sizes)
    ref = flat[0]
    eye = torch.eye(total, dtype=ref.dtype, device=ref.device)
    parts = eye.split(sizes, dim=1)
    return [p.reshape((total,) + tuple(x.shape)) for p, x in zip(parts, flat)], sizes, total


def _assemble(out_flat, out_spec, in_flat_groups, in_specs, blocks, out_first: bool, single: bool):
    """Build jac[out leaf][argnum][in leaf] from blocks[out_i][in_j] of shape out.shape + in.shape."""
    per_out = []
    for i, _o in enumerate(out_flat):
        per_arg = []
        j = 0
        for group, spec in zip(in_flat_groups, in_specs):
            leaves = blocks[i][j : j + len(group)]
            j += len(group)
            per_arg.append(tree_unflatten(leaves, spec))
        per_out.append(per_arg[0] if single else tuple(per_arg))
    return tree_unflatten(per_out, out_spec)


def _flatten_each(trees):
    """([leaves of each tree], [spec of each tree])."""
    pairs = [tree_flatten(t) for t in trees]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def jacrev(
    func: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    _preallocate_and_copy: bool = False,
) -> Callable:
    """The Jacobian of ``func`` with respect to ``argnums``, by reverse mode
    (``vmap`` over ``vjp``; one backward pass per output element, vectorized).

    ``chunk_size`` bounds how many rows are computed at once (memory vs speed).

    Examples:
        >>> import torch
        >>> from pyfunctorch import jacrev
        >>> x = torch.randn(3)
        >>> torch.allclose(jacrev(torch.sin)(x), torch.diag(torch.cos(x)))
        True
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"jacrev: chunk_size must be None or a positive int; got {chunk_size!r}.")

    @functools.wraps(func)
    @opaque_to_compiler
    def wrapper(*args):
        with hold_entry_points():  # vjp, then vmap over vjp_fn: one install
            return _jacrev(args)

    def _jacrev(args):
        nums = _check_argnums(argnums, len(args), "jacrev")
        diff = [args[n] for n in nums]
        # the other arguments are wrapped as constants of the vjp level (as torch.func)
        res = _vjp_impl(func, args, nums, has_aux, "jacrev")
        out, vjp_fn = res[0], res[1]
        out_flat, out_spec = tree_flatten(out)
        basis, sizes, total = _basis(out_flat)
        in_groups, in_specs = _flatten_each(diff)
        if total == 0:
            grads_flat = [torch.zeros((0,) + tuple(x.shape), dtype=x.dtype, device=x.device) for g in in_groups for x in g]
        elif total == 1:
            # Speed: one output element (a scalar f, e.g. hessian = jacfwd(jacrev(f))) needs one
            # vjp, the vmap over a one-row basis gives the same row; that vmap level would add
            # one Python dispatch to every backward op (and to every op of the transforms
            # around it). The row then gets its leading dim of size 1.
            rows = vjp_fn(tree_unflatten([b[0] for b in basis], out_spec))
            grads_flat = [g.unsqueeze(0) for g in tree_flatten(rows)[0]]
        else:
            rows = vmap(vjp_fn, chunk_size=chunk_size)(tree_unflatten(basis, out_spec))
            grads_flat, _ = tree_flatten(rows)
        # grads_flat[k]: (total, *in_k.shape) -> per output leaf: out.shape + in.shape
        blocks = [[] for _ in out_flat]
        for g in grads_flat:
            for i, (piece, o) in enumerate(zip(g.split(sizes, dim=0), out_flat)):
                blocks[i].append(piece.reshape(tuple(o.shape) + tuple(g.shape[1:])))
        jac = _assemble(out_flat, out_spec, in_groups, in_specs, blocks, True, isinstance(argnums, int))
        if has_aux:
            return jac, res[2]
        return jac

    return wrapper


def jacfwd(
    func: Callable,
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
    *,
    randomness: str = "error",
) -> Callable:
    """The Jacobian of ``func`` with respect to ``argnums``, by forward mode
    (``vmap`` over ``jvp``; one forward pass per input element, vectorized).

    Examples:
        >>> import torch
        >>> from pyfunctorch import jacfwd
        >>> x = torch.randn(3)
        >>> torch.allclose(jacfwd(torch.sin)(x), torch.diag(torch.cos(x)))
        True
    """

    @functools.wraps(func)
    @opaque_to_compiler
    def wrapper(*args):
        nums = _check_argnums(argnums, len(args), "jacfwd")
        diff = tuple(args[n] for n in nums)
        flat, spec = tree_flatten(diff)
        _check_diff_inputs(flat, "jacfwd")
        basis, sizes, total = _basis(flat)
        f = _partial_over(func, args, nums)

        def push(*tangent_flat):
            tangents = tree_unflatten(list(tangent_flat), spec)
            r = jvp(f, diff, tangents, has_aux=has_aux)
            if has_aux:
                return r[1], r[0], r[2]
            return r[1], r[0]

        if total == 0:
            # no input elements, so no tangent directions: one jvp with the (empty) zero
            # tangents gives the output; the Jacobian is empty (as torch.func)
            r = push(*[torch.zeros_like(x) for x in flat])
            t_out = tree_map(lambda t: t.new_zeros((0,) + tuple(t.shape)), r[0])
            out = r[1]
            if has_aux:
                aux = r[2]
        # The primal output (and aux) do not depend on the tangent, but a buffer the function
        # wrote into is per-example under vmap: take example 0 rather than out_dims=None.
        elif has_aux:
            t_out, out, aux = vmap(push, randomness=randomness)(*basis)
            aux = tree_map(lambda t: t[0] if isinstance(t, torch.Tensor) else t, aux)
            out = tree_map(lambda t: t[0], out)
        else:
            t_out, out = vmap(push, randomness=randomness)(*basis)
            out = tree_map(lambda t: t[0], out)
        out_flat, out_spec = tree_flatten(out)
        if not out_flat:
            raise ArgumentError(
                f"jacfwd: the function returned no tensors ({out!r}), so there is nothing to differentiate; "
                "return at least one tensor (as torch.func requires)."
            )
        t_flat, _ = tree_flatten(t_out)
        in_groups, in_specs = _flatten_each(diff)
        blocks = []
        for t, o in zip(t_flat, out_flat):
            row = []
            for piece, x in zip(t.split(sizes, dim=0), flat):
                # piece: (numel_in, *out.shape) -> out.shape + in.shape
                piece = piece.reshape((x.numel(),) + tuple(o.shape))
                piece = piece.movedim(0, -1).reshape(tuple(o.shape) + tuple(x.shape))
                row.append(piece)
            blocks.append(row)
        jac = _assemble(out_flat, out_spec, in_groups, in_specs, blocks, False, isinstance(argnums, int))
        if has_aux:
            return jac, aux
        return jac

    return wrapper


def hessian(func: Callable, argnums: int | tuple[int, ...] = 0) -> Callable:
    """The Hessian of a scalar ``func``: ``jacfwd(jacrev(func, argnums), argnums)``.

    Examples:
        >>> import torch
        >>> from pyfunctorch import hessian
        >>> x = torch.randn(3)
        >>> torch.allclose(hessian(lambda x: (x ** 3).sum())(x), torch.diag(6 * x))
        True
    """
    return jacfwd(jacrev(func, argnums), argnums)
