"""Opacus with pyfunctorch: per-sample gradients of Opacus' "functorch" path by pyfunctorch.

Opacus computes per-sample gradients with hooks for the layers it knows (Linear, Conv,
norms, embeddings ...) and, for every other layer (or all of them with
``grad_sample_mode="functorch"`` / ``force_functorch=True``), with
torch.func's ``vmap`` of ``grad`` over a functional copy of the layer
(``opacus.grad_sample.functorch``). :func:`use_pyfunctorch` swaps that path for
pyfunctorch's ``vmap``/``grad``/``functional_call``::

    from pyfunctorch.contrib.opacus import use_pyfunctorch

    with use_pyfunctorch():          # or call use_pyfunctorch() once: stays on
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="functorch")
        ...train...

Layers are prepared when Opacus wraps the model, so enable it *before* ``make_private``
(or ``GradSampleModule(...)``). This module imports opacus only when its functions are
called; ``import pyfunctorch`` never imports it.
"""

from __future__ import annotations

import copy
import sys
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from ..batched import vmap
from ..functional import functional_call
from ..reverse import grad

__all__ = ["use_pyfunctorch", "make_functional", "prepare_layer", "ft_compute_per_sample_gradient"]

_NAMES = ("make_functional", "prepare_layer", "ft_compute_per_sample_gradient")


def make_functional(mod: nn.Module, disable_autograd_tracking: bool = False):
    """``(fmodel, params)``: ``fmodel(params, *args, **kwargs)`` runs ``mod`` with ``params``
    (a tuple in ``mod.named_parameters()`` order) through pyfunctorch's ``functional_call``.
    Same contract as ``opacus.grad_sample.functorch.make_functional``."""
    params_dict = dict(mod.named_parameters())
    names = tuple(params_dict)
    values = tuple(params_dict.values())
    stateless = copy.deepcopy(mod).to("meta")
    if hasattr(stateless, "allow_grad_accumulation"):
        stateless.allow_grad_accumulation()

    def fmodel(new_values, *args, **kwargs):
        return functional_call(stateless, dict(zip(names, new_values)), args, kwargs)

    if disable_autograd_tracking:
        values = tuple(v.detach() for v in values)
    return fmodel, values


def prepare_layer(layer: nn.Module, batch_first: bool = True) -> None:
    """Give ``layer`` the ``ft_compute_sample_grad`` function Opacus calls:
    ``vmap(grad(loss), in_dims=(None, 0, 0))(params, activations, backprops)`` with
    pyfunctorch, where ``loss = (layer(activation) * backprop).sum()`` per example."""
    from opacus.layers.dp_rnn import RNNLinear

    if len(list(layer.buffers())) > 0:
        raise NotImplementedError("This layer has buffers and is not supported by Opacus")
    if type(layer) is nn.EmbeddingBag:
        # as Opacus' own path; pyfunctorch itself batches embedding_bag
        raise NotImplementedError("Opacus' functorch path does not support EmbeddingBag")
    flayer, _ = make_functional(layer)
    unsqueeze_dim = 0 if (batch_first or type(layer) is RNNLinear) else 1

    def loss(params, activations, backprops):
        a = activations.unsqueeze(unsqueeze_dim)
        b = backprops.unsqueeze(unsqueeze_dim)
        mixed = activations.dtype != params[0].dtype
        ctx = torch.amp.autocast(device_type=activations.device.type, dtype=activations.dtype) if mixed else nullcontext()
        with ctx:
            return (flayer(params, a) * b).sum()

    fn = vmap(grad(loss), in_dims=(None, 0, 0))
    fn._pyfunctorch = True  # type: ignore[attr-defined]
    layer.ft_compute_sample_grad = fn


def ft_compute_per_sample_gradient(layer: nn.Module, activations, backprops) -> dict:
    """``{parameter: per-sample gradient}`` of ``layer`` (Opacus' grad sampler signature)."""
    parameters = list(layer.parameters(recurse=True))
    fn = getattr(layer, "ft_compute_sample_grad", None)
    if fn is None:
        prepare_layer(layer)
    elif not getattr(fn, "_pyfunctorch", False):
        raise RuntimeError(
            f"pyfunctorch.contrib.opacus: the layer {type(layer).__name__} was prepared by Opacus' own "
            "torch.func path, before use_pyfunctorch() was in force. Call use_pyfunctorch() (or enter "
            "`with use_pyfunctorch():`) before PrivacyEngine.make_private / GradSampleModule(...)."
        )
    act = activations[0]
    if act.dtype != backprops.dtype and act.is_floating_point():
        act = act.to(backprops.dtype)
    grads = layer.ft_compute_sample_grad(parameters, act, backprops)
    return {p: g for p, g in zip(parameters, grads)}


_OURS = {"make_functional": make_functional, "prepare_layer": prepare_layer,
         "ft_compute_per_sample_gradient": ft_compute_per_sample_gradient}


def _opacus_modules():
    """Opacus' functorch module and every opacus module that imported its functions by name."""
    import opacus.grad_sample  # noqa: F401  (loads the grad-sample modules)
    import opacus.grad_sample.functorch as ft

    originals = {n: getattr(ft, n) for n in _NAMES}
    mods = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "opacus" or name.startswith("opacus.")):
            continue
        hits = [n for n in _NAMES if getattr(mod, n, None) is originals[n] or getattr(mod, n, None) is _OURS[n]]
        if hits:
            mods.append((mod, hits))
    return mods


class _Switch:
    """Returned by :func:`use_pyfunctorch`: already on; ``with`` restores on exit,
    ``.restore()`` restores explicitly."""

    def __init__(self, saved: list) -> None:
        self._saved = saved

    def restore(self) -> None:
        for mod, name, old in reversed(self._saved):
            setattr(mod, name, old)
        self._saved = []

    def __enter__(self) -> "_Switch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def use_pyfunctorch() -> _Switch:
    """Route Opacus' functorch per-sample-gradient path through pyfunctorch.

    Replaces ``make_functional``, ``prepare_layer`` and ``ft_compute_per_sample_gradient``
    in ``opacus.grad_sample.functorch`` and in every opacus module that imported them. Takes
    effect immediately; as a context manager it restores Opacus' functions on exit.
    Enable it before Opacus wraps the model (``make_private``, ``GradSampleModule``).

    Raises:
        ImportError: opacus is not installed (``pip install pyfunctorch[opacus]``).
    """
    try:
        mods = _opacus_modules()
    except ImportError as e:
        raise ImportError(
            "pyfunctorch.contrib.opacus needs opacus: pip install opacus (or pip install 'pyfunctorch[opacus]')."
        ) from e
    saved = []
    for mod, names in mods:
        for n in names:
            saved.append((mod, n, getattr(mod, n)))
            setattr(mod, n, _OURS[n])
    return _Switch(saved)


