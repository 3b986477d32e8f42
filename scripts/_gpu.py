"""What the GPU sweeps share: comparing in true float32 on a GPU."""

from __future__ import annotations

import contextlib

import torch


def no_tf32():
    """Compare in true float32 on a GPU: TF32 off (torch's test utilities, once imported, refuse
    plain assignments to the cuDNN flags: allow them for this one change)."""
    allow = getattr(torch.backends, "__allow_nonbracketed_mutation", None)
    with (allow() if allow is not None else contextlib.nullcontext()):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
