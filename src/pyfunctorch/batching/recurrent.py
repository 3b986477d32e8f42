"""Recurrent layers: torch._VF's rnn/gru/lstm entry points under vmap (the batch folded into the RNN's own batch), and the fused CUDA LSTM/GRU cell kernels."""

from __future__ import annotations

import contextlib

import torch

from .. import _core
from ._registry import batch_rule, batch_size_of, materialize

aten = torch.ops.aten


# -- recurrent layers ----------------------------------------------------------------------------
# torch's RNN/GRU/LSTM kernels (``_VF.rnn_tanh``, ``gru``, ``lstm``, the ``*_cell`` ops) are
# CompositeImplicit C++ loops that accumulate in place into ``linear(hidden, w_hh, b_hh)``:
# ``linear_hh(h).add_(linear_ih(x))``, and GRU's ``chunked_hgates[0].add_(...)``. When the
# initial hidden state is not batched (``nn.RNN`` makes it with ``torch.zeros`` when none is
# given) but the input or the weights are, that buffer is unbatched and the ``add_`` would write
# batched values into it. Giving the hidden state the batch of the other arguments (adding a
# zero that is batched at their levels) makes every step's buffer batched; values are unchanged.


def _batched_zero(tensors):
    """A 0-dim zero batched at every level where any of ``tensors`` is; None if none is wrapped."""
    zero = None
    for t in tensors:
        if isinstance(t, _core.LevelTensor):
            z = t.new_zeros(())
            zero = z if zero is None else zero + z
    return zero


def rnn_entry(original, args, kwargs):
    if kwargs or len(args) < 3:
        return original(*args, **kwargs)
    name = original.__name__
    if name.endswith("_cell"):
        pos = 1
    else:  # the packed-sequence overloads take (data, batch_sizes, hx, params, ...)
        pos = 2 if isinstance(args[1], torch.Tensor) and (name == "lstm" or isinstance(args[2], torch.Tensor)) else 1
    flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    zero = _batched_zero(flat)
    if zero is None:
        return original(*args, **kwargs)
    hx = args[pos]
    # On CUDA the C++ RNN calls cuDNN (``_cudnn_rnn``) when ``cudnn_is_acceptable(input)``; its
    # backward returns the weights' gradient summed over the batch (no per-example gradients),
    # and it reads the weights' storage to find a flat buffer (wrappers have none). With cuDNN
    # off for the call, torch runs its own loop over time steps: matmuls and the fused cell
    # kernels ``_thnn_fused_lstm_cell``/``_thnn_fused_gru_cell``, which have rules below.
    guard = torch.backends.cudnn.flags(enabled=False) if any(t.is_cuda for t in flat) else contextlib.nullcontext()
    if isinstance(hx, (list, tuple)):
        hx = type(hx)(h + zero for h in hx)
    elif isinstance(hx, torch.Tensor):
        hx = hx + zero
    new = list(args)
    new[pos] = hx
    with guard:
        return original(*new, **kwargs)


# -- the fused CUDA cell kernels -------------------------------------------------------------------
# (gates (N, 4H) / (N, 3H), state (N, H), biases (4H,) / (3H,)): the vmap batch folds into N.
# Their backwards return the biases' gradient summed over N; folded, that sum would run over
# the examples too, so it is recomputed per example from the gates' gradient.


def _fold_n(args, dims, idx, B):
    """Fold the batch into dim 0 of the tensors at ``idx``; per-example N."""
    n = None
    out = list(args)
    for i in idx:
        if out[i] is not None:
            if n is None:
                n = out[i].shape[1] if dims[i] is not None else out[i].shape[0]
            out[i] = materialize(out[i], dims[i], B).flatten(0, 1)
    return out, n


def _unfold(t, B):
    return t.reshape((B, -1) + t.shape[1:])


def _cell_forward(op, args, kwargs, dims):
    B = batch_size_of(args, dims)
    args, dims = list(args), list(dims)
    biases = [i for i in (3, 4) if i < len(args) and args[i] is not None]
    if any(dims[i] is not None for i in biases):
        # per-example biases (an ensemble): add them to the gates, whose batch folds
        for i in biases:
            g = 0 if i == 3 else 1
            args[g] = args[g] + (args[i].unsqueeze(1) if dims[i] is not None else args[i])
            dims[g] = 0 if dims[i] is not None or dims[g] is not None else None
            args[i] = None
        args = args[:3]
    folded, _ = _fold_n(args, dims, (0, 1, 2), B)
    return tuple(_unfold(o, B) for o in op(*folded, **kwargs)), 0


for _name in ("_thnn_fused_lstm_cell", "_thnn_fused_gru_cell"):
    if hasattr(torch.ops.aten, _name):
        batch_rule(getattr(torch.ops.aten, _name).default)(_cell_forward)


def _bias_grad(grad_gates, B, has_bias):
    return _unfold(grad_gates, B).sum(1) if has_bias else None


if hasattr(torch.ops.aten, "_thnn_fused_lstm_cell_backward_impl"):

    @batch_rule(torch.ops.aten._thnn_fused_lstm_cell_backward_impl.default)
    def lstm_cell_backward(op, args, kwargs, dims):
        # (grad_hy, grad_cy, cx, cy, workspace, has_bias) -> (grad_gates, grad_cx, grad_bias)
        B = batch_size_of(args, dims)
        folded, _ = _fold_n(args, dims, (0, 1, 2, 3, 4), B)
        grad_gates, grad_cx, _ = op(*folded, **kwargs)
        return (_unfold(grad_gates, B), _unfold(grad_cx, B), _bias_grad(grad_gates, B, args[5])), 0


if hasattr(torch.ops.aten, "_thnn_fused_gru_cell_backward"):

    @batch_rule(torch.ops.aten._thnn_fused_gru_cell_backward.default)
    def gru_cell_backward(op, args, kwargs, dims):
        # (grad_hy, workspace, has_bias) -> (d input gates, d hidden gates, d hx, d input bias,
        # d hidden bias)
        B = batch_size_of(args, dims)
        folded, _ = _fold_n(args, dims, (0, 1), B)
        gi, gh, ghx, _, _ = op(*folded, **kwargs)
        return (_unfold(gi, B), _unfold(gh, B), _unfold(ghx, B), _bias_grad(gi, B, args[2]), _bias_grad(gh, B, args[2])), 0

