"""The one table of torch entry points pyfunctorch replaces while a transform is live, each with why.

Most ops reach a transform through ``__torch_dispatch__`` on its wrapper tensors. The
calls below do not (a factory has no tensor argument, a C++ composite reads data, a
classmethod was bound before the transform began, ...) or must be told apart from
torch's own internal calls. Each is swapped for a thin wrapper while any thread has a
live transform (``_core.push_interpreter`` installs them on the outermost entry and
removes them on the last exit); the wrapper checks its own thread's stack and calls the
original when it is empty. A handler is called as ``handler(original, args, kwargs)``.

The library's own code never calls through these wrappers when it means torch's
function (e.g. ``reverse`` keeps ``torch.autograd.grad`` itself).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from . import _core, _entries
from ._autograd_compat import backward_entry, grad_entry
from .batched.fallbacks import tensor_split_entry
from .batched.randomness import DROPOUTS, random_entry_point
from .batching.convolution import circular_pad_entry
from .batching.linalg import matrix_rank_entry
from .batching.normalization import batch_norm_module_entry
from .batching.recurrent import rnn_entry
from ._nested_decomp import vector_norm_entry
from .reverse import saved_hooks_entry
from .custom_function.entry import _APPLY_FN, _ENTRY_CODE


class Patch(NamedTuple):
    owner: Any
    names: tuple
    handler: Callable
    why: str
    every_thread: bool = False  # the handler runs without a live transform too (it checks its own state)


_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "linspace", "logspace", "eye", "tensor", "zeros_like",
              "ones_like", "empty_like", "full_like")
_RANDOM_FUNCTIONS = ("randn", "rand", "randint", "randperm", "normal", "randn_like", "rand_like", "randint_like",
                     "bernoulli", "multinomial", "poisson", "dropout", "alpha_dropout", "feature_alpha_dropout",
                     "feature_dropout")
_RANDOM_METHODS = ("normal_", "uniform_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_",
                   "bernoulli_", "bernoulli", "multinomial")
_RNNS = ("rnn_tanh", "rnn_relu", "gru", "lstm", "rnn_tanh_cell", "rnn_relu_cell", "gru_cell", "lstm_cell")

PATCHES: tuple[Patch, ...] = (
    Patch(torch, _FACTORIES, _entries.factory_entry,
          "tensors the user's function creates belong to every live level, so writing transformed data "
          "into them works per example (vmap) and stays differentiable (grad/jvp)"),
    Patch(torch.Tensor, ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"), _entries.factory_entry,
          "as the factories above"),
    Patch(torch.Tensor, ("clone",), _entries.clone_entry,
          "a clone of a captured (outside) tensor made in the user's function belongs to the live grad/jvp "
          "levels, so differentiated writes into it are recorded (as torch.func); vmap keeps it unbatched"),
    Patch(torch, ("clone",), _entries.clone_entry, "as Tensor.clone"),
    Patch(torch.Tensor, ("detach",), _entries.user_detach,
          "a user's x.detach() cuts every level; autograd's internal detach (a C++ call) must not (trap 2)"),
    Patch(torch, ("detach",), _entries.user_detach, "as Tensor.detach"),
    Patch(torch, _RANDOM_FUNCTIONS, random_entry_point,
          "random factories have no tensor argument and never reach a BatchedTensor: vmap's randomness "
          "flag is applied here (trap 7)"),
    Patch(torch.nn.functional, DROPOUTS, random_entry_point, "as the random functions (dropout on plain tensors)"),
    Patch(torch.Tensor, _RANDOM_METHODS, random_entry_point, "as the random functions (in-place fills)"),
    Patch(torch, ("tensor_split",), tensor_split_entry,
          "tensor_split(x, sections_tensor) reads the tensor's data in C++ (a wrapper has none): read it in "
          "Python, where a batched tensor asks for a per-example run"),
    Patch(torch.Tensor, ("tensor_split",), tensor_split_entry, "as torch.tensor_split"),
    Patch(torch.autograd, ("grad",), grad_entry,
          "torch.autograd.grad on BatchedTensors inside vmap differentiates per example"),
    Patch(torch.Tensor, ("backward",), backward_entry,
          "Tensor.backward on a BatchedTensor inside vmap: one backward of the physical batch"),
    Patch(torch.linalg, ("vector_norm",), vector_norm_entry,
          "torch's 2-norm derivative writes in place into a tensor its own differentiation saved: under "
          "nested forward-over-reverse the user's 2-norm is computed from functional ops"),
    Patch(torch, ("norm",), vector_norm_entry, "as torch.linalg.vector_norm"),
    Patch(torch.Tensor, ("norm",), vector_norm_entry, "as torch.linalg.vector_norm"),
    Patch(torch.linalg, ("matrix_rank",), matrix_rank_entry,
          "matrix_rank with tensor tolerances is a C++ composite that reads them; batched tolerances need a rule"),
    *((Patch(torch.nn.functional, ("linear_cross_entropy",), _entries.linear_cross_entropy_entry,
             "its chunked path (options given) precomputes gradients in its forward and mutates them in "
             "its backward, outside autograd's contract: under a transform the reference path (linear, "
             "then cross_entropy) runs, exact for every transform"),)
      if hasattr(torch.nn.functional, "linear_cross_entropy") else ()),
    Patch(torch.nn.functional, ("pad",), circular_pad_entry,
          "circular padding of a batched input is a C++ composite whose rank check counts the batch dim"),
    Patch(torch.nn.modules.batchnorm._BatchNorm, ("forward",), batch_norm_module_entry,
          "running statistics shared by the whole batch (num_batches_tracked counts vmap calls as the loop does)"),
    Patch(torch._C._autograd, ("_push_saved_tensors_default_hooks",), saved_hooks_entry,
          "saved-tensor hooks (checkpoint, save_on_cpu, a user's) pushed while a transform is live run where "
          "the tensor was saved and keep the lower levels' graphs (_saved_hooks); where a grad level records a "
          "shadow graph (reverse._Shadow) they apply to the wrappers' graph only (also while such a level's "
          "wrappers are differentiated after it ended: checkpoint's recomputation)", every_thread=True),
    Patch(torch._VF, _RNNS, rnn_entry, "RNN kernels take flat weights in C++: the batch is folded into the RNN's own"),
)

for _p in PATCHES:
    for _name in _p.names:
        _core.patch_while_active(_p.owner, _name, _p.handler, _p.every_thread)

# ``Function.apply`` is a classmethod, often bound before a transform starts (``vmap(MyFn.apply)``):
# a setattr wrapper would miss those, so its code object is swapped instead (custom_function/entry.py).
# (torch >= 2.14 implements apply in C++: importing pyfunctorch makes Function.apply a Python
# classmethod that calls it, the one torch attribute replaced for good; custom_function/_common.py)
CODE_PATCHES = ((_APPLY_FN, _ENTRY_CODE, "autograd.Function.apply never reaches __torch_dispatch__ and runs forward "
                 "under no_grad: without this, grad(grad(F.apply)) is silently wrong (trap 10)"),)
for _fn, _code, _why in CODE_PATCHES:
    _core.swap_code_while_active(_fn, _code)
