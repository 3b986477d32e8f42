"""Models and measurements shared by the CPU suite (run.py) and the CUDA suite (cuda_suite.py)."""

from __future__ import annotations

import gc

import torch
import torch.nn as nn  # noqa: F401
import torch.nn.functional as F  # noqa: F401

try:  # JAX is optional (not installed on the reference machine)
    import jax  # noqa: F401
    import jax.numpy as jnp
    import numpy as np

    HAVE_JAX, JAX_WHY = True, f"jax {jax.__version__}"
except Exception as e:  # pragma: no cover - environment dependent
    HAVE_JAX, JAX_WHY = False, f"skipped: import jax failed ({type(e).__name__})"


def _np(t):
    return np.asarray(t.detach().cpu().numpy())


def tanh_mlp(din, dh, dout, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(dh, din, generator=g) / din**0.5
    W2 = torch.randn(dh, dh, generator=g) / dh**0.5
    W3 = torch.randn(dout, dh, generator=g) / dh**0.5
    b1, b2, b3 = (torch.randn(n, generator=g) * 0.1 for n in (dh, dh, dout))
    if device != "cpu":  # drawn on the CPU (same values on every device), then moved
        W1, W2, W3, b1, b2, b3 = (t.to(device) for t in (W1, W2, W3, b1, b2, b3))

    def f(x):
        return W3 @ torch.tanh(W2 @ torch.tanh(W1 @ x + b1) + b2) + b3

    def jac(x):  # analytic: W3 diag(1 - a2^2) W2 diag(1 - a1^2) W1
        a1 = torch.tanh(W1 @ x + b1)
        a2 = torch.tanh(W2 @ a1 + b2)
        return W3 @ ((1 - a2 * a2).unsqueeze(1) * (W2 @ ((1 - a1 * a1).unsqueeze(1) * W1)))

    def jf(x):
        return W3n @ jnp.tanh(W2n @ jnp.tanh(W1n @ x + b1n) + b2n) + b3n

    if HAVE_JAX:
        W1n, W2n, W3n, b1n, b2n, b3n = (jnp.asarray(_np(t)) for t in (W1, W2, W3, b1, b2, b3))
    return f, jac, jf


def scalar_fn(n=128, dh=256, seed=1, device="cpu"):
    """f(x) = c . tanh(W x + b): Hessian = W^T diag(c * -2 t (1 - t^2)) W."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dh, n, generator=g) / n**0.5
    b = torch.randn(dh, generator=g) * 0.1
    c = torch.randn(dh, generator=g)
    if device != "cpu":
        W, b, c = W.to(device), b.to(device), c.to(device)

    def f(x):
        return torch.tanh(W @ x + b) @ c

    def curv(x):
        t = torch.tanh(W @ x + b)
        return c * (-2 * t * (1 - t * t))

    def hess(x):
        return W.t() @ (curv(x).unsqueeze(1) * W)

    def hvps(x, V):  # rows: H v for each row v of V
        return (V @ W.t() * curv(x)) @ W

    jax_f = None
    if HAVE_JAX:
        Wn, bn, cn = (jnp.asarray(_np(t)) for t in (W, b, c))

        def jax_f(x):
            return jnp.tanh(Wn @ x + bn) @ cn

    return f, hess, hvps, jax_f


def peak_tensor_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator during one call
    of fn, relative to the start of the call, from torch.profiler's allocation events
    (profile_memory=True). Counts tensor storage only (the result included, Python
    objects not). Call after a warm-up."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        stack.extend(n.children)
        if n.tag == _EventType.Allocation and str(n.extra_fields.device) == "cpu":
            events.append((n.start_time_ns, n.extra_fields.alloc_size, n.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    base = events[0][2] - events[0][1]  # running total just before the first event
    return max(0, max(t for _, _, t in events) - base)
