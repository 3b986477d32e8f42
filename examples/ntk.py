"""The empirical neural tangent kernel (NTK) of a small CNN, computed two ways.

For a network f(theta, x) with outputs of size O, the empirical NTK between inputs
x1 and x2 is the O x O matrix

    NTK(x1, x2) = J(x1) J(x2)^T,    J(x) = d f(theta, x) / d theta,

(Jacot et al., 2018; Novak et al., 2022), as in PyTorch's "Neural Tangent Kernels"
tutorial:

1. **Jacobian contraction**: the Jacobians of every example with
   ``vmap(jacrev(f), (None, 0))``, then an einsum over the parameter dims.
2. **NTK-vector products**: never form J. For each basis vector v of the output space,
   ``J(x2) (J(x1)^T v)`` is a ``jvp`` of a ``vjp``; ``vmap`` runs it over the basis
   vectors and over every pair of examples.

Both are computed in the 'full' (N x M x O x O), 'trace' (N x M) and 'diagonal'
(N x M x O) forms, checked to agree with each other, and one entry is checked against
plain ``torch.autograd`` (a Jacobian row by row). Exits with status 1 if a check fails.

    python examples/ntk.py [--small]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

from pyfunctorch import functional_call, jacrev, jvp, vjp, vmap


class CNN(nn.Module):
    def __init__(self, channels=32, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, (3, 3))
        self.conv2 = nn.Conv2d(channels, channels, (3, 3))
        self.conv3 = nn.Conv2d(channels, channels, (3, 3))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x).relu()
        x = x.mean(dim=(-2, -1))  # global average pool
        return self.fc(x)


def ntk_jacobian_contraction(fnet_single, params, x1, x2, compute="full"):
    # the Jacobian of each example's output with respect to every parameter tensor
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]          # [N, O, P_k]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]          # [M, O, P_k]
    einsum_expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[compute]
    return torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)


def ntk_vector_products(fnet_single, params, x1, x2, compute="full"):
    def get_ntk(x1, x2):
        def func_x1(params):
            return fnet_single(params, x1)

        def func_x2(params):
            return fnet_single(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            # J(x1)^T vec (a vjp), then J(x2) (J(x1)^T vec) (a jvp)
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        # one slice per output dimension: the columns of NTK(x1, x2)
        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    # every pair (x1[i], x2[j]): vmap over x2, then over x1
    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
    if compute == "trace":
        return torch.einsum("NMKK->NM", result)
    if compute == "diagonal":
        return torch.einsum("NMKK->NMK", result)
    return result


def ntk_entry_autograd(net, x1, x2):
    """NTK(x1, x2) for two single examples with plain autograd: J row by row."""
    params = [p for p in net.parameters()]

    def jac(x):
        out = net(x.unsqueeze(0)).squeeze(0)
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(out[k], params, retain_graph=True)])
                for k in range(out.numel())]
        return torch.stack(rows)

    return jac(x1) @ jac(x2).T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Empirical NTK: Jacobian contraction vs NTK-vector products")
    ap.add_argument("--small", action="store_true", help="a smaller network and fewer inputs (what CI runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    channels, n1, n2, size = (8, 3, 2, 12) if args.small else (32, 10, 8, 32)

    net = CNN(channels)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    x_train = torch.randn(n1, 3, size, size)
    x_test = torch.randn(n2, 3, size, size)
    print(f"empirical NTK of a CNN with {sum(p.numel() for p in params.values())} parameters, "
          f"{n1} x {n2} inputs of shape 3x{size}x{size}, 10 outputs")

    # warm-up (first calls pay one-time set-up costs), so that the timings below compare the methods
    ntk_jacobian_contraction(fnet_single, params, x_train[:1], x_test[:1])
    ntk_vector_products(fnet_single, params, x_train[:1], x_test[:1])

    ok = True
    results = {}
    for compute in ("full", "trace", "diagonal"):
        t0 = time.perf_counter()
        a = ntk_jacobian_contraction(fnet_single, params, x_train, x_test, compute)
        t1 = time.perf_counter()
        b = ntk_vector_products(fnet_single, params, x_train, x_test, compute)
        t2 = time.perf_counter()
        results[compute] = a
        diff = (a - b).abs().max().item()
        close = a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        ok &= close
        print(f"check: {compute:8s} NTK {str(tuple(a.shape)):16s} Jacobian contraction == NTK-vector products: "
              f"{close} (max |diff| {diff:.1e}; {1e3 * (t1 - t0):.0f} ms vs {1e3 * (t2 - t1):.0f} ms)")

    consistent = torch.allclose(results["trace"], torch.einsum("NMKK->NM", results["full"]), rtol=1e-5, atol=1e-5)
    print(f"check: trace == trace of the full NTK: {consistent}")
    ok &= consistent

    ref = ntk_entry_autograd(net, x_train[0], x_test[0])
    close = torch.allclose(results["full"][0, 0], ref, rtol=1e-4, atol=1e-4)
    print(f"check: NTK(x1[0], x2[0]) == plain autograd (J row by row): {close} "
          f"(max |diff| {(results['full'][0, 0] - ref).abs().max().item():.1e})")
    ok &= close

    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
