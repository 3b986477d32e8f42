"""Indexing: index, index_put, gather, scatter, index_select, masked ops."""

from __future__ import annotations

import torch

from ._registry import batch_rule

aten = torch.ops.aten
