"""Distributed training with pyfunctorch: DP-SGD inside DistributedDataParallel, and an
ensemble of models sharded over ranks.

Both parts run in several processes (``--world``, default 2) that talk over gloo on
127.0.0.1, on a CPU; nothing is downloaded.

1. **DP-SGD with per-sample clipping inside DDP.** Each rank holds a shard of the global
   batch. ``vmap(grad(loss))`` gives the per-sample gradients of its shard, from which the
   clipping factors ``c_i = min(1, C / |g_i|)`` follow. The update then goes through
   DistributedDataParallel as usual: the rank's loss is ``sum_i c_i * loss_i / b``
   (``b`` = local batch), whose gradient is the sum of the *clipped* per-sample gradients,
   and DDP's all-reduce averages it over the ranks: ``sum over the global batch of clipped
   g_i / N``. Gaussian noise ``sigma * C / N`` is drawn from a generator seeded per step, the
   same on every rank. The result equals DP-SGD in one process over the whole batch.
2. **Model ensembling sharded over ranks.** ``stack_module_state`` stacks M models; each
   rank runs ``vmap(functional_call)`` over its M / world models and ``all_gather`` joins
   the outputs: equal to the single-process ensemble.

Rank 0 checks both against one process and prints what it checked; exit status 1 if a
check fails.

    python examples/distributed.py [--small] [--world 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from pyfunctorch import functional_call, grad, stack_module_state, vmap


def make_model(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def make_data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


# -- 1. DP-SGD -----------------------------------------------------------------------------


def clip_factors(module: nn.Module, x, y, max_norm: float):
    """``min(1, C / |g_i|)`` for every example, from pyfunctorch's per-sample gradients."""
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(params, xi, yi):
        return F.cross_entropy(functional_call(module, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()], dim=1).norm(dim=1)
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


def dp_sgd_step(model, module, opt, x, y, *, step, global_batch, max_norm, noise, seed):
    """One DP-SGD step on this rank's shard ``x, y``. ``model`` is what the forward runs
    (the DDP wrapper, or the plain module in one process), ``module`` the plain module."""
    c = clip_factors(module, x, y, max_norm)
    opt.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    # gradient = sum_i c_i * grad loss_i / b: the clipped per-sample gradients, summed;
    # DDP averages over the ranks, so the result is the sum over the global batch / N
    (c.detach() * losses).sum().div(x.shape[0]).backward()
    g = torch.Generator().manual_seed(seed * 100003 + step)  # the same noise on every rank
    with torch.no_grad():
        for p in module.parameters():
            p.grad += noise * max_norm / global_batch * torch.randn(p.shape, generator=g)
    opt.step()
    return losses.mean().detach()


def train_dp_sgd(model, module, x, y, *, steps, batch, rank, world, lr, max_norm, noise, seed):
    """DP-SGD over ``steps`` global minibatches of ``batch`` examples; this rank takes its
    contiguous shard of each. Returns the trained parameters."""
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    local = batch // world
    for step in range(steps):
        start = (step * batch) % x.shape[0] + rank * local
        xb, yb = x[start:start + local], y[start:start + local]
        dp_sgd_step(model, module, opt, xb, yb, step=step, global_batch=batch, max_norm=max_norm, noise=noise,
                    seed=seed)
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# -- 2. ensembling -------------------------------------------------------------------------


def ensemble_forward(models, x, shard=slice(None)):
    """``vmap(functional_call)`` over the stacked models ``models[shard]``, on the same x."""
    params, buffers = stack_module_state(models[shard])
    base = copy.deepcopy(models[0]).to("meta")

    def fmodel(p, b, x):
        return functional_call(base, (p, b), (x,))

    with torch.no_grad():
        return vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)


def ensemble_sharded(models, x, rank, world):
    """Each rank runs its M / world models; all_gather joins the outputs in model order."""
    per = len(models) // world
    mine = ensemble_forward(models, x, slice(rank * per, (rank + 1) * per))
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.cat(parts)


# -- the processes -------------------------------------------------------------------------


def config(small: bool) -> dict:
    return dict(steps=3 if small else 20, batch=16 if small else 64, n=64 if small else 512, lr=0.5, max_norm=0.5,
                noise=0.3, seed=0, models=4 if small else 8, hidden=16 if small else 64)


def worker(rank: int, world: int, port: int, cfg: dict, out_path: str) -> None:
    """One rank: both parts; rank 0 saves what it got to ``out_path``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = make_data(cfg["n"])
        module = make_model(cfg["seed"], cfg["hidden"])
        ddp = nn.parallel.DistributedDataParallel(module)
        params = train_dp_sgd(ddp, module, x, y, rank=rank, world=world, steps=cfg["steps"], batch=cfg["batch"],
                              lr=cfg["lr"], max_norm=cfg["max_norm"], noise=cfg["noise"], seed=cfg["seed"])
        models = [make_model(100 + i, cfg["hidden"]) for i in range(cfg["models"])]
        ens = ensemble_sharded(models, x[:8], rank, world)
        if rank == 0:
            torch.save({"params": params, "ensemble": ens}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(world: int, cfg: dict, timeout: float = 120.0) -> dict:
    """Spawn ``world`` processes running :func:`worker`; rank 0's results. Kills the
    processes and raises TimeoutError after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        ctx = mp.start_processes(worker, args=(world, free_port(), cfg, out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"the {world} processes did not finish within {timeout:.0f} s")
        return torch.load(out)


def check(name, got, want, rtol=1e-5, atol=1e-6) -> bool:
    ok = got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol)
    print(f"check: {name}: {ok} (shape {tuple(got.shape)}, max |diff| {(got - want).abs().max().item():.1e})")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DP-SGD inside DDP and a sharded ensemble, with pyfunctorch")
    ap.add_argument("--small", action="store_true", help="a quick run (what CI runs)")
    ap.add_argument("--world", type=int, default=2, help="processes (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config(args.small)
    if cfg["batch"] % args.world or cfg["models"] % args.world:
        ap.error(f"--world must divide the batch ({cfg['batch']}) and the ensemble size ({cfg['models']})")
    if not dist.is_available():
        print("torch.distributed is not available in this build of torch")
        return 1
    got = run_distributed(args.world, cfg)
    print(f"{args.world} processes (gloo): {cfg['steps']} DP-SGD steps, global batch {cfg['batch']}, "
          f"clip {cfg['max_norm']}, noise {cfg['noise']}; an ensemble of {cfg['models']} models")

    # the same in one process: DP-SGD over the whole global batch, the whole ensemble
    x, y = make_data(cfg["n"])
    module = make_model(cfg["seed"], cfg["hidden"])
    ref = train_dp_sgd(module, module, x, y, rank=0, world=1, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                       max_norm=cfg["max_norm"], noise=cfg["noise"], seed=cfg["seed"])
    ok = True
    for k in ref:
        ok &= check(f"DDP DP-SGD {k} == one process over the whole batch", got["params"][k], ref[k])
    models = [make_model(100 + i, cfg["hidden"]) for i in range(cfg["models"])]
    ok &= check("sharded ensemble == single-process vmap ensemble", got["ensemble"], ensemble_forward(models, x[:8]))
    with torch.no_grad():
        ok &= check("sharded ensemble == each model on its own", got["ensemble"], torch.stack([m(x[:8]) for m in models]))
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
