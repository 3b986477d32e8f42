"""MAML (model-agnostic meta-learning) on sine-wave regression.

Each *task* is a sine wave ``y = A sin(x + phase)`` with its own amplitude and phase
(Finn et al., 2017). MAML learns initial weights theta of a small MLP such that a few
SGD steps on K examples of a new task (the *inner loop*) fit that task well:

    adapted(theta, task) = theta - alpha * grad(loss_support)(theta)   (a few times)
    meta_loss(theta)     = mean over tasks of loss_query(adapted(theta, task))

With function transforms every piece is one call: the inner loop uses ``grad``, the
tasks of a meta-batch run in parallel with ``vmap`` (so ``grad`` runs inside
``vmap``), and the meta-gradient is ``grad`` of the vmapped loss, differentiating
*through* the inner SGD steps (a second-order gradient)::

    task_losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    meta_grad, meta_loss = grad_and_value(lambda p, *b: task_losses(p, *b).mean())(params, *batch)

(as functorch's ``examples/maml_regression``). The script checks the vmapped
meta-gradient once against a per-task loop of ``torch.autograd.grad`` with
``create_graph=True``, meta-trains with Adam while printing the meta-loss, and checks
that the meta-loss decreased and that a few inner steps adapt the learned
initialization to new tasks better than they adapt a random one. Exits with status 1
if a check fails.

    python examples/maml.py [--small]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from pyfunctorch import grad, grad_and_value, vmap


def init_params(hidden=40, generator=None):
    def layer(n_in, n_out):
        bound = 1 / math.sqrt(n_in)
        w = (torch.rand(n_out, n_in, generator=generator) * 2 - 1) * bound
        b = (torch.rand(n_out, generator=generator) * 2 - 1) * bound
        return [w, b]

    return layer(1, hidden) + layer(hidden, hidden) + layer(hidden, 1)


def mlp(params, x):
    h = F.relu(F.linear(x, params[0], params[1]))
    h = F.relu(F.linear(h, params[2], params[3]))
    return F.linear(h, params[4], params[5])


def loss(params, x, y):
    return F.mse_loss(mlp(params, x), y)


def inner_loop(params, x, y, steps, alpha):
    """A few steps of plain SGD on one task's support set."""
    for _ in range(steps):
        grads = grad(loss)(params, x, y)
        params = [p - alpha * g for p, g in zip(params, grads)]
    return params


def sample_tasks(n_tasks, k, generator):
    """Support and query sets (k points each) of ``n_tasks`` random sine waves."""
    amp = torch.rand(n_tasks, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=generator) * math.pi
    x = torch.rand(n_tasks, 2 * k, 1, generator=generator) * 10 - 5
    y = amp * torch.sin(x + phase)
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MAML on sine-wave regression with vmap over grad")
    ap.add_argument("--small", action="store_true", help="fewer meta-iterations (what CI runs)")
    ap.add_argument("--iters", type=int, default=None, help="meta-iterations (default 500; 60 with --small)")
    ap.add_argument("--tasks", type=int, default=None, help="tasks per meta-batch (default 16)")
    ap.add_argument("--k", type=int, default=10, help="examples per support/query set (K-shot)")
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--alpha", type=float, default=0.01, help="inner-loop learning rate")
    ap.add_argument("--lr", type=float, default=None, help="meta learning rate (Adam; default 1e-3, 5e-3 with --small)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    iters = args.iters or (60 if args.small else 500)
    n_tasks = args.tasks or 16
    lr = args.lr or (5e-3 if args.small else 1e-3)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    steps, alpha = args.inner_steps, args.alpha

    def task_loss(params, x_spt, y_spt, x_qry, y_qry):
        adapted = inner_loop(params, x_spt, y_spt, steps, alpha)
        return loss(adapted, x_qry, y_qry)

    task_losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))  # all tasks of a meta-batch at once

    def meta_loss(params, *batch):
        return task_losses(params, *batch).mean()

    params = init_params(generator=gen)
    print(f"MAML: MLP 1-40-40-1, {n_tasks} sine-wave tasks per meta-batch, {args.k}-shot, "
          f"{steps} inner SGD step(s) with alpha={alpha}, {iters} meta-iterations of Adam (lr {lr})")

    # 1. the meta-gradient through vmap(grad) equals a per-task loop of plain autograd
    batch = sample_tasks(4, args.k, gen)
    g_fast = grad(meta_loss)(params, *batch)
    leaves = [p.detach().requires_grad_() for p in params]
    total = 0.0
    for t in range(4):
        adapted = leaves
        for _ in range(steps):
            gs = torch.autograd.grad(loss(adapted, batch[0][t], batch[1][t]), adapted, create_graph=True)
            adapted = [p - alpha * g for p, g in zip(adapted, gs)]
        total = total + loss(adapted, batch[2][t], batch[3][t])
    g_slow = torch.autograd.grad(total / 4, leaves)
    worst = max((a - b).abs().max().item() for a, b in zip(g_fast, g_slow))
    grads_ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_fast, g_slow))
    print(f"check: meta-gradient grad(mean(vmap(task_loss))) == loop of autograd.grad(create_graph=True): "
          f"{grads_ok} (max |diff| {worst:.1e})")

    # 2. meta-train; the meta-loss is also measured on a fixed set of held-out tasks, so that
    #    its decrease is not hidden by the noise of sampling new training tasks
    held_out = sample_tasks(100, args.k, gen)

    def held_out_loss(params):
        with torch.no_grad():
            return task_losses(params, *held_out).mean().item()

    init = [p.clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    history, curve = [], [held_out_loss(params)]
    t0 = time.perf_counter()
    every = max(iters // 10, 1)
    print(f"  iteration     meta-loss of the batch   held-out meta-loss (100 tasks)")
    print(f"  {0:9d}  {'':22s}   {curve[0]:.3f}")
    for it in range(1, iters + 1):
        batch = sample_tasks(n_tasks, args.k, gen)
        grads, value = grad_and_value(meta_loss)(params, *batch)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        history.append(value.item())
        if it % every == 0 or it == iters:
            curve.append(held_out_loss(params))
            print(f"  {it:9d}  {value.item():22.3f}   {curve[-1]:.3f}")
    elapsed = time.perf_counter() - t0
    print(f"meta-trained in {elapsed:.1f} s ({1e3 * elapsed / iters:.0f} ms per meta-iteration)")
    decreased = curve[-1] < 0.9 * curve[0]
    print(f"check: held-out meta-loss decreased (by > 10%): {decreased} ({curve[0]:.3f} -> {curve[-1]:.3f})")

    # 3. the point of MAML: from the learned init, the inner step(s) fit a new task far better
    #    than the same step(s) from the random init
    test = sample_tasks(100, args.k, gen)
    with torch.no_grad():
        maml_loss = task_losses(params, *test).mean().item()
        random_loss = task_losses(init, *test).mean().item()
    better = maml_loss < random_loss
    print(f"new tasks, query MSE after {steps} inner step(s): from the MAML init {maml_loss:.3f}, "
          f"from the random init {random_loss:.3f}")
    print(f"check: the MAML init adapts better than the random init: {better}")

    ok = grads_ok and decreased and better
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
