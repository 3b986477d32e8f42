"""Paired A/B of per-sample gradients (W1) in the suite's own harness: pyfunctorch with the
physical per-sample graph (reverse._Shadow under vmap) against the same call with
``reverse.PER_SAMPLE_SHADOW = False`` (the grad level's wrappers differentiated: what a model
whose ops are not in batching/physical_ad.py takes), both as ratios to torch.func, same rounds.

    OMP_NUM_THREADS=1 python benchmarks/ab_per_sample.py transformer 32 [repeats]
    OMP_NUM_THREADS=1 python benchmarks/ab_per_sample.py mlp 64
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402
import run as R  # noqa: E402
from pyfunctorch import reverse  # noqa: E402

CASES = {"mlp": R.w1_mlp, "cnn": R.w1_cnn, "transformer": R.w1_transformer}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    which, B = argv[0], int(argv[1])
    repeats = int(argv[2]) if len(argv) > 2 else 2
    case = CASES[which](B, types.SimpleNamespace(check=True, compile=False))
    impls = {i.name: i for i in case.impls}
    on = impls["pyfunctorch"].fn

    def off():
        reverse.PER_SAMPLE_SHADOW = False
        try:
            return on()
        finally:
            reverse.PER_SAMPLE_SHADOW = True

    sel = [impls["pyfunctorch"], impls["torch.func"], H.Impl("pyfunctorch, wrappers' backward", off)]
    for _ in range(repeats):
        t = H.measure(sel, budget_s=8.0)
        print(f"{which} B={B}: x torch.func, physical graph {H.paired_ratio(t, 'pyfunctorch', 'torch.func'):.3f}, "
              f"wrappers' backward {H.paired_ratio(t, sel[2].name, 'torch.func'):.3f}")


if __name__ == "__main__":
    main()
