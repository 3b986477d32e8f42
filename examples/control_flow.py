"""Two limits of torch.func's vmap that pyfunctorch lifts: data-dependent control flow
and ragged (dynamic-shape) outputs.

functorch's "UX Limitations" page says that ``vmap`` cannot run a function whose
Python control flow depends on the values of a batched tensor (``if x.sum() > 0:``),
nor an op whose output shape depends on the data (``torch.nonzero``): torch.func.vmap
raises an error for both. pyfunctorch gives the answer of the for-loop that vmap
stands for:

1. ``if x.sum() > 0:`` under vmap: pyfunctorch notices the data-dependent branch,
   warns once (a ``PerformanceWarning`` naming the line), and runs the function once
   per example. ``vmap(f, strict=True)`` makes it an error instead.
2. The same function written with ``pyfunctorch.cond`` stays batched (no warning, no
   loop) and can be differentiated: ``vmap(grad(f))``. ``pyfunctorch.while_loop`` does
   the same for loops whose trip count differs per example.
3. ``vmap(torch.nonzero)`` on the page's own example ``xs = [[0, 1, 2], [0, 0, 3]]``
   returns a ``torch.nested`` tensor whose i-th part is ``torch.nonzero(xs[i])``.

Every result is checked against a Python loop over the examples. Exits with status 1
if a check fails.

    python examples/control_flow.py [--small]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings

import torch

from pyfunctorch import DataDependentError, PerformanceWarning, cond, grad, vmap, while_loop


def check(name, got, want):
    ok = got.shape == want.shape and torch.allclose(got, want)
    print(f"check: {name}: {ok}")
    return ok


def f_python(x):
    """Data-dependent Python control flow: the branch depends on the values of x."""
    if x.sum() > 0:
        return x.sin().sum()
    return x.cos().sum()


def f_cond(x):
    """The same with pyfunctorch.cond: stays batched under vmap."""
    return cond(x.sum() > 0, lambda x: x.sin().sum(), lambda x: x.cos().sum(), (x,))


def newton_sqrt(a, tol=1e-6):
    """sqrt(a) by Newton's method, iterating until converged: a different number of
    iterations for each a. Returns (root, iterations)."""

    def not_done(c):
        x, n = c
        return (x * x - a).abs() > tol * a

    def step(c):
        x, n = c
        return (x + a / x) / 2, n + 1

    return while_loop(not_done, step, (a.clone(), torch.zeros((), dtype=torch.long)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Data-dependent control flow and ragged outputs under vmap")
    ap.add_argument("--small", action="store_true", help="a smaller batch (what CI runs)")
    ap.add_argument("--batch", type=int, default=None, help="examples (default 1000; 8 with --small)")
    args = ap.parse_args(argv)
    B = args.batch or (8 if args.small else 1000)
    torch.manual_seed(0)
    x = torch.randn(B, 5)
    loop = torch.stack([f_python(xi) for xi in x])
    ok = True

    print(f"1. `if x.sum() > 0:` under vmap, a batch of {B}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = vmap(f_python)(x)
        t_python = time.perf_counter() - t0
    perf = [w for w in caught if issubclass(w.category, PerformanceWarning)]
    if perf:
        print("   pyfunctorch warned (once per line of code):")
        print(textwrap.indent(textwrap.fill(f"PerformanceWarning: {perf[0].message}", 92), "   | "))
    ok &= check("vmap(f) == [f(x_i) for x_i in x] (run once per example)", out, loop)
    warned = len(perf) >= 1
    print(f"check: vmap(f) warned with a PerformanceWarning: {warned}")
    ok &= warned
    try:
        vmap(f_python, strict=True)(x)
        strict_ok = False
    except DataDependentError as e:
        strict_ok = True
        print(f"   vmap(f, strict=True) raised DataDependentError: {str(e)[:100]}...")
    print(f"check: strict=True makes it an error: {strict_ok}")
    ok &= strict_ok

    print("2. the same written with pyfunctorch.cond: stays batched")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = vmap(f_cond)(x)
        t_cond = time.perf_counter() - t0
        g = vmap(grad(f_cond))(x)
    quiet = not any(issubclass(w.category, PerformanceWarning) for w in caught)
    ok &= check("vmap(f_cond) == loop", out, loop)
    print(f"   time for the batch of {B}: {1e3 * t_python:.1f} ms with the Python `if` (per example), "
          f"{1e3 * t_cond:.1f} ms with cond (batched)")
    print(f"check: no PerformanceWarning (no per-example loop): {quiet}")
    ok &= quiet
    g_loop = torch.stack([torch.where(xi.sum() > 0, xi.cos(), -xi.sin()) for xi in x])
    ok &= check("vmap(grad(f_cond)) == the per-example derivative", g, g_loop)

    a = torch.rand(B) * 100 + 0.01
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roots, iters = vmap(newton_sqrt)(a)
    quiet = not any(issubclass(w.category, PerformanceWarning) for w in caught)
    loop_iters = torch.stack([newton_sqrt(ai)[1] for ai in a])
    print(f"   while_loop: Newton's sqrt took {iters.min().item()} to {iters.max().item()} iterations "
          f"depending on the example")
    ok &= check("vmap(while_loop sqrt) == torch.sqrt", roots, a.sqrt())
    ok &= check("per-example iteration counts == loop", iters, loop_iters)
    print(f"check: while_loop under vmap stayed batched (no PerformanceWarning): {quiet}")
    ok &= quiet

    print("3. ragged output: vmap(torch.nonzero) on the limitations page's example")
    xs = torch.tensor([[0, 1, 2], [0, 0, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)
        out = vmap(torch.nonzero)(xs)
    parts = list(out.unbind())
    print(f"   vmap(torch.nonzero)(xs): a nested tensor: {out.is_nested}, parts of shapes "
          f"{[tuple(p.shape) for p in parts]}")
    print(f"   parts: {[p.tolist() for p in parts]}")
    ok &= out.is_nested
    for i, p in enumerate(parts):
        ok &= check(f"part {i} == torch.nonzero(xs[{i}])", p, torch.nonzero(xs[i]))

    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
