"""Neural-network ops: convolution, pooling, normalization, losses, embedding."""

from __future__ import annotations

import torch

from ._registry import batch_rule

aten = torch.ops.aten
