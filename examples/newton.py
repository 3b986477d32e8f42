"""Jacobians and Hessians for Newton's method.

Three small problems, in float64:

1. **A nonlinear system** F(x) = 0: the equilibrium of a two-loop electrical circuit
   with diodes (Shockley's exponential law), solved by Newton's method
   ``x <- x - J(x)^-1 F(x)`` with the Jacobian from ``jacfwd`` and, separately, from
   ``jacrev``. Both give the same iterates; the residual falls quadratically.
2. **Many starting points at once**: the same Newton iteration, written for one
   point, run for a whole batch of starting points with ``vmap`` (so ``jacfwd`` runs
   inside ``vmap``).
3. **Minimizing the Rosenbrock function** in n dimensions by Newton's method with
   ``hessian`` and ``grad`` (damped, Levenberg-Marquardt style), from x = 0 to the
   minimum at (1, ..., 1).

Each Jacobian/Hessian is checked once against ``torch.autograd.functional``. The
script exits with status 1 if a check fails or a solve does not converge.

    python examples/newton.py [--small]
"""

from __future__ import annotations

import argparse
import sys

import torch

from pyfunctorch import grad, hessian, jacfwd, jacrev, vmap

torch.set_default_dtype(torch.float64)

# -- 1. a diode circuit ------------------------------------------------------------------
# Two loops: a source V1 drives current through R1 into node 1; a diode D1 from node 1
# to ground; R2 from node 1 to node 2; diode D2 from node 2 to ground; R3 from node 2 to a
# source V2. Kirchhoff's current law at nodes 1 and 2 gives F(v) = 0 for v = (v1, v2).
IS, VT = 1e-12, 0.025865        # diode saturation current (A) and thermal voltage (V)
R1, R2, R3 = 1e3, 2.2e3, 4.7e3  # ohms
V1, V2 = 5.0, -3.0               # volts


def diode(v):
    return IS * torch.expm1(v / VT)


def kcl(v):
    """Kirchhoff's current law residuals (in mA) at the two nodes."""
    v1, v2 = v[0], v[1]
    i1 = (V1 - v1) / R1 - diode(v1) - (v1 - v2) / R2
    i2 = (v1 - v2) / R2 - diode(v2) - (v2 - V2) / R3
    return 1e3 * torch.stack([i1, i2])


def newton_system(F, jac, x, iters):
    """Plain Newton iteration for F(x) = 0; returns the iterates' residual norms."""
    history = []
    for _ in range(iters):
        fx = F(x)
        history.append(fx.norm().item())
        # damped: a diode's exponential makes the full step overshoot far from the root
        step = torch.linalg.solve(jac(F)(x), fx)
        x = x - step.clamp(-0.1, 0.1)
    history.append(F(x).norm().item())
    return x, history


def newton_one_point(x, iters: int):
    """The same iteration for one point, with no Python branching on tensor values,
    so that it can run under vmap for a batch of starting points."""
    for _ in range(iters):
        step = torch.linalg.solve(jacfwd(kcl)(x), kcl(x))
        x = x - step.clamp(-0.1, 0.1)
    return x


# -- 3. Rosenbrock ---------------------------------------------------------------------


def rosenbrock(x):
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def newton_minimize(f, x, iters, tol=1e-10):
    """Newton's method with the exact Hessian, damped Levenberg-Marquardt style: solve
    (H + lam I) step = grad, accept the step if f decreases (then trust the quadratic model
    more: lam / 10), else retry with lam * 10."""
    history, lam = [], 1e-3
    eye = torch.eye(x.numel())
    for _ in range(iters):
        g, H = grad(f)(x), hessian(f)(x)
        fx = f(x)
        history.append((fx.item(), g.norm().item()))
        if g.norm() < tol:
            break
        while True:
            step = torch.linalg.solve(H + lam * eye, g)
            if f(x - step) < fx:
                x, lam = x - step, max(lam / 10, 1e-12)
                break
            lam *= 10
    return x, history


