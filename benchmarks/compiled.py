"""pyfunctorch.compile against eager pyfunctorch, torch.func (eager) and hand-batched code.

    python benchmarks/compiled.py                 # replayed FX graph (backend=None)
    python benchmarks/compiled.py --inductor      # also backend="inductor" (compiles for ~20-60 s)
    python benchmarks/compiled.py --only psg64,hvp --budget 5

Workloads (the definitions of benchmarks/run.py, reused):
  psg64 / psg256  per-sample grads, MLP 784-128-10, batch 64 / 256 (vmap(grad(loss)) via functional_call)
  jacrev          jacrev of a 3-layer tanh MLP 256->256->256->256
  hvp             64 Hessian-vector products, vmap(jvp(grad f)), 128 inputs
  pointwise       20 pointwise ops under vmap on [64, 8]

Same protocol as run.py (see _harness.py): one thread, results checked against the
reference before timing, paired rotated rounds, medians; ratios are medians of per-round
paired ratios. The first (tracing / compiling) call is not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402  (pins threads before torch is imported)
import run as R  # noqa: E402
import torch  # noqa: E402

import pyfunctorch as pf  # noqa: E402


class _Opts:
    check = False
    compile = False  # torch.compile(torch.func ...) is run.py --compile's business
    compile_timeout = 600
    inductor = False


_run_optional_impls = R.optional_impls


def _optional_impls(opts, tf_callable, pf_callable, args, jax_builder=None):
    """run.py's optional rows ('pyfunctorch compiled' = pf.compile(pf_callable)), plus
    'pyfunctorch compiled (inductor)' with --inductor."""
    out = _run_optional_impls(opts, tf_callable, pf_callable, args, None)
    if opts.inductor:
        name = "pyfunctorch compiled (inductor)"
        c = pf.compile(pf_callable, backend="inductor")
        t0 = time.perf_counter()
        try:
            c(*args)  # traces
            c(*args)  # the first replay compiles
            out.append(H.Impl(name, lambda: c(*args), note=f"traced + compiled in {time.perf_counter() - t0:.0f} s"))
        except Exception as e:  # pragma: no cover - environment dependent (no C++ compiler ...)
            out.append(H.Impl(name, None, status=f"ERROR: {type(e).__name__}: {H._first_line(e, 100)}"))
    return out


R.optional_impls = _optional_impls  # the workload builders look it up at call time


def _cases(names, inductor):
    opts = _Opts()
    opts.inductor = inductor
    builders = {
        "psg64": lambda: R.w1_mlp(64, opts),
        "psg256": lambda: R.w1_mlp(256, opts),
        "jacrev": lambda: R.w3_jac("jacrev", 256, 256, opts),
        "hvp": lambda: R.w4_hvp(128, 64, opts),
        "pointwise": lambda: R.w5_pointwise((64, 8), opts),
    }
    for n in names:
        yield n, builders[n]()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="psg64,psg256,jacrev,hvp,pointwise")
    ap.add_argument("--inductor", action="store_true", help="also time backend='inductor'")
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timing per workload")
    ap.add_argument("--with-loop", action="store_true", help="keep the per-example Python loop rows")
    a = ap.parse_args(argv)
    print(H.machine_info())
    cases = []
    for name, case in _cases(a.only.split(","), a.inductor):
        if not a.with_loop:
            case.impls = [i for i in case.impls if i.name not in ("loop", "for-loop")]
        case.check()
        case.time(budget_s=a.budget)
        cases.append(case)
        print(H.cases_table([case]), flush=True)
        print()
        tm = case.timings
        comp = [n for n in tm if n.startswith("pyfunctorch compiled")]
        for n in comp:
            parts = [f"{n}: {H.fmt_time(tm[n].median_s)}"]
            for other in ("pyfunctorch", "torch.func", case.hand):
                r = H.paired_ratio(tm, n, other)
                if r is not None:
                    parts.append(f"{r:.2f}x {other}")
            print("   " + ", ".join(parts))
        print(flush=True)
    print("== summary (median per call; ratio = compiled / other, paired per round; < 1 means compiled is faster)")
    print(H.cases_table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
