"""Per-sample gradients of common models, pyfunctorch against torch.func (the oracle).

Models: nn.TransformerEncoderLayer (batch_first, no dropout), a ResNet-style CNN with BatchNorm
(eval, and train with per-example running stats), an LSTM classifier and a GRU classifier.
On CUDA these take the CUDA-only kernels (SDPA's efficient/flash attention, cudnn_batch_norm,
the fused RNN cells). Prints one line per model (max abs/rel difference, the ops that ran
through vmap's per-example loop fallback) and exits 1 if any model fails.

    PYTHONPATH=src python scripts/gpu_models.py --device cuda            # full sizes
    PYTHONPATH=src python scripts/gpu_models.py --device cpu --small     # CI smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn
from torch.func import functional_call

import pyfunctorch as pf
from pyfunctorch import batched


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self, c, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class RNNClassifier(nn.Module):
    def __init__(self, kind, vocab, emb, hidden, classes):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = getattr(nn, kind)(emb, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self, d, heads, ff, classes):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def models(small: bool):
    B = 4 if small else 32
    if small:
        d, heads, ff, L, c, hw, vocab, emb, hid, T = 32, 4, 64, 8, 8, 8, 50, 16, 32, 6
    else:
        d, heads, ff, L, c, hw, vocab, emb, hid, T = 256, 4, 1024, 64, 64, 32, 1000, 128, 256, 50
    classes = 10
    yield "TransformerEncoderLayer", Encoder(d, heads, ff, classes), (lambda dev: torch.randn(B, L, d, device=dev)), B
    yield "ResNet-BN eval", ResNet(c, classes).eval(), (lambda dev: torch.randn(B, 3, hw, hw, device=dev)), B
    yield "ResNet-BN train", ResNet(c, classes).train(), (lambda dev: torch.randn(B, 3, hw, hw, device=dev)), B
    for kind in ("LSTM", "GRU"):
        yield f"{kind} classifier", RNNClassifier(kind, vocab, emb, hid, classes), \
            (lambda dev, vocab=vocab: torch.randint(0, vocab, (B, T), device=dev)), B


def per_sample_grads(vmap, grad, model, params, buffers, x, y):
    """vmap(grad(loss)) over examples; buffers are per example (in_dims=0: train-mode batch
    norm updates each example's own running stats), and returned with the grads."""

    def loss(p, b, xi, yi):
        out = functional_call(model, {**p, **b}, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0)), b

    g, b = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0, 0))(params, buffers, x, y)
    return g, b


def _loop_vmap(f, in_dims):
    """vmap's definition: one call per example, results stacked."""

    def run(*args):
        B = next(len(a) for a, d in zip(args, in_dims) if d is not None and isinstance(a, torch.Tensor))
        outs = []
        for i in range(B):
            ex = [torch.utils._pytree.tree_map(lambda t: t[i], a) if d is not None else a for a, d in zip(args, in_dims)]
            outs.append(f(*ex))
        return torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *outs)

    return run


def check(name, model, make_x, B, device, dtype, rtol, atol):
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype)
    x = make_x(device)
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.randint(0, 10, (B,), device=device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().unsqueeze(0).repeat((B,) + (1,) * v.dim()) for k, v in model.named_buffers()}
    buf_ref = {k: v.clone() for k, v in buffers.items()}
    before = dict(batched.FALLBACK_COUNTS)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, got_b = per_sample_grads(pf.vmap, pf.grad, model, params, buffers, x, y)
    t1 = time.perf_counter()
    oracle = "torch.func"
    try:
        want, want_b = per_sample_grads(torch.func.vmap, torch.func.grad, model, params, buf_ref, x, y)
    except RuntimeError as e:  # (torch.func's vmap cannot batch nn.GRU's in-place gate update)
        oracle = f"a loop (torch.func: {str(e).splitlines()[0][:60]})"
        want, want_b = per_sample_grads(_loop_vmap, torch.func.grad, model, params, buf_ref, x, y)
    t2 = time.perf_counter()
    fallback = sorted(str(k) for k, v in batched.FALLBACK_COUNTS.items() if before.get(k, 0) != v)
    worst, ok = 0.0, True
    for k in want:
        a, e = got[k].float(), want[k].float()
        if a.shape != e.shape:
            ok, worst = False, float("inf")
            continue
        err = ((a - e).abs() - atol - rtol * e.abs()).max().item()
        worst = max(worst, (a - e).abs().max().item())
        ok = ok and err <= 0
    for k in want_b:
        if want_b[k].is_floating_point() and not torch.allclose(got_b[k].float(), want_b[k].float(), rtol=rtol, atol=atol):
            ok = False
    print(f"{'PASS' if ok else 'FAIL'} {name:24s} max|diff| {worst:.2e}  pyfunctorch {t1 - t0:.2f}s  "
          f"oracle {t2 - t1:.2f}s  loop-fallback ops: {fallback or 'none'}  oracle: {oracle}", flush=True)
    return ok


def _no_tf32():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpu import no_tf32  # (shared by the three sweeps; the scripts are also loaded by path)

    no_tf32()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--small", action="store_true", help="small sizes (a CPU smoke run)")
    ap.add_argument("--only", default=None, help="run the models whose name contains this")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_models: CUDA is not available; nothing to run on cuda")
        return 0
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    _no_tf32()  # (TF32 would make both sides differ from each other by ~1e-3)
    rtol, atol = (1e-3, 1e-4) if dtype == torch.float32 else (1e-7, 1e-9)
    print(f"gpu_models: torch {torch.__version__}, device {args.device}, {args.dtype}, "
          f"{'small' if args.small else 'full'} sizes", flush=True)
    failed = []
    for name, model, make_x, B in models(args.small):
        if args.only and args.only not in name:
            continue
        try:
            if not check(name, model, make_x, B, args.device, dtype, rtol, atol):
                failed.append(name)
        except Exception:  # noqa: BLE001 - report every model, then fail
            print(f"ERROR {name}:\n{traceback.format_exc()}", flush=True)
            failed.append(name)
    print(f"gpu_models: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
