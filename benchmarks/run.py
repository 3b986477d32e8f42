"""The pyfunctorch benchmark suite.

    python benchmarks/run.py            # full run, writes docs/benchmarks.md
    python benchmarks/run.py --quick    # smaller/fewer (under ~3 minutes), writes docs/benchmarks.md
    python benchmarks/run.py --check    # correctness checks only, tiny sizes, no timing (CI)
    python benchmarks/run.py --only W1,W3 [--compile] [--out PATH] [--no-write]
    python benchmarks/run.py --device cuda [--check] [--quick]  # GPU-sized suite (benchmarks/cuda_suite.py),
                                                                  # writes docs/benchmarks-cuda.md

Workloads
  W1  per-sample gradients: MLP 784-128-10 and a small MNIST-shaped CNN, batch 64/256
  W2  model ensembling: 10 MLPs via stack_module_state + vmap(functional_call), batch 64/256
  W3  Jacobians of a 3-layer tanh MLP (256->256, 64->1024): jacrev and jacfwd
  W4  Hessian of a scalar function of 128 inputs; 64 batched Hessian-vector products
  W5  20 pointwise ops under vmap on [64, 8] and [64, 16384]
  W6  dispatch overhead per op at nesting depth 1, 2, 3 (vmap, vmap∘grad, vmap∘vmap∘grad)
  MEM peak tensor memory of jacrev / Hessian with and without chunk_size

Implementations (where meaningful): pyfunctorch (eager), torch.func (eager), a
per-example Python loop, hand-batched code (the floor: the same math written with
batched torch ops), torch.compile(torch.func ...) (--compile), "pyfunctorch compiled"
(only if pyfunctorch.compile exists) and JAX (only if `import jax` works).

Before anything is timed, every implementation's result is compared with the
reference (hand-batched, else torch.func) with torch.testing.assert_close; an
implementation that disagrees or raises is reported as CHECK FAILED / ERROR in its
row and is not timed. The exit status is 1 if any check failed.

Timing: one thread, all implementations of a workload in one process, paired rotated
rounds; medians and median paired ratios (see _harness.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402  (pins threads before torch is imported)
import overhead  # noqa: E402
from _models import HAVE_JAX, JAX_WHY, _np, peak_tensor_bytes, scalar_fn, tanh_mlp  # noqa: E402,F401
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.func as tf  # noqa: E402

import pyfunctorch as pf  # noqa: E402

if HAVE_JAX:
    import jax  # noqa: E402,F401
    import jax.numpy as jnp  # noqa: E402
    import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HAVE_PF_COMPILE = hasattr(pf, "compile")
PF_COMPILE_WHY = "available" if HAVE_PF_COMPILE else "skipped: pyfunctorch.compile does not exist"


class Opts:
    check = False
    compile = False
    compile_timeout = 240


# -- optional implementations -----------------------------------------------------------


class _Timeout(Exception):
    pass


def _with_timeout(fn, seconds):
    def handler(signum, frame):
        raise _Timeout(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def optional_impls(opts, tf_callable, pf_callable, args, jax_builder=None) -> list[H.Impl]:
    """torch.compile(torch.func ...), pyfunctorch compiled, JAX: only the available ones."""
    out = []
    if opts.check:
        return out
    if opts.compile:
        name = "torch.compile(torch.func)"
        try:
            torch._dynamo.reset()
            c = torch.compile(tf_callable)
            t0 = time.perf_counter()
            _with_timeout(lambda: c(*args), opts.compile_timeout)
            out.append(H.Impl(name, lambda: c(*args), note=f"compiled in {time.perf_counter() - t0:.0f} s"))
        except Exception as e:
            out.append(H.Impl(name, None, status=f"skipped: torch.compile failed: {type(e).__name__}: {H._first_line(e, 100)}"))
    if HAVE_PF_COMPILE:
        name = "pyfunctorch compiled"
        try:
            c2 = pf.compile(pf_callable)
            _with_timeout(lambda: c2(*args), opts.compile_timeout)
            out.append(H.Impl(name, lambda: c2(*args)))
        except Exception as e:
            out.append(H.Impl(name, None, status=f"ERROR: {type(e).__name__}: {H._first_line(e, 100)}"))
        if opts.compile:  # the traced graph compiled by Inductor, beside torch.compile(torch.func)
            name = "pyfunctorch compiled (inductor)"
            try:
                c3 = pf.compile(pf_callable, backend="inductor")
                t0 = time.perf_counter()
                _with_timeout(lambda: c3(*args), opts.compile_timeout)
                out.append(H.Impl(name, lambda: c3(*args), note=f"compiled in {time.perf_counter() - t0:.0f} s"))
            except Exception as e:
                out.append(H.Impl(name, None, status=f"skipped: {type(e).__name__}: {H._first_line(e, 100)}"))
    if HAVE_JAX and jax_builder is not None:
        try:
            fn, convert = jax_builder()
            out.append(H.Impl("jax.jit", fn, convert=convert))
        except Exception as e:
            out.append(H.Impl("jax.jit", None, status=f"ERROR: {type(e).__name__}: {H._first_line(e, 100)}"))
    return out


def _to_torch(x):
    return torch.from_numpy(np.array(x))


def _jax_run(f, *a):
    def run():
        r = f(*a)
        jax.block_until_ready(r)
        return r

    return run


# -- W1: per-sample gradients -----------------------------------------------------------


def mlp(din=784, dh=128, dout=10):
    return nn.Sequential(nn.Linear(din, dh), nn.ReLU(), nn.Linear(dh, dout))


def _loop_psg(model, x, y):
    names, tensors = zip(*model.named_parameters())
    per = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), tensors) for i in range(x.shape[0])]
    return {n: torch.stack([g[k] for g in per]) for k, n in enumerate(names)}


def _psg_transforms(model, params, x, y):
    def loss_with(fc):
        def loss(p, xi, yi):
            return F.cross_entropy(fc(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return loss

    pf_fn = pf.vmap(pf.grad(loss_with(pf.functional_call)), in_dims=(None, 0, 0))
    tf_fn = tf.vmap(tf.grad(loss_with(tf.functional_call)), in_dims=(None, 0, 0))
    return pf_fn, tf_fn


def w1_mlp(B, opts, din=784, dh=128, dout=10) -> H.Case:
    torch.manual_seed(0)
    model = mlp(din, dh, dout)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(B, din), torch.randint(0, dout, (B,))
    pf_fn, tf_fn = _psg_transforms(model, params, x, y)

    def hand():
        W1, b1, W2, b2 = params.values()
        h = torch.addmm(b1, x, W1.t())
        a = h.relu()
        out = torch.addmm(b2, a, W2.t())
        dout_ = out.softmax(-1)
        dout_[torch.arange(B), y] -= 1  # d CE / d logits of each example's own loss
        dh_ = (dout_ @ W2) * (h > 0)
        return {"0.weight": torch.einsum("bh,bi->bhi", dh_, x), "0.bias": dh_,
                "2.weight": torch.einsum("bo,bh->boh", dout_, a), "2.bias": dout_}

    def jax_builder():
        def loss(p, xi, yi):
            h = jnp.maximum(p["0.weight"] @ xi + p["0.bias"], 0)
            return -jax.nn.log_softmax(p["2.weight"] @ h + p["2.bias"])[yi]

        f = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
        pj = {k: jnp.asarray(_np(v)) for k, v in params.items()}
        return _jax_run(f, pj, jnp.asarray(_np(x)), jnp.asarray(y.numpy())), \
            lambda r: {k: _to_torch(r[k]) for k in params}

    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(params, x, y)),
        H.Impl("torch.func", lambda: tf_fn(params, x, y)),
        H.Impl("loop", lambda: _loop_psg(model, x, y), note="autograd.grad per example"),
        H.Impl("hand-batched", hand, note="manual backward, einsum"),
    ] + optional_impls(opts, tf_fn, pf_fn, (params, x, y), jax_builder)
    return H.Case("W1 per-sample grads", f"MLP {din}-{dh}-{dout}, B={B}", impls, ref="hand-batched")


class CNN(nn.Module):
    def __init__(self, cin=1, hw=28, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        s = ((hw - 2) // 2 - 2) // 2
        self.fc = nn.Linear(16 * s * s, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def w1_cnn(B, opts, hw=28) -> H.Case:
    torch.manual_seed(0)
    model = CNN(hw=hw)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(B, 1, hw, hw), torch.randint(0, 10, (B,))
    pf_fn, tf_fn = _psg_transforms(model, params, x, y)

    def hand():
        # Per-sample grads from ONE batched backward (examples are independent, so the
        # gradient of the summed loss w.r.t. each layer's output is per-example), then
        # per-example weight grads by unfold + einsum (the Opacus approach).
        W1, b1, W2, b2, Wf, bf = params.values()
        z1 = F.conv2d(x, W1, b1).requires_grad_(True)
        p1 = F.max_pool2d(z1.relu(), 2)
        z2 = F.conv2d(p1, W2, b2)
        f = F.max_pool2d(z2.relu(), 2).flatten(1)
        out = F.linear(f, Wf, bf)
        g1, g2, go = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), (z1, z2, out))
        with torch.no_grad():
            gw1 = torch.einsum("bol,bkl->bok", g1.flatten(2), F.unfold(x, 3)).view(B, *W1.shape)
            gw2 = torch.einsum("bol,bkl->bok", g2.flatten(2), F.unfold(p1, 3)).view(B, *W2.shape)
            return {"conv1.weight": gw1, "conv1.bias": g1.sum((2, 3)),
                    "conv2.weight": gw2, "conv2.bias": g2.sum((2, 3)),
                    "fc.weight": torch.einsum("bo,bi->boi", go, f), "fc.bias": go}

    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(params, x, y)),
        H.Impl("torch.func", lambda: tf_fn(params, x, y)),
        H.Impl("loop", lambda: _loop_psg(model, x, y), note="autograd.grad per example"),
        H.Impl("hand-batched", hand, note="batched backward + unfold/einsum (Opacus-style)"),
    ] + optional_impls(opts, tf_fn, pf_fn, (params, x, y))
    return H.Case("W1 per-sample grads", f"CNN {hw}x{hw} conv8-conv16-fc10, B={B}", impls, ref="hand-batched")


class TextTransformer(nn.Module):
    """Token embedding (padding row 0) + one transformer encoder layer + mean pooling + a linear
    head: the text classifier of differentially private fine-tuning."""

    def __init__(self, vocab=1000, d=64, heads=4, ff=128, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(d, classes)

    def forward(self, idx):
        return self.fc(self.enc(self.emb(idx)).mean(1))


def w1_transformer(B, opts, T=16, vocab=1000, d=64) -> H.Case:
    torch.manual_seed(0)
    model = TextTransformer(vocab, d, heads=2 if d < 16 else 4, ff=2 * d)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randint(0, vocab, (B, T)), torch.randint(0, 5, (B,))
    pf_fn, tf_fn = _psg_transforms(model, params, x, y)
    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(params, x, y)),
        H.Impl("torch.func", lambda: tf_fn(params, x, y)),
        H.Impl("loop", lambda: _loop_psg(model, x, y), note="autograd.grad per example"),
    ] + optional_impls(opts, tf_fn, pf_fn, (params, x, y))
    return H.Case("W1 per-sample grads", f"transformer (embedding {vocab}x{d}, encoder layer, T={T}), B={B}",
                  impls, ref="loop", hand=None)


# -- W2: ensembling ---------------------------------------------------------------------


def w2_ensemble(B, opts, M=10, din=784, dh=128, dout=10) -> H.Case:
    torch.manual_seed(0)
    models = [mlp(din, dh, dout) for _ in range(M)]
    pf_p, pf_b = pf.stack_module_state(models)
    tf_p, tf_b = tf.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(B, din)

    def fmodel_with(fc):
        return lambda p, b, xx: fc(base, (p, b), (xx,))

    pf_fn = pf.vmap(fmodel_with(pf.functional_call), in_dims=(0, 0, None))
    tf_fn = tf.vmap(fmodel_with(tf.functional_call), in_dims=(0, 0, None))

    def hand():
        W1, b1, W2, b2 = tf_p.values()
        h = torch.baddbmm(b1.unsqueeze(1), x.expand(M, B, din), W1.transpose(1, 2)).relu()
        return torch.baddbmm(b2.unsqueeze(1), h, W2.transpose(1, 2))

    def jax_builder():
        def f(p, xx):
            h = jnp.maximum(xx @ p["0.weight"].T + p["0.bias"], 0)
            return h @ p["2.weight"].T + p["2.bias"]

        g = jax.jit(jax.vmap(f, in_axes=(0, None)))
        pj = {k: jnp.asarray(_np(v)) for k, v in tf_p.items()}
        return _jax_run(g, pj, jnp.asarray(_np(x))), _to_torch

    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(pf_p, pf_b, x)),
        H.Impl("torch.func", lambda: tf_fn(tf_p, tf_b, x)),
        H.Impl("loop", lambda: torch.stack([m(x) for m in models]), note="each model in turn"),
        H.Impl("hand-batched", hand, note="baddbmm over stacked weights"),
    ] + optional_impls(opts, tf_fn, pf_fn, (tf_p, tf_b, x), jax_builder)
    return H.Case("W2 ensembling", f"{M} MLPs {din}-{dh}-{dout}, B={B}", impls, ref="hand-batched")


# -- W3: Jacobians ----------------------------------------------------------------------




def _loop_jacrev(f, x):
    xr = x.detach().requires_grad_(True)
    y = f(xr)
    return torch.stack([torch.autograd.grad(y[i], xr, retain_graph=True)[0] for i in range(y.shape[0])])


def _loop_jacfwd(f, x):
    import torch.autograd.forward_ad as fwAD

    cols = []
    with fwAD.dual_level():
        for j in range(x.shape[0]):
            e = torch.zeros_like(x)
            e[j] = 1
            cols.append(fwAD.unpack_dual(f(fwAD.make_dual(x, e))).tangent)
    return torch.stack(cols, 1)


def w3_jac(mode, din, dout, opts, dh=256) -> H.Case:
    f, jac, jf = tanh_mlp(din, dh, dout)
    x = torch.randn(din)
    pf_fn = (pf.jacrev if mode == "jacrev" else pf.jacfwd)(f)
    tf_fn = (tf.jacrev if mode == "jacrev" else tf.jacfwd)(f)
    loop = _loop_jacrev if mode == "jacrev" else _loop_jacfwd

    def jax_builder():
        g = jax.jit((jax.jacrev if mode == "jacrev" else jax.jacfwd)(jf))
        return _jax_run(g, jnp.asarray(_np(x))), _to_torch

    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(x)),
        H.Impl("torch.func", lambda: tf_fn(x)),
        H.Impl("loop", lambda: loop(f, x), note="autograd.grad per output row" if mode == "jacrev"
               else "forward-AD jvp per input column"),
        H.Impl("hand-batched", lambda: jac(x), note="analytic Jacobian, matmuls"),
    ] + optional_impls(opts, tf_fn, pf_fn, (x,), jax_builder)
    return H.Case(f"W3 {mode}", f"3-layer tanh MLP {din}->{dh}->{dh}->{dout}", impls, ref="hand-batched")


# -- W4: Hessian, batched HVPs ---------------------------------------------------------




def w4_hessian(n, opts, dh=256) -> H.Case:
    f, hess, _, jf = scalar_fn(n, dh)
    x = torch.randn(n)
    pf_fn, tf_fn = pf.hessian(f), tf.hessian(f)

    def loop():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
        return torch.stack([torch.autograd.grad(g[i], xr, retain_graph=True)[0] for i in range(n)])

    def jax_builder():
        return _jax_run(jax.jit(jax.hessian(jf)), jnp.asarray(_np(x))), _to_torch

    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(x)),
        H.Impl("torch.func", lambda: tf_fn(x)),
        H.Impl("loop", loop, note="double backward per row"),
        H.Impl("hand-batched", lambda: hess(x), note="analytic"),
    ] + optional_impls(opts, tf_fn, pf_fn, (x,), jax_builder)
    return H.Case("W4 Hessian", f"f = c.tanh(Wx+b), {n} inputs, hidden {dh}", impls, ref="hand-batched")


def w4_hvp(n, K, opts, dh=256) -> H.Case:
    f, _, hvps, jf = scalar_fn(n, dh)
    x = torch.randn(n)
    V = torch.randn(K, n)
    pf_fn = pf.vmap(lambda v: pf.jvp(pf.grad(f), (x,), (v,))[1])
    tf_fn = tf.vmap(lambda v: tf.jvp(tf.grad(f), (x,), (v,))[1])

    def loop():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
        return torch.stack([torch.autograd.grad(g, xr, v, retain_graph=True)[0] for v in V.unbind(0)])

    def jax_builder():
        xj = jnp.asarray(_np(x))
        h = jax.jit(jax.vmap(lambda v: jax.jvp(jax.grad(jf), (xj,), (v,))[1]))
        return _jax_run(h, jnp.asarray(_np(V))), _to_torch

    impls = [
        H.Impl("pyfunctorch", lambda: pf_fn(V)),
        H.Impl("torch.func", lambda: tf_fn(V)),
        H.Impl("loop", loop, note="double backward per vector"),
        H.Impl("hand-batched", lambda: hvps(x, V), note="analytic"),
    ] + optional_impls(opts, tf_fn, pf_fn, (V,), jax_builder)
    return H.Case("W4 HVP", f"vmap(jvp(grad f)), {K} vectors, {n} inputs", impls, ref="hand-batched")


# -- W5 / W6: pointwise chain, nesting depth (shared with overhead.py) -----------------


def w5_pointwise(shape, opts) -> H.Case:
    x = torch.randn(*shape)
    c = overhead.vmap_case(shape, workload="W5 20 pointwise ops under vmap", x=x)
    for i in c.impls:
        if i.name == "plain batched torch":
            i.name, i.note = "hand-batched", "plain torch on the whole batch"
        elif i.name == "for-loop":
            i.name = "loop"
    c.ref = c.hand = "hand-batched"
    pf_v = pf.vmap(overhead.chain)
    c.impls.append(H.Impl("pyfunctorch, held", lambda: pf_v(x), around=pf.hold_entry_points,
                          note="calls inside pyfunctorch.hold_entry_points()"))
    c.impls += optional_impls(opts, tf.vmap(overhead.chain), pf_v, (x,))
    return c


def w6_depth(opts, B=64, N=8) -> list[H.Case]:
    cases = overhead.depth_cases(B, N, workload="W6 overhead / nesting depth")
    for c in cases:
        for i in c.impls:
            if i.name == "plain batched torch":
                i.name = "hand-batched"
        c.ref = c.hand = "hand-batched"
    return cases


# -- MEM: peak tensor memory ------------------------------------------------------------




MEM_SIZES = {  # din, dh, dout (jacrev); n, hidden (Hessian); chunk_size
    "check": (8, 16, 32, 16, 32, 4),
    "quick": (128, 512, 512, 256, 1024, 32),
    "full": (256, 1024, 1024, 512, 2048, 64),
}


def mem_cases(opts, size="full"):
    """[(label, analytic result, {impl: callable})] for jacrev / Hessian with/without chunk_size."""
    din, dh, dout, n, hh, chunk = MEM_SIZES[size]
    f, jac, _ = tanh_mlp(din, dh, dout, seed=3)
    x = torch.randn(din)
    g, hess, _, _ = scalar_fn(n, hh, seed=4)
    xh = torch.randn(n)
    rows = [
        (f"jacrev, tanh MLP {din}->{dh}->{dh}->{dout}", jac(x), {
            "pyfunctorch jacrev": lambda: pf.jacrev(f)(x),
            f"pyfunctorch jacrev(chunk_size={chunk})": lambda: pf.jacrev(f, chunk_size=chunk)(x),
            "torch.func jacrev": lambda: tf.jacrev(f)(x),
            f"torch.func jacrev(chunk_size={chunk})": lambda: tf.jacrev(f, chunk_size=chunk)(x),
            "hand-batched (analytic)": lambda: jac(x),
        }),
        (f"Hessian, f = c.tanh(Wx+b), {n} inputs, hidden {hh}", hess(xh), {
            "pyfunctorch hessian": lambda: pf.hessian(g)(xh),
            "pyfunctorch jacrev(jacrev)": lambda: pf.jacrev(pf.jacrev(g))(xh),
            f"pyfunctorch jacrev(jacrev, chunk_size={chunk})": lambda: pf.jacrev(pf.jacrev(g), chunk_size=chunk)(xh),
            "torch.func hessian": lambda: tf.hessian(g)(xh),
            "torch.func jacrev(jacrev)": lambda: tf.jacrev(tf.jacrev(g))(xh),
            f"torch.func jacrev(jacrev, chunk_size={chunk})": lambda: tf.jacrev(tf.jacrev(g), chunk_size=chunk)(xh),
            "hand-batched (analytic)": lambda: hess(xh),
        }),
    ]
    return rows


def _memory_sanity():
    """The measurement must see a known 8 MiB peak (two live 4 MiB tensors)."""

    def fn():
        a = torch.ones(2**20)
        b = a * 2
        del a, b
        return torch.empty(2**10)

    fn()
    got = peak_tensor_bytes(fn)
    if not 8 * 2**20 <= got < 8 * 2**20 + 2**16:
        raise H.CheckFailed(f"peak_tensor_bytes measured {got} bytes for a known 8 MiB peak")


def run_memory(opts, size="full", loud=print):
    """Check each memory row's result against the analytic one, then measure."""
    table, failures = [], []
    try:
        _memory_sanity()
    except Exception as e:
        loud(f"!!! the memory measurement does not work here: {type(e).__name__}: {e}")
        return [["(sanity check)", "peak_tensor_bytes", f"ERROR: {e}"]], ["memory measurement"]
    for label, ref, impls in mem_cases(opts, size):
        for name, fn in impls.items():
            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    H.check_close(fn(), ref, name, "analytic")
                    if opts.check:
                        res = "ok"
                    else:
                        fn()
                        res = f"{peak_tensor_bytes(fn) / 2**20:.1f} MiB"
            except H.CheckFailed as e:
                res = f"CHECK FAILED: {e}"
                failures.append(name)
                loud(f"!!! CHECK FAILED, memory row aborted: {e}")
            except Exception as e:
                res = f"ERROR: {type(e).__name__}: {H._first_line(e, 120)}"
                failures.append(name)
                loud(f"!!! {name} raised, memory row aborted: {res}")
            table.append([label, name, res.replace("|", "/")])
    return table, failures


