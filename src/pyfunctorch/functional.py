"""Module helpers: ``functional_call`` and ``stack_module_state``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn.utils import stateless


def functional_call(
    module: torch.nn.Module,
    parameter_and_buffer_dicts: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    args: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    tie_weights: bool = True,
    strict: bool = False,
) -> Any:
    """Call ``module`` with its parameters and buffers replaced by the given tensors.

    ``parameter_and_buffer_dicts`` is a dict (or a sequence of dicts with disjoint keys)
    from names as in ``module.named_parameters()`` to tensors. ``args`` is a tuple of
    positional arguments (a single non-tuple value is passed as the only argument).

    Examples:
        >>> import torch
        >>> from pyfunctorch import functional_call
        >>> lin = torch.nn.Linear(2, 1)
        >>> params = {k: torch.zeros_like(v) for k, v in lin.named_parameters()}
        >>> functional_call(lin, params, (torch.ones(1, 2),))
        tensor([[0.]])
    """
    if isinstance(parameter_and_buffer_dicts, dict):
        merged = parameter_and_buffer_dicts
    elif isinstance(parameter_and_buffer_dicts, (list, tuple)):
        merged = {}
        for d in parameter_and_buffer_dicts:
            if not isinstance(d, dict):
                raise TypeError(f"functional_call: expected dicts of tensors; got {type(d).__name__}.")
            dup = set(merged) & set(d)
            if dup:
                raise ValueError(f"functional_call: the key(s) {sorted(dup)} appear in more than one dict.")
            merged.update(d)
    else:
        raise TypeError(
            "functional_call: parameter_and_buffer_dicts must be a dict or a sequence of dicts; got "
            f"{type(parameter_and_buffer_dicts).__name__}."
        )
    if args is None:
        args = ()
    elif not isinstance(args, tuple):
        args = (args,)
    return stateless._functional_call(module, merged, args, kwargs or {}, tie_weights=tie_weights, strict=strict)


def stack_module_state(models: Sequence[torch.nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack the parameters and buffers of same-shaped ``models`` along a new leading dim,
    for ensembling with ``vmap(functional_call)``. Returns ``(params, buffers)``; the stacked
    params are new leaves (requires_grad as in the models).

    Examples:
        >>> import torch
        >>> from pyfunctorch import stack_module_state
        >>> params, buffers = stack_module_state([torch.nn.Linear(3, 2) for _ in range(4)])
        >>> params["weight"].shape
        torch.Size([4, 2, 3])
    """
    models = list(models)
    if not models:
        raise ValueError("stack_module_state: expected at least one model; got none.")
    first = models[0]
    for m in models[1:]:
        if type(m) is not type(first):
            raise ValueError(
                f"stack_module_state: all models must be of the same class; got {type(first).__name__} "
                f"and {type(m).__name__}."
            )
        if m.training != first.training:
            raise ValueError("stack_module_state: all models must be in the same mode (train() or eval()).")

    def stack(getter, what):
        names = [n for n, _ in getter(first)]
        out = {}
        for m in models[1:]:
            if [n for n, _ in getter(m)] != names:
                raise ValueError(f"stack_module_state: the models' {what} have different names; they must match.")
        for name in names:
            leaves = [dict(getter(m))[name] for m in models]
            shapes = {tuple(t.shape) for t in leaves}
            if len(shapes) != 1:
                raise ValueError(f"stack_module_state: {what[:-1]} {name!r} has different shapes across models: {sorted(shapes)}.")
            rg = {t.requires_grad for t in leaves}
            if len(rg) != 1:
                raise ValueError(
                    f"stack_module_state: {what[:-1]} {name!r} requires grad in some models and not in others."
                )
            stacked = torch.stack([t.detach() for t in leaves])
            if rg.pop():
                stacked.requires_grad_()
            out[name] = stacked
        return out

    return stack(lambda m: m.named_parameters(), "parameters"), stack(lambda m: m.named_buffers(), "buffers")
