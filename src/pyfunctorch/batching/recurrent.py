"""Recurrent layers: torch._VF's rnn/gru/lstm entry points under vmap (the batch folded into the RNN's own batch)."""

from __future__ import annotations

import torch

from .. import _core

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
    if isinstance(hx, (list, tuple)):
        hx = type(hx)(h + zero for h in hx)
    elif isinstance(hx, torch.Tensor):
        hx = hx + zero
    new = list(args)
    new[pos] = hx
    return original(*new, **kwargs)