# -- driver -----------------------------------------------------------------------------


def build_cases(which, opts, quick):
    small = opts.check
    cases = []
    if "W1" in which:
        for B in ([3] if small else [64] if quick else [64, 256]):
            cases.append(lambda B=B: w1_mlp(B, opts, *((12, 8, 5) if small else ())))
        for B in ([3] if small else [64] if quick else [64, 256]):
            cases.append(lambda B=B: w1_cnn(B, opts, hw=12 if small else 28))
        for B in ([3] if small else [32]):
            cases.append(lambda B=B: w1_transformer(B, opts, *((5, 20, 8) if small else ())))
    if "W2" in which:
        for B in ([3] if small else [64, 256]):
            cases.append(lambda B=B: w2_ensemble(B, opts, *((3, 12, 8, 5) if small else ())))
    if "W3" in which:
        for din, dout in ([(6, 5), (3, 9)] if small else [(256, 256), (64, 1024)]):
            for mode in ("jacrev", "jacfwd"):
                cases.append(lambda din=din, dout=dout, mode=mode: w3_jac(mode, din, dout, opts, dh=7 if small else 256))
    if "W4" in which:
        cases.append(lambda: w4_hessian(6 if small else 128, opts, dh=10 if small else 256))
        cases.append(lambda: w4_hvp(6 if small else 128, 4 if small else 64, opts, dh=10 if small else 256))
    if "W5" in which:
        for shape in ([(4, 3)] if small else [(64, 8), (64, 16384)]):
            cases.append(lambda shape=shape: w5_pointwise(shape, opts))
    if "W6" in which:
        cases.append(lambda: w6_depth(opts, *((4, 3) if small else ())))
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description="pyfunctorch benchmark suite")
    ap.add_argument("--quick", action="store_true", help="smaller and fewer rounds (< ~3 min)")
    ap.add_argument("--check", action="store_true", help="correctness checks only at tiny sizes, no timing")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(torch.func ...)")
    ap.add_argument("--only", default="W1,W2,W3,W4,W5,W6,MEM", help="comma-separated workloads (default: all)")
    ap.add_argument("--out", default=None,
                    help="markdown report path (default docs/benchmarks.md; docs/benchmarks-cuda.md with --device cuda)")
    ap.add_argument("--no-write", action="store_true", help="do not write the markdown report")
    ap.add_argument("--json", metavar="PATH", help="also write a machine-readable summary (checks, timings) here")
    ap.add_argument("--device", default="cpu", type=_device_arg,
                    help="cpu (default: the suite above) or cuda / cuda:N: GPU-sized workloads (benchmarks/cuda_suite.py), "
                         "synchronized timing, peak CUDA memory")
    args = ap.parse_args(argv)
    if args.device.type == "cuda":
        return _main_cuda(ap, args)
    if args.out is None:
        args.out = os.path.join(REPO, "docs", "benchmarks.md")
    opts = Opts()
    opts.check, opts.compile = args.check, args.compile and not args.check
    which = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = which - {"W1", "W2", "W3", "W4", "W5", "W6", "MEM"}
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")

    t_start = time.perf_counter()
    overhead.verify_chain_count()
    kw = dict(target_s=0.005, min_rounds=3, max_rounds=9, budget_s=1.5) if args.quick else \
        dict(target_s=0.03, min_rounds=7, max_rounds=31, budget_s=10.0)
    info = H.machine_info()
    optional = {
        "torch.compile(torch.func)": "timed" if opts.compile else "not requested (pass --compile)",
        "pyfunctorch compiled": PF_COMPILE_WHY,
        "JAX": JAX_WHY,
    }
    if not args.check:
        print("# " + ", ".join(f"{k}: {v}" for k, v in info.items()))
        print("# optional implementations: " + "; ".join(f"{k}: {v}" for k, v in optional.items()))

    done, failed, summary = [], [], []
    for make in build_cases(which, opts, args.quick):
        try:
            made = make()
        except Exception as e:  # building the inputs/transforms itself failed
            print(f"!!! building a case failed: {type(e).__name__}: {H._first_line(e)}")
            failed.append("build")
            continue
        for case in made if isinstance(made, list) else [made]:
            case.check()
            if not args.check:
                case.time(**kw)
            bad = [i.name for i in case.impls if i.status and ("FAILED" in i.status or "ERROR" in i.status)]
            failed += case.failed()
            summary += case.summary()
            done.append(case)
            ok = [i.name for i in case.impls if i.status is None]
            notes = [f"{i.name}: {i.note}" for i in case.impls if "loop fallback" in i.note]
            print(f"[{case.workload} | {case.config}] check ok: {', '.join(ok) or '-'}"
                  + (f"; FAILED: {', '.join(bad)}" if bad else "")
                  + (f" ({'; '.join(notes)})" if notes else "")
                  + ("" if args.check else f"; timed in {time.perf_counter() - t_start:.0f} s so far"), flush=True)
    if done and not args.check:
        print()
        print(H.cases_table(done))

    mem_table, mem_failed = ([], [])
    if "MEM" in which:
        mem_table, mem_failed = run_memory(opts, "check" if args.check else "quick" if args.quick else "full")
        failed += [f"MEM {m}" for m in mem_failed]
        summary += [{"workload": "MEM", "case": r[0], "impl": r[1],
                     "status": "ok" if r[1] not in mem_failed else r[2], "note": "", "peak": r[2]} for r in mem_table]
        print()
        print(H.text_table(["memory workload", "implementation", "peak tensor memory" if not args.check else "check"],
                           [r[:2] + [r[2]] for r in mem_table], max_note=90))

    elapsed = time.perf_counter() - t_start
    print(f"\n# {len(done)} cases in {elapsed:.0f} s")
    if failed:
        print(f"!!! {len(failed)} implementation(s) failed their correctness check or raised:")
        for f_ in failed:
            print(f"!!!   {f_}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"check_only": args.check, "failed": failed, "rows": summary}, f, indent=1)
    if not args.check and not args.no_write:
        write_markdown(args.out, info, optional, done, mem_table, failed, args, elapsed)
        print(f"# wrote {os.path.relpath(args.out, REPO)}")
    return 1 if failed else 0


def _device_arg(text):
    """--device: 'cpu', 'cuda' or 'cuda:N' (argparse turns a ValueError into a usage error)."""
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda[:N]; got {text!r}")
    return dev


def cuda_unavailable_reason(dev) -> str | None:
    """Why ``dev`` (a cuda device) cannot be used here, or None."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built with CUDA {torch.version.cuda}"
        return (f"--device {dev} was given, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"{build}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or drop --device "
                "for the CPU suite.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {dev} was given, but only {torch.cuda.device_count()} CUDA device(s) are visible."
    return None


def _main_cuda(ap, args):
    why = cuda_unavailable_reason(args.device)
    if why is not None:
        ap.exit(2, f"{ap.prog}: error: {why}\n")
    import cuda_suite

    which = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    unknown = which - {"W1", "W2", "W3", "W4", "W5", "W6", "MEM"}
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")
    if "W6" in which:
        print("# W6 (nesting depth) runs on the CPU suite only; skipped on cuda")
    if args.compile:
        print("# --compile is not part of the CUDA suite; ignored")
    torch.cuda.set_device(args.device)
    out = None if args.no_write else (args.out or os.path.join(REPO, "docs", "benchmarks-cuda.md"))
    status, _ = cuda_suite.run(which, device=args.device, check=args.check, quick=args.quick, out=out,
                               json_path=args.json)
    return status


def write_markdown(path, info, optional, cases, mem_table, failed, args, elapsed):
    lines = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run.py`; regenerate with the command below. Do not edit by hand.",
        "",
        "## Machine and run",
        "",
    ]
    lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in info.items()]
    lines += [f"- **mode**: {'quick' if args.quick else 'full'}; wall time {elapsed:.0f} s"]
    lines += ["- **optional implementations**: " + "; ".join(f"{k}: {v}" for k, v in optional.items()), ""]
    lines += [
        "## Method",
        "",
        "- One thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`); all implementations of a",
        "  workload run in one process, in paired rounds: each round times every implementation once",
        "  (a sample is a calibrated number of back-to-back calls), the order rotated by one each round.",
        "- glibc's mmap and trim thresholds are fixed (`mallopt`, 1 GiB) before anything runs: left to adapt,",
        "  they made W1's 25 MB per-call result page-fault in some rotations and not in others (+-3 ms on a",
        "  3 ms workload, whichever implementation ran), which swamped the differences being measured.",
        "- torch's CPU allocator puts allocations of 2 MB and more on transparent huge pages",
        "  (`THP_MEM_ALLOC_ENABLE=1`, set before torch is imported; see 'huge pages' above): with 4 KB pages",
        "  W1's ratio at B=64 moved between 1.31x and 1.58x torch.func from one process to the next (the",
        "  hand-batched floor between 0.56x and 0.89x), with huge pages 1.34-1.38x (0.56x) in four processes.",
        "- **median** is the median per-call time over rounds. **x torch.func** and **x hand-batched** are",
        "  the medians over rounds of the per-round ratio t_impl / t_ref (paired, so drifts of machine load",
        "  cancel); < 1 means faster than the reference.",
        "- Before timing, every implementation's result is compared with the hand-batched result (the",
        "  reference) with `torch.testing.assert_close` (rtol 1e-4, atol 1e-5 x (1 + max|ref|)); one that",
        "  disagrees or raises is marked CHECK FAILED / ERROR and not timed.",
        "- **hand-batched** is the floor: the same math written directly with batched torch ops (manual",
        "  backward + einsum for the MLP, one batched backward + unfold/einsum for the CNN, baddbmm for",
        "  the ensemble, analytic Jacobian/Hessian/HVP for W3/W4, plain torch on the whole batch for W5/W6).",
        "- **loop** is the per-example Python loop a user would write without transforms.",
        "- 'loop fallback: ...' in the notes lists ops for which pyfunctorch had no batching rule and ran",
        "  once per example (correct but slow).",
        "- W5/W6 'µs / op' = median time of one call over the whole batch / aten ops of one un-transformed",
        "  call (20 for the pointwise chain; forward + backward ops of one example for the grad compositions,",
        "  counted with a TorchDispatchMode).",
        "- Machines are shared and noisy: compare ratios, not absolute times, across runs.",
        "",
        "## Results",
        "",
        H.cases_table(cases, markdown=True),
        "",
    ]
    if mem_table:
        lines += [
            "## Peak memory",
            "",
            "Peak of (bytes allocated - bytes freed) by torch's CPU allocator during one call (after a",
            "warm-up call), relative to the start of the call, read from `torch.profiler`'s allocation",
            "events (`profile_memory=True`). It counts tensor storage only (the returned Jacobian/Hessian",
            "included), not Python objects or allocator slack. torch.func.hessian has no `chunk_size`; the",
            "chunked Hessian rows use `jacrev(jacrev(f), chunk_size=k)`, next to the unchunked",
            "`jacrev(jacrev(f))` and `hessian` (= jacfwd(jacrev(f))).",
            "",
            H.markdown_table(["workload", "implementation", "peak tensor memory"], mem_table),
            "",
        ]
    if failed:
        lines += ["## Failed checks", ""] + [f"- {f_}" for f_ in failed] + [""]
    lines += _kept_breakdown(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _kept_breakdown(path) -> list:
    """The cost-breakdown section that benchmarks/breakdown.py --write keeps in the same file
    (between its markers): regenerating the tables must not drop it."""
    start, end = "<!-- breakdown:start -->", "<!-- breakdown:end -->"
    try:
        old = open(path).read()
    except OSError:
        return []
    if start not in old or end not in old:
        return []
    return [old[old.index(start): old.index(end) + len(end)], ""]


if __name__ == "__main__":
    sys.exit(main())
