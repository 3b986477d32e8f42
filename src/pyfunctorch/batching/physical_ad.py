"""The ops whose batching rules torch's autograd may differentiate on the physical batch: per-sample gradients (reverse._Shadow under vmap) differentiate only those."""

from __future__ import annotations

import torch

from . import attention, convolution, embedding, linalg, pointwise, views

aten = torch.ops.aten

# A rule computes an op on the physical batch with other torch ops. torch's autograd then
# records those ops, and differentiating them gives each example's derivative wherever the
# rule is the op itself on reshaped, moved or broadcast values (the pointwise and view
# rules, reductions over shifted dims, folding the batch into N or into groups, products).
# Rules with their own arithmetic are correct as functions but need not be as derivatives
# (embedding's lookup in a table of B*V rows honoured padding_idx for one example only): a
# per-sample gradient whose graph holds any op not listed here is differentiated on the
# transform's wrappers instead. Checked: every op_db op (scripts/coverage.py --ad, kinds
# vmap(grad) and vmap(grad) shared; vjp(vmap) differentiates every rule's arithmetic the same
# way, from a level around vmap) and the models of tests/test_per_sample_shadow.py.

_SAFE_RULES = {
    pointwise.broadcasting_rule, pointwise.same_shape_kernel_rule, pointwise.copy_, pointwise.copy,
    pointwise.masked_fill_tensor,
    views.view, views.expand, views.permute, views.transpose, views.t, views.unsqueeze, views.squeeze,
    views.select, views.slice_, views.narrow, views.split, views.unbind, views.movedim, views.diagonal,
    views.cat, views.stack, views.repeat, views.flip, views.trailing_only,
    linalg.mm, linalg.addmm, linalg.mv, linalg.dot,
    convolution.convolution, convolution.convolution_backward,
    # (one lookup in a shared table with per-example table gradients, _SharedEmbedding; per-example
    # tables folded into one, or, with padding_idx and a derivative, one call per example; bags:
    # padding entries point at one appended zero row)
    embedding.embedding, embedding.embedding_bag,
    # (the batch folded into the kernels' own batch of attention problems, N)
    attention.sdpa_flash_cpu, attention.sdpa_flash_cpu_backward,
}

_SAFE_OPS = {
    aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.amax.default,
    aten.amin.default, aten.logsumexp.default,
    aten._log_softmax.default, aten._softmax.default, aten._safe_softmax.default,
    aten._log_softmax_backward_data.default, aten._softmax_backward_data.default,
    aten.nll_loss_forward.default, aten.nll_loss_backward.default,
    aten.max_pool2d_with_indices.default, aten.max_pool2d_with_indices_backward.default,
    aten.avg_pool2d.default, aten.avg_pool2d_backward.default,
    aten.native_layer_norm.default, aten.native_layer_norm_backward.default,
}


def physically_differentiable(op) -> bool:
    """Whether ``op``'s batching rule may be differentiated on the physical batch (cached on the op)."""
    try:
        return op._pyf_physical_ad
    except AttributeError:
        pass
    from . import lookup  # (the package's lookup: explicit rules, then the pointwise tag)

    ok = op in _SAFE_OPS or lookup(op) in _SAFE_RULES
    try:
        op._pyf_physical_ad = ok
    except AttributeError:
        pass
    return ok
