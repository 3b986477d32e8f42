"""Differentially private training (DP-SGD) with per-sample gradients.

DP-SGD (Abadi et al., 2016) trains a model so that no single training example can
change the result by much. Each step it

1. computes the gradient of the loss of *each* example of the minibatch,
2. clips each per-example gradient to norm at most ``C`` (``--clip``),
3. sums them, adds Gaussian noise of standard deviation ``sigma * C``
   (``--noise``), and divides by the batch size,
4. takes an SGD step with that noisy average.

Step 1 is the expensive one for plain autograd (one backward pass per example). With
function transforms it is one call::

    per_sample_grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

The data are synthetic and MNIST-shaped (1x28x28 images, two classes, each image a
class template plus Gaussian noise); nothing is downloaded. The script checks once that
the per-sample gradients equal a per-example loop of ``torch.autograd.grad``, trains a
small CNN with DP-SGD, and checks that the test accuracy is clearly above chance.
It exits with status 1 if a check fails.

    python examples/dp_sgd.py            # ~20 s on one CPU thread
    python examples/dp_sgd.py --small    # a few seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pyfunctorch import functional_call, grad, vmap


def make_data(n: int, generator: torch.Generator, separation: float = 0.08):
    """``n`` images of shape 1x28x28 from two Gaussian classes (half each).

    Class ``c`` has mean ``+-separation * template`` (a fixed random smooth pattern) and
    unit-variance pixel noise, so a single pixel says little but the whole image a lot.
    """
    g = torch.Generator().manual_seed(1234)  # the same templates for train and test
    template = F.avg_pool2d(torch.randn(1, 1, 32, 32, generator=g), 5, stride=1).reshape(1, 28, 28)
    template = template / template.std()
    y = torch.arange(n) % 2
    sign = (2 * y - 1).float().view(n, 1, 1, 1)
    x = sign * separation * template + torch.randn(n, 1, 28, 28, generator=generator)
    return x, y


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),    # -> 8x12x12
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2),   # -> 16x4x4
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 2),
    )


def per_sample_grads(model, params, x, y):
    """The gradient of each example's loss with respect to ``params``: a dict of
    tensors with a leading batch dim."""

    def loss(params, xi, yi):
        # xi, yi are ONE example; the model wants a batch, so give it a batch of one
        logits = functional_call(model, params, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def per_sample_grads_loop(model, params, x, y):
    """The same with plain autograd, one backward pass per example (the reference)."""
    names = list(params)
    leaves = [params[k].detach().requires_grad_() for k in names]
    rows = []
    for i in range(x.shape[0]):
        logits = functional_call(model, dict(zip(names, leaves)), (x[i : i + 1],))
        rows.append(torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), leaves))
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def dp_sgd_step(model, params, x, y, *, lr, clip, noise, generator):
    """One DP-SGD step; returns the new params and the fraction of clipped examples."""
    grads = per_sample_grads(model, params, x, y)
    B = x.shape[0]
    # the norm of each example's whole gradient (all parameters together)
    norms = torch.stack([g.reshape(B, -1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)  # clip each example to norm <= clip
    new = {}
    for k, g in grads.items():
        clipped_sum = torch.einsum("b,b...->...", scale, g)
        noisy = clipped_sum + noise * clip * torch.randn(g.shape[1:], generator=generator)
        new[k] = params[k] - lr * noisy / B
    return new, (scale < 1).float().mean().item()


@torch.no_grad()
def accuracy(model, params, x, y) -> float:
    return (functional_call(model, params, (x,)).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DP-SGD on synthetic MNIST-shaped data with vmap(grad)")
    ap.add_argument("--small", action="store_true", help="a quick run (fewer, smaller steps), as CI runs it")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; 60 with --small)")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (default 64; 32 with --small)")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--clip", type=float, default=1.0, help="per-example gradient norm bound C")
    ap.add_argument("--noise", type=float, default=1.0, help="noise multiplier sigma (std of the noise is sigma*C)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.small else 300)
    batch = args.batch or (32 if args.small else 64)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = make_data(4096 if not args.small else 1024, gen)
    x_test, y_test = make_data(1000, gen)
    model = make_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    print(f"DP-SGD: CNN with {n_params} parameters, {len(x_train)} training images of shape 1x28x28, "
          f"batch {batch}, {steps} steps, clip C={args.clip}, noise multiplier sigma={args.noise}")

    # 1. the per-sample gradients are right: compare with a per-example loop once
    xb, yb = x_train[:8], y_train[:8]
    fast, slow = per_sample_grads(model, params, xb, yb), per_sample_grads_loop(model, params, xb, yb)
    worst = max((fast[k] - slow[k]).abs().max().item() for k in params)
    grads_ok = all(torch.allclose(fast[k], slow[k], rtol=1e-4, atol=1e-6) for k in params)
    print(f"check: per-sample grads (vmap(grad)) == per-example loop of autograd.grad: {grads_ok} "
          f"(max |diff| {worst:.1e}, {len(params)} tensors, batch {len(xb)})")

    # 2. train
    acc0 = accuracy(model, params, x_test, y_test)
    t0 = time.perf_counter()
    clipped = []
    bar = tqdm(range(steps), desc="DP-SGD", unit="step", mininterval=0.5)
    for step in bar:
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        params, frac = dp_sgd_step(model, params, x_train[idx], y_train[idx],
                                   lr=args.lr, clip=args.clip, noise=args.noise, generator=gen)
        clipped.append(frac)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(clipped=f"{frac:.0%}")
    bar.close()
    elapsed = time.perf_counter() - t0
    acc = accuracy(model, params, x_test, y_test)
    print(f"trained {steps} steps in {elapsed:.1f} s ({1e3 * elapsed / steps:.1f} ms/step); "
          f"examples clipped per step: {sum(clipped) / len(clipped):.0%} on average")
    print(f"test accuracy: {acc0:.1%} before training, {acc:.1%} after (chance: 50%)")
    acc_ok = acc > 0.75
    print(f"check: accuracy clearly above chance (> 75%): {acc_ok}")
    ok = grads_ok and acc_ok
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
