"""vmap over PyTorch's OpInfo database (the harness is scripts/coverage.py).

* ``test_vmap_opinfo_slice`` (CI): a fixed slice of ops known to pass, each on 2 of its
  sample inputs and 2 in_dims (every tensor batched at the last dim; only the first tensor
  batched); every case must pass, none may be skipped away.
* ``test_vmap_opinfo_slice_pass_rate`` (CI): the same slice with the other in_dims (every
  tensor at dim 0; all but the first) plus one nested ``vmap(vmap(op))`` per op, checked
  as a whole: 100% of the cases pass and enough of them ran.
* ``test_vmap_opinfo_full`` (slow): every float32 OpInfo with the full sweep's settings;
  the ops listed in docs/coverage_failures.txt are expected to fail (strictly: one that
  passes must be removed from the list, so the list only shrinks).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("pyfunctorch_opdb_coverage", ROOT / "scripts" / "coverage.py")
cov = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cov
_spec.loader.exec_module(cov)

OPS = {cov.op_key(o): o for o in cov.load_ops()}
KNOWN_FAILURES = cov.read_failures()

#: ops that pass every case of the full sweep (see docs/coverage.md), one or more per family
SLICE = [
    # pointwise (explicit rules and the pointwise tag)
    "abs", "add", "mul", "div.no_rounding_mode", "where", "clamp", "sigmoid", "exp", "pow", "lerp",
    "addcmul",
    # reductions
    "var", "argmax", "linalg.vector_norm",
    # views and shape ops
    "view", "reshape", "permute", "narrow", "cat", "stack", "expand", "squeeze", "unsqueeze",
    "flatten", "select", "movedim",
    # matmul
    "mm", "bmm", "matmul", "addmm", "nn.functional.linear", "einsum",
    # conv / pooling
    "nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
    # indexing
    "index_select", "gather", "take_along_dim", "__getitem__", "scatter", "index_put",
    # normalization, embedding, losses
    "nn.functional.layer_norm", "nn.functional.batch_norm", "nn.functional.embedding",
    "nn.functional.cross_entropy", "nn.functional.mse_loss", "nn.functional.nll_loss",
]  # fmt: skip
SLICE_SAMPLES = 2
SLICE_KINDS = ("all-1", "first")
RATE_KINDS = ("all0", "rest")


def _describe(cases):
    return "\n".join(
        f"  sample {c['sample']} in_dims={c['in_dims']}: {c['status']} {c.get('etype', '')}: "
        f"{c.get('err', c.get('reason', ''))}"
        for c in cases
    )


def test_slice_is_known_passing():
    """The slice only holds ops that the full sweep records as passing."""
    missing = [n for n in SLICE if n not in OPS]
    assert not missing, f"not float32 CPU OpInfos: {missing}"
    listed = [n for n in SLICE if n in KNOWN_FAILURES]
    assert not listed, f"slice ops listed in docs/coverage_failures.txt: {listed}"
    skipped = [n for n in SLICE if cov.static_skip_reason(n, OPS[n].name)]
    assert not skipped, f"slice ops the harness skips: {skipped}"
    assert len(SLICE) >= 40


@pytest.mark.parametrize("name", SLICE)
def test_vmap_opinfo_slice(name):
    r = cov.run_op(OPS[name], max_samples=SLICE_SAMPLES, kinds=SLICE_KINDS, nested=False)
    assert r["skip"] is None, r["skip"]
    ran = [c for c in r["cases"] if c["status"] != "skip"]
    assert ran, f"{name}: every case was skipped:\n{_describe(r['cases'])}"
    bad = [c for c in ran if c["status"] != "pass"]
    assert not bad, f"{name}: vmap disagrees with the per-example loop:\n{_describe(bad)}"


def test_vmap_opinfo_slice_pass_rate():
    cases = {}
    for name in SLICE:
        r = cov.run_op(OPS[name], max_samples=SLICE_SAMPLES, kinds=RATE_KINDS, nested=True)
        cases[name] = r["cases"]
    ran = {n: [c for c in cs if c["status"] != "skip"] for n, cs in cases.items()}
    n_run = sum(len(v) for v in ran.values())
    bad = {n: [c for c in v if c["status"] != "pass"] for n, v in ran.items()}
    bad = {n: v for n, v in bad.items() if v}
    n_pass = n_run - sum(len(v) for v in bad.values())
    msg = "\n".join(f"{n}:\n{_describe(v)}" for n, v in bad.items())
    assert n_pass == n_run, f"slice pass rate {n_pass}/{n_run} ({100 * n_pass / max(n_run, 1):.1f}%), not 100%:\n{msg}"
    # the slice must not be hollowed out by skips: every op ran, and ran its nested case
    empty = [n for n, v in ran.items() if not v]
    assert not empty, f"ops with no case run: {empty}"
    no_nested = [n for n, v in ran.items() if not any(c["in_dims"] == "nested" for c in v)]
    assert not no_nested, f"ops whose nested vmap(vmap(op)) case did not run: {no_nested}"
    assert n_run >= 2 * len(SLICE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPS))
def test_vmap_opinfo_full(name):
    r = cov.run_op(OPS[name])
    s = cov.op_summary(r)
    if s["verdict"] == "skipped":
        pytest.skip(s["reason"])
    known = KNOWN_FAILURES.get(name)
    if known is not None:
        if s["verdict"] == "pass":
            pytest.fail(f"{name} passes now: remove it from docs/coverage_failures.txt (python scripts/coverage.py)")
        pytest.xfail(known)
    bad = [c for c in r["cases"] if c["status"] in cov.FAILING]
    assert not bad, f"{name} (not in docs/coverage_failures.txt) fails:\n{_describe(bad)}"


# -- other dtypes (complex and integer rules) ------------------------------------------------------

DTYPE_SLICE = {
    "complex64": ["mul", "abs", "sum", "mm", "addmm", "linalg.pinv", "linalg.vector_norm", "fft.fft",
                  "view_as_real", "masked.normalize", "linalg.svd"],
    "int64": ["add", "sum", "cumsum", "index_select", "addmv", "addbmm", "baddbmm", "equal", "gather",
              "bitwise_and", "remainder"],
}  # fmt: skip


@pytest.mark.parametrize("dtype,name", [(d, n) for d, ns in DTYPE_SLICE.items() for n in ns],
                         ids=[f"{d}-{n}" for d, ns in DTYPE_SLICE.items() for n in ns])
def test_vmap_opinfo_dtype_slice(dtype, name):
    dt = cov._dtype(dtype)
    ops = {cov.op_key(o): o for o in cov.load_ops([name], dt)}
    r = cov.run_op(ops[name], max_samples=SLICE_SAMPLES, kinds=("all0", "all-1", "first"), nested=True, dtype=dt)
    ran = [c for c in r["cases"] if c["status"] != "skip"]
    assert ran, f"{dtype} {name}: every case was skipped:\n{_describe(r['cases'])}"
    bad = [c for c in ran if c["status"] != "pass"]
    assert not bad, f"{dtype} {name}: vmap disagrees with the per-example loop:\n{_describe(bad)}"


# -- AD: vjp, vmap(vjp_fn), jvp, vmap(jvp), vmap(vjp), vmap(grad) against torch.autograd / forward AD --

AD_SLICE = [
    "sin", "mul", "mm", "addmm", "sum", "cumsum", "linalg.svd", "linalg.pinv", "nn.functional.conv2d",
    "nn.functional.layer_norm", "nn.functional.cross_entropy", "index_put", "gather", "fft.fft",
    "nn.functional.linear_cross_entropy.chunked_none",
]  # fmt: skip


#: (op, kind) -> why: AD cases known to fail, each an error raised (none is a wrong number). The
#: full sweep below checks they still fail, so the list shrinks as they are fixed.
AD_KNOWN_FAILURES = {
    ("nn.functional.linear_cross_entropy.chunked", "vjp(vmap)"): "refused: chunked ops differentiated around vmap",
    ("nn.functional.linear_cross_entropy.chunked", "vjp(vmap) shared"): "as above",
    ("nn.functional.linear_cross_entropy.chunked_none", "vjp(vmap)"): "as above",
    ("nn.functional.linear_cross_entropy.chunked_none", "vjp(vmap) shared"): "as above",
}


def _unexpected(name, cases):
    return [c for c in cases if (name, c["in_dims"]) not in AD_KNOWN_FAILURES]


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("name", AD_SLICE)
def test_ad_opinfo_slice(name, dtype):
    dt = cov._dtype(dtype)
    ops = {cov.op_key(o): o for o in cov.load_ops([name], torch.float32)}
    r = cov.run_op_ad(ops[name], max_samples=2, dtype=dt)
    if r["skip"] is not None:
        assert dtype == "complex128", r["skip"]  # (some ops have no complex autograd)
        pytest.skip(r["skip"])
    ran = [c for c in r["cases"] if c["status"] != "skip"]
    if dtype == "float64":
        kinds = {c["in_dims"] for c in ran}
        assert {"vjp", "vmap(vjp_fn)", "vmap(vjp)"} <= kinds, kinds
        if name != "fft.fft":  # (per-sample gradients through vmap(grad): real outputs only)
            assert {"vmap(grad)", "vmap(grad) shared"} <= kinds, kinds
        assert "vjp(vmap)" in kinds, kinds  # (differentiated around vmap: the rules' own arithmetic)
        if ops[name].supports_forward_ad:
            assert "jvp(vmap)" in kinds, kinds
            if getattr(ops[name], "supports_fwgrad_bwgrad", False) and name != "fft.fft":
                assert "hvp(vmap)" in kinds, kinds  # (second order around vmap, forward over reverse)
    bad = _unexpected(name, [c for c in ran if c["status"] != "pass"])
    assert not bad, f"{name} {dtype}: AD disagrees with torch.autograd / forward AD:\n{_describe(bad)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPS))
def test_ad_opinfo_full(name):
    """Every op's vjp, vmap(vjp_fn), jvp, vmap(jvp), vmap(vjp), vmap(grad), vjp(vmap), jvp(vmap) and
    hvp(vmap) agree (float64), but for AD_KNOWN_FAILURES (which must still fail)."""
    r = cov.run_op_ad(OPS[name])
    if r["skip"] is not None:
        pytest.skip(r["skip"])
    failing = [c for c in r["cases"] if c["status"] in cov.FAILING]
    bad = _unexpected(name, failing)
    assert not bad, f"{name}:\n{_describe(bad)}"
    known = {k for (n, k) in AD_KNOWN_FAILURES if n == name}
    assert known <= {c["in_dims"] for c in failing}, f"{name}: fixed? remove from AD_KNOWN_FAILURES: {known}"