def check(name, got, want, rtol=1e-7, atol=1e-10):
    ok = torch.allclose(got, want, rtol=rtol, atol=atol)
    print(f"check: {name}: {ok} (max |diff| {(got - want).abs().max().item():.1e})")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Newton's method with jacfwd/jacrev/hessian")
    ap.add_argument("--small", action="store_true", help="smaller problems (what CI runs)")
    ap.add_argument("--dim", type=int, default=None, help="Rosenbrock dimension (default 10; 4 with --small)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = args.dim or (4 if args.small else 10)
    ok = True

    print("1. Newton's method on a diode circuit's Kirchhoff equations F(v) = 0")
    v0 = torch.tensor([0.0, 0.0])
    ok &= check("jacfwd(F)(v0) == torch.autograd.functional.jacobian", jacfwd(kcl)(v0),
                torch.autograd.functional.jacobian(kcl, v0))
    ok &= check("jacrev(F)(v0) == jacfwd(F)(v0)", jacrev(kcl)(v0), jacfwd(kcl)(v0))
    v_fwd, hist_fwd = newton_system(kcl, jacfwd, v0, 25)
    v_rev, hist_rev = newton_system(kcl, jacrev, v0, 25)
    print("   iteration  |F| with jacfwd   |F| with jacrev")
    for i, (a, b) in enumerate(zip(hist_fwd, hist_rev)):
        if i % 4 == 0 or (hist_fwd[i - 1] < 1e-1 and hist_fwd[i - 1] > 1e-13):
            print(f"   {i:9d}  {a:14.3e}  {b:15.3e}")
        if a < 1e-13:
            break
    print(f"   solution: node voltages v1 = {v_fwd[0]:.6f} V, v2 = {v_fwd[1]:.6f} V")
    ok &= check("jacfwd and jacrev Newton iterates agree", v_fwd, v_rev)
    conv = hist_fwd[-1] < 1e-9
    print(f"check: converged (|F| < 1e-9 mA): {conv}")
    ok &= conv

    print("2. the same Newton iteration from many starting points at once: vmap(newton)")
    starts = torch.rand(16 if not args.small else 4, 2) * 2 - 1
    sols = vmap(lambda x: newton_one_point(x, 25))(starts)
    residuals = vmap(kcl)(sols).norm(dim=1)
    print(f"   {len(starts)} starts in [-1, 1]^2 -> max |F| {residuals.max():.1e}; "
          f"all reach v = ({sols[:, 0].mean():.6f}, {sols[:, 1].mean():.6f})")
    ok &= check("vmap(newton)(starts) == newton for each start", sols,
                torch.stack([newton_one_point(s, 25) for s in starts]))

    print(f"3. minimizing the {n}-dimensional Rosenbrock function with grad and hessian")
    x0 = torch.zeros(n)
    ok &= check("hessian(f)(x0) == torch.autograd.functional.hessian", hessian(rosenbrock)(x0),
                torch.autograd.functional.hessian(rosenbrock, x0))
    ok &= check("hessian == jacrev(jacrev(f)) == jacfwd(jacfwd(f))",
                torch.cat([jacrev(jacrev(rosenbrock))(x0), jacfwd(jacfwd(rosenbrock))(x0)]),
                torch.cat([hessian(rosenbrock)(x0)] * 2))
    x, hist = newton_minimize(rosenbrock, x0, 100)
    print("   iteration  f(x)          |grad f(x)|")
    for i, (fx, gn) in enumerate(hist):
        if i < 3 or i >= len(hist) - 6 or i % 5 == 0:
            print(f"   {i:9d}  {fx:12.4e}  {gn:12.4e}")
    print(f"   minimum found after {len(hist) - 1} Newton steps: x = {[round(v, 6) for v in x.tolist()]}")
    ok &= check("x* == (1, ..., 1)", x, torch.ones(n), atol=1e-8)

    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
