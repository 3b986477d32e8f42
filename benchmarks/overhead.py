"""Per-op dispatch overhead of vmap (and of nested transforms), pyfunctorch vs torch.func.

A chain of 20 pointwise aten ops (the count is verified with a TorchDispatchMode op
counter on the plain-torch version) run under vmap on a small [64, 8] batch, where the
cost is almost all per-op dispatch overhead, and a larger [64, 4096] batch, where the
arithmetic starts to matter. Implementations (one thread, paired rotated rounds in one
process, see _harness.py):

  plain batched torch   chain(x) on the whole batch: the hand-batched floor
  torch.func.vmap       torch.func.vmap(chain)(x)
  pyfunctorch.vmap      pyfunctorch.vmap(chain)(x)
  for-loop              torch.stack([chain(x_i) for x_i in x])

"µs / op" is the median time of one call over the whole batch divided by the number of
aten ops of ONE un-transformed call (20 for the chain; for the grad compositions the
forward + backward ops counted on a single example, see `depth_cases`).

Nesting depth: vmap (x: [64, 8]), vmap∘grad (x: [64, 8]) and vmap∘vmap∘grad
(x: [8, 8, 8]) of `chain(x).sum()`; the floor is batched torch.autograd.grad of the
summed chain (examples are independent, so its gradient is the per-example gradient).

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402  (pins threads before torch is imported)
import torch  # noqa: E402

import pyfunctorch  # noqa: E402

CHAIN_OPS = 20


def chain(x):
    """20 pointwise aten ops: 4 x (mul, add, sin, cos, mul)."""
    for _ in range(4):
        x = (x * 1.01 + 0.1).sin()
        x = x.cos() * 0.5
    return x


def chain_sum(x):
    return chain(x).sum()


def verify_chain_count() -> int:
    x = torch.randn(3)
    n, ops = H.count_ops(lambda: chain(x))
    if n != CHAIN_OPS:
        raise AssertionError(f"chain runs {n} aten ops, expected {CHAIN_OPS}: {ops}")
    return n


def grad_op_count() -> int:
    """aten ops (forward + backward) of one plain example's grad of chain(x).sum()."""

    x = torch.randn(8, requires_grad=True)
    n, _ = H.count_ops(lambda: torch.autograd.grad(chain_sum(x), x))
    return n


def vmap_case(shape, workload="overhead: 20 pointwise ops under vmap", x=None) -> H.Case:
    x = torch.randn(*shape) if x is None else x
    pf_v = pyfunctorch.vmap(chain)
    tf_v = torch.func.vmap(chain)
    impls = [
        H.Impl("plain batched torch", lambda: chain(x)),
        H.Impl("torch.func", lambda: tf_v(x)),
        H.Impl("pyfunctorch", lambda: pf_v(x)),
        H.Impl("for-loop", lambda: torch.stack([chain(xi) for xi in x.unbind(0)])),
    ]
    return H.Case(workload, "x " + "x".join(map(str, shape)), impls, ref="plain batched torch",
                  hand="plain batched torch", ops=CHAIN_OPS)


def depth_cases(B=64, N=8, workload="overhead: nesting depth") -> list[H.Case]:
    n_grad = grad_op_count()
    x2 = torch.randn(B, N)
    b1 = int(round(B ** 0.5))
    x3 = torch.randn(b1, B // b1, N)

    def floor_grad(x):
        xr = x.detach().requires_grad_(True)
        return torch.autograd.grad(chain_sum(xr), xr)[0]

    cases = []
    pf1, tf1 = pyfunctorch.vmap(chain), torch.func.vmap(chain)
    cases.append(H.Case(workload, f"depth 1 vmap, x {B}x{N}", [
        H.Impl("plain batched torch", lambda: chain(x2)),
        H.Impl("torch.func", lambda: tf1(x2)),
        H.Impl("pyfunctorch", lambda: pf1(x2)),
    ], ref="plain batched torch", hand="plain batched torch", ops=CHAIN_OPS))
    pf2 = pyfunctorch.vmap(pyfunctorch.grad(chain_sum))
    tf2 = torch.func.vmap(torch.func.grad(chain_sum))
    cases.append(H.Case(workload, f"depth 2 vmap∘grad, x {B}x{N} ({n_grad} ops)", [
        H.Impl("plain batched torch", lambda: floor_grad(x2), note="batched autograd.grad"),
        H.Impl("torch.func", lambda: tf2(x2)),
        H.Impl("pyfunctorch", lambda: pf2(x2)),
    ], ref="plain batched torch", hand="plain batched torch", ops=n_grad))
    pf3 = pyfunctorch.vmap(pyfunctorch.vmap(pyfunctorch.grad(chain_sum)))
    tf3 = torch.func.vmap(torch.func.vmap(torch.func.grad(chain_sum)))
    cases.append(H.Case(workload, f"depth 3 vmap∘vmap∘grad, x {x3.shape[0]}x{x3.shape[1]}x{N} ({n_grad} ops)", [
        H.Impl("plain batched torch", lambda: floor_grad(x3), note="batched autograd.grad"),
        H.Impl("torch.func", lambda: tf3(x3)),
        H.Impl("pyfunctorch", lambda: pf3(x3)),
    ], ref="plain batched torch", hand="plain batched torch", ops=n_grad))
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds; depth table on [64, 8] only")
    args = ap.parse_args(argv)
    verify_chain_count()
    kw = dict(target_s=0.01, min_rounds=5, max_rounds=11, budget_s=2.0) if args.quick else \
        dict(target_s=0.03, min_rounds=11, max_rounds=41, budget_s=12.0)
    info = H.machine_info()
    print("# " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"# chain: {CHAIN_OPS} aten ops (verified with a TorchDispatchMode counter); "
          f"grad of chain(x).sum(): {grad_op_count()} aten ops (forward + backward, one example)")
    print("# median over paired rotated rounds; x torch.func / x hand = median of per-round paired ratios\n")
    cases = [vmap_case((64, 8)), vmap_case((64, 4096))]
    cases += depth_cases(64, 8)
    if not args.quick:
        cases += depth_cases(64, 4096)
    for c in cases:
        c.check()
        c.time(**kw)
    print(H.cases_table(cases))
    failed = [i.name for c in cases for i in c.impls if i.status and ("FAILED" in i.status or "ERROR" in i.status)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
