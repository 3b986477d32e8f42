"""Where pyfunctorch's eager time goes: µs per op at nesting depth 1, 2, 3, split by cost.

    OMP_NUM_THREADS=1 python benchmarks/breakdown.py            # print the tables
    OMP_NUM_THREADS=1 python benchmarks/breakdown.py --write    # also replace the breakdown
                                                                # section of docs/benchmarks.md

Workloads (the 20-op pointwise chain of overhead.py, one thread):

  depth 1  vmap(chain)                   x [64, 8]
  depth 2  vmap(grad(chain(x).sum()))    x [64, 8]
  depth 3  jacfwd(jacrev(chain(x).sum())) x [8]   (Hessian: vmap, jvp, grad, vmap levels)

Method. (1) The per-call time of pyfunctorch, torch.func and plain torch is measured in paired
rotated rounds (``_harness.measure``), without a profiler. (2) Profiled runs (cProfile; the median share per
category over several short profiles) give each function's own time; every function is put in one category (below), and a C function
(an aten op, ``_make_wrapper_subclass``, the autograd engine) is charged to the category of the
Python function that called it (``pstats`` keeps the time per caller). (3) The fixed cost per call is the directly
measured call of the same transform of an (almost) empty function (4); the other categories
share the rest of the unprofiled per-call time in their profiled proportions. cProfile's hooks cost
~0.1-0.3 µs per Python call, so Python-heavy categories are somewhat over-weighted; the
shares are a map, the paired ratios are the measurement. (4) The fixed cost per call is also
measured directly: the same transform of a function with (almost) no ops, and the patch
install + removal on its own.

Categories:
  fixed per call   transform entry/exit: interpreter push/pop, installing and removing the
                   patched entry points, pytrees, in/out dims, wrapping inputs, the basis (jac*)
  dispatch entry   torch's C++ -> __torch_dispatch__ (incl. torch's per-subclass rule lookup
                   `find_torch_dispatch_rule` and OpOverload.__call__), finding the top level,
                   the key guard (`_dispatch_tls_local_include_set`, `_ForceDispatchKeyGuard`)
  interpreter      per-op decisions in `process`/`dispatch` (op info, mutation checks, aliases)
  unwrap           reading inner values (`unwrap_level`, `_unwrap_args*`, peel)
  lift (fwd-AD)    `lift_mixed`, `_is_dual`, JvpTensor.__torch_function__
  rule             batching rules (Python) in batching/
  wrap             making wrapper tensors (`BatchedTensor`/`GradTensor`/`JvpTensor`,
                   `_make_wrapper_subclass`, metadata reads)
  autograd / AD    torch.autograd.grad and the C++ engine's own time, forward-AD make/unpack dual
  torch Python meta  torch's Python meta kernels (_refs/_prims, symbolic-shape checks) that
                   forward AD reaches when one operand has no tangent: the C++ formula uses an
                   efficient zero tensor, whose add/mul compute output metadata on meta tensors
                   with torch's *Python* meta registrations (~100-300 µs each; torch.func pays
                   it too, where its levels meet the same pattern)
  aten ops (C++)   the C++ side of the aten ops pyfunctorch calls (the kernels at the bottom, the
                   C++ dispatcher and autograd recording above them)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402  (pins threads before torch is imported)
import torch  # noqa: E402
import torch.func as tf  # noqa: E402

import pyfunctorch as pf  # noqa: E402
from overhead import CHAIN_OPS, chain, chain_sum  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "benchmarks.md")
START, END = "<!-- breakdown:start -->", "<!-- breakdown:end -->"

CATS = ["fixed per call", "dispatch entry", "interpreter", "unwrap", "lift (fwd-AD)", "rule", "wrap",
        "autograd / AD", "torch Python meta (fwd-AD zero tangents)", "aten ops (C++)", "other"]
META = "torch Python meta (fwd-AD zero tangents)"

_FIXED_FILES = ("api.py", "jacobians.py", "_pytree.py", "contextlib.py", "functools.py", "threading.py",
                "forward_ad.py", "patches.py")
_FIXED_FUNCS = {"_install_patches", "_uninstall_patches", "push_interpreter", "lowered", "_grad_and_value_impl",
                "wrapper", "vjp", "jvp", "vjp_fn", "_check_argnums", "_check_diff_inputs", "_split_aux",
                "_check_primals_tangents", "_jvp_level", "__enter__", "__exit__", "_leave", "_new_level",
                "_autograd_grad", "_needs_graph", "_requires_grad_below", "vmapped", "grad", "grad_and_value",
                "_vmap_impl", "_rebuild_args", "_leaf_in_dims", "_batch_size", "_unwrap_out", "_leaf_out_dims",
                "_partial_over", "_basis", "_assemble", "_flatten_each", "push", "f", "interpreter_stack"}
_DISPATCH_FUNCS = {"__torch_dispatch__", "_find_top", "dispatch", "_metadata_query", "_op_info",
                   "find_torch_dispatch_rule", "find", "_dispatch_with_dead", "_dead_level_of"}
_INTERP_FUNCS = {"process", "check_mutation", "_writes_derivative", "_mutated_returns", "_return_aliases",
                 "_process_lazy", "has_lazy", "carries_derivative", "batched_here"}
_UNWRAP_FUNCS = {"unwrap_level", "_unwrap_args", "_unwrap_args_checked", "peel", "_resolve_dead", "unwrap_value",
                 "_escaped"}
_LIFT_FUNCS = {"lift_mixed", "_is_dual", "lift", "__torch_function__"}
_WRAP_FUNCS = {"__new__", "_same_shape", "wrap_level", "_wrap", "__init__", "rewrap", "lazy_wrap", "wrap_created"}


def classify(key) -> str:
    """The category of a profiled Python function (C functions: see charge())."""
    path, _line, name = key
    base = os.path.basename(path)
    if path == "~":
        return "C"
    if "/torch/autograd/" in path:
        return "autograd / AD"
    if "/torch/_refs/" in path or "/torch/_prims" in path or "/torch/_decomp" in path or "/_library/" in path \
            and "simple_registry" not in path or "/torch/_dynamo/" in path or "/torch/fx/" in path \
            or "/torch/_compile" in path or "/torch/_meta_registrations" in path or "/torch/_config_module" in path \
            or "/torch/utils/_inspect" in path or base in ("inspect.py", "abc.py") or path.endswith("torch/__init__.py") \
            or (base == "_ops.py" and name == "redispatch"):
        # torch's Python meta kernels, reached when forward AD meets an undefined tangent
        # (an efficient zero tensor computes its result's metadata on meta tensors in Python)
        return META
    if base in ("simple_registry.py",) or (base == "_ops.py" and name == "__call__"):
        return "dispatch entry"
    if "/pyfunctorch/batching/" in path:
        return "rule"
    if "/pyfunctorch/" in path:
        if name in _LIFT_FUNCS:
            return "lift (fwd-AD)"
        if name in _DISPATCH_FUNCS:
            return "dispatch entry"
        if name in _UNWRAP_FUNCS:
            return "unwrap"
        if name in _WRAP_FUNCS:
            return "wrap"
        if name in _INTERP_FUNCS or name == "<genexpr>" and base == "_core.py":
            return "interpreter"
        if base in _FIXED_FILES or name in _FIXED_FUNCS:
            return "fixed per call"
        return "interpreter"
    if base in _FIXED_FILES or "/torch/utils/_pytree" in path:
        return "fixed per call"
    return "other"  # the workload's own Python (chain) and anything unmatched


def charge(name: str, caller_cat: str, caller=None) -> str:
    """The category of a C function's own time, given its caller's category."""
    if caller is not None and os.path.basename(caller[0]) == "_ops.py" and caller[2] == "__call__":
        return "aten ops (C++)"  # OpOverload.__call__ -> the C++ op (kernel, or the next level's entry)
    if caller_cat == META:
        return META
    if "make_wrapper_subclass" in name or "'stride'" in name or "storage_offset" in name or "_set_conj" in name:
        return "wrap"
    if "run_backward" in name or "make_dual" in name or "unpack_dual" in name or "dual_level" in name:
        return "autograd / AD"
    if "_dispatch_tls_local" in name or "ForceDispatchKeyGuard" in name:
        return "dispatch entry"
    if caller_cat == "other":
        # the user's own call on a wrapper (x.sin() in chain): torch's C++ up to __torch_dispatch__
        return "dispatch entry"
    if caller_cat in ("rule", "interpreter") and ("torch._ops" in name or "of 'torch._C" in name
                                                                    or "built-in method" in name and "torch" in name):
        return "aten ops (C++)"
    if caller_cat in ("fixed per call",):
        return "fixed per call"
    return caller_cat if caller_cat != "C" else "other"


def attribute(stats: pstats.Stats) -> dict:
    cats = dict.fromkeys(CATS, 0.0)
    for key, (_cc, _nc, tt, _ct, callers) in stats.stats.items():
        cat = classify(key)
        if cat != "C":
            cats[cat] += tt
            continue
        name = key[2]
        for ckey, cval in callers.items():
            ccat = classify(ckey)
            cats[charge(name, ccat, ckey)] += cval[2]
    return cats


def workloads():
    x2 = torch.randn(64, 8)
    x3 = torch.randn(8)

    def floor_grad(x):
        xr = x.detach().requires_grad_(True)
        return torch.autograd.grad(chain_sum(xr), xr)[0]

    def idsum(x):
        return x.sum()

    return [
        ("depth 1: vmap", x2, pf.vmap(chain), tf.vmap(chain), lambda: chain(x2), pf.vmap(lambda x: x)),
        ("depth 2: vmap∘grad", x2, pf.vmap(pf.grad(chain_sum)), tf.vmap(tf.grad(chain_sum)),
         lambda: floor_grad(x2), pf.vmap(pf.grad(idsum))),
        ("depth 3: jacfwd∘jacrev", x3, pf.jacfwd(pf.jacrev(chain_sum)), tf.jacfwd(tf.jacrev(chain_sum)), None,
         pf.jacfwd(pf.jacrev(idsum))),
    ]


def patch_cost_us(n=300) -> float:
    from pyfunctorch import _core

    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            _core._install_patches()
            _core._uninstall_patches()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(samples)[len(samples) // 2]


def measure_row(label, x, pf_fn, tf_fn, plain, empty, quick):
    impls = [H.Impl("pyfunctorch", lambda: pf_fn(x)), H.Impl("torch.func", lambda: tf_fn(x)),
             H.Impl("pyfunctorch, empty fn", lambda: empty(x))]
    if plain is not None:
        impls.append(H.Impl("plain", plain))
    kw = dict(target_s=0.01, min_rounds=5, max_rounds=9, budget_s=2.0) if quick else \
        dict(target_s=0.03, min_rounds=9, max_rounds=21, budget_s=6.0)
    t = H.measure(impls, **kw)
    pf_fn(x)
    # Several short profiles, the median share per category: on a shared machine a profile
    # charges a preemption to whatever function was running, which can put one function far
    # off in a single profile.
    shares = {c: [] for c in CATS}
    n = 10 if quick else 20
    for _ in range(5 if quick else 9):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            pf_fn(x)
        prof.disable()
        cats = attribute(pstats.Stats(prof))
        tot = sum(cats.values())
        for c in CATS:
            shares[c].append(cats[c] / tot)
    cats = {c: statistics.median(v) for c, v in shares.items()}
    total = sum(cats.values())
    per_call = t["pyfunctorch"].median_s * 1e6
    return {
        "label": label, "per_call_us": per_call, "tf_us": t["torch.func"].median_s * 1e6,
        "ratio_tf": H.paired_ratio(t, "pyfunctorch", "torch.func"),
        "ratio_plain": H.paired_ratio(t, "pyfunctorch", "plain") if plain is not None else None,
        "empty_us": t["pyfunctorch, empty fn"].median_s * 1e6,
        "shares": {c: v / total for c, v in cats.items()},
    }


def table(rows, patch_us) -> str:
    out = ["| category | " + " | ".join(r["label"] for r in rows) + " |",
           "|---|" + "---|" * len(rows)]
    for c in CATS:
        cells = []
        for r in rows:
            # the fixed cost is the directly measured call of an (almost) empty function; the
            # other categories share the rest in their profiled proportions
            fixed = min(r["empty_us"], r["per_call_us"])
            if c == "fixed per call":
                us = fixed
            else:
                rest = 1.0 - r["shares"]["fixed per call"]
                us = (r["per_call_us"] - fixed) * (r["shares"][c] / rest if rest > 0 else 0.0)
            cells.append(f"{us / CHAIN_OPS:.2f} µs/op ({100 * us / r['per_call_us']:.0f}%)")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out.append("| **total per call** | " + " | ".join(f"**{r['per_call_us']:.0f} µs** = {r['per_call_us'] / CHAIN_OPS:.1f} µs/op"
                                                  for r in rows) + " |")
    out.append("| torch.func per call (paired ratio) | " + " | ".join(
        f"{r['tf_us']:.0f} µs ({r['ratio_tf']:.2f}x)" for r in rows) + " |")
    out.append("| plain torch (paired ratio) | " + " | ".join(
        "-" if r["ratio_plain"] is None else f"{r['ratio_plain']:.2f}x" for r in rows) + " |")
    out.append("| same transform of an (almost) empty fn | " + " | ".join(f"{r['empty_us']:.0f} µs" for r in rows) + " |")
    out.append("")
    out.append(f"Installing + removing the patched entry points (`_core._install_patches` / `_uninstall_patches`, "
               f"paid once per outermost transform call): {patch_us:.1f} µs.")
    return "\n".join(out)


def markdown(rows, patch_us, info) -> str:
    from pyfunctorch import _patching

    n_patched = sum(1 for p in _patching._PATCHES if p[1] != "__code__")
    n_tensor = sum(1 for p in _patching._PATCHES if p[0] is torch.Tensor)
    return "\n".join([
        START,
        "## Cost breakdown (eager, per op)",
        "",
        f"Generated by `benchmarks/breakdown.py --write` ({info['date']}, torch {info['torch']}, one thread). "
        f"µs per op = the category's share of one call / {CHAIN_OPS} (the ops of the un-transformed chain), so the "
        "columns show how the cost of one user-level op grows with nesting depth. Shares come from cProfile "
        "(C functions charged to their Python caller), scaled to the unprofiled per-call time minus the fixed cost, "
        "which is measured directly (the same transform of an almost empty function); see the script's "
        "docstring for the categories and the caveats.",
        "",
        table(rows, patch_us),
        "",
        "Reading it (mechanisms, measured while making the eager path faster):",
        "",
        "- Every level an op passes through costs a Python `__torch_dispatch__` (dispatch entry + unwrap + "
        "interpreter + wrap, a few µs); torch.func pays the same steps in C++. So the eager cost grows with the "
        "number of levels each op crosses, and the cheapest speed-up is a level that is not there: `jacrev` of a "
        "function with one output element no longer vmaps `vjp_fn` over a one-row basis, which took "
        "`hessian` of a scalar function from ~2x to ~1.3x torch.func (W4) and depth 3 below from ~7.7x to ~3x.",
        "- `torch Python meta`: where forward AD meets an operand without a tangent (`x + b` with a constant `b`, "
        "`W @ x` with a constant `W`, the backward of `dot`), torch's C++ formula takes an efficient zero tensor "
        "for the missing tangent, and the ops on it compute their outputs' metadata by running torch's *Python* "
        "meta kernels (`_refs.add` -> `prims.add`, symbolic-shape checks) on meta copies of the operands: "
        "80-300 µs each, in plain torch too (`make_dual(x, t) * c` is ~80x slower than `x * c`). Under "
        "pyfunctorch the operands are our wrappers, so every `prims.*` op dispatches through the levels below. "
        "Forward AD no longer meets most of them: a constant in an additive op (`x + b`, `b - x`; "
        "`_core.zero_tangents_for_constants`) gets an explicit zero tangent, and a product with one dual operand "
        "and constants (`W @ x`, `x * c`, `dot`, `mm`/`mv`/`bmm`, `F.linear` with a constant bias; "
        "`_core.product_with_constants`) gets the op on the dual's tangent as its tangent, exactly the formula's "
        "nonzero term (jacfwd of the 3-layer MLP 1.25x -> 1.04x torch.func, Hessian 1.18x -> 0.93x, HVP "
        "2.0x -> 1.5x). What is left of the category: products that a vmap rule runs between the jvp level "
        "and the user's op (hessian's backward under jacrev's vmap), and jvp levels with a differentiation level "
        "below them (their tangents are wrappers).",
        "- Also measured and done: the activations' backward kernels ran on a copy of the unbatched operand "
        "expanded to the batch (for oneDNN's gelu_backward); they now run broadcast and copy only where a kernel "
        "refuses (jacrev's tanh_backward: ~100 µs per call); `jacrev` installs the patched entry points once for "
        "its vjp and its vmap (~70 µs); torch functions are off inside our own dispatch (JvpTensor's and "
        "BatchedTensor's `__torch_function__` are never re-entered there); the pointwise rule runs `x * y`, "
        "`x * 1.01` as they are when dtypes and ranks agree.",
        "- Depth 1 (one vmap, tiny tensors): a user's pointwise call on tensors batched in front at one level "
        "(`x * 1.01`, `torch.sin(x)`) runs on the physical values in `BatchedTensor.__torch_function__`, before "
        "torch's dispatcher: ~5-6 µs per op instead of ~11 (`benchmarks/dispatch_floor.py` puts a minimal "
        "`__torch_dispatch__` wrapper, no rules and no levels, at ~8.7 µs). W5 tiny went from ~3.2x to ~2.1x "
        "torch.func.",
        "- The fixed cost per outermost call is dominated by installing and removing the patched entry points "
        f"(`patches.py`, {n_patched} attributes, {n_tensor} of them on `torch.Tensor`): the writes themselves are "
        "cheap, the cost is their effect (type-attribute caches and specialized bytecode invalidated on every "
        "swap), ~30-40 µs per call. Measured by leaving groups out of the swap (W5 tiny, one process): the "
        "`torch.Tensor` group ~13-17 µs, of which ~9 µs come with its first attribute (any write to the class "
        "invalidates every tensor subclass's caches); each module namespace ~2-4 µs. "
        "`pyfunctorch.hold_entry_points()` keeps them installed for a block (a loop of transform calls; "
        "outside transforms the wrappers call torch's functions unchanged, and torch is restored after the "
        "block): W5 tiny ~2.1x -> ~1.75x torch.func (the suite's 'pyfunctorch, held' row). By default torch "
        "stays patched only while a transform is live (tests/test_regressions.py).",
        "- Large tensors (W5 large, W1/W2 at B=256) are kernel-bound and within ~10% of torch.func. W1 "
        "(per-sample gradients, `vmap(grad(f))`) records its graph on the vmap level's physical values and "
        "differentiates it in torch's C++ autograd (`reverse._Shadow._start_per_sample`, docs/architecture.md): "
        "the backward pass has no Python event (it had two per op, ~30 of the 54 events per call), and a weight "
        "expanded along the batch costs one product forward (`batching.linalg.matmul_batched`, "
        "`batching.convolution._SharedFilters`). Paired in the suite's harness against the wrappers' graph "
        "(`reverse.PER_SAMPLE_SHADOW = False`, same process): MLP B=8 1.85x -> 1.54x torch.func, B=256 "
        "1.13x -> 1.04x, CNN B=64 1.35x -> 1.23x (with 4 KB pages; see the last item for the "
        "process-to-process swings those figures had).",
        "- Per-sample gradients of a transformer (the W1 transformer row: embedding, encoder layer, head) "
        "take the physical graph since embedding, embedding_bag and CPU attention joined "
        "`batching/physical_ad.py` (`benchmarks/ab_per_sample.py transformer 32`: 1.5-1.6x -> 1.29-1.31x "
        "torch.func, paired). What is left is the forward: ~50 ops each dispatched at the grad level and at "
        "the vmap level (100 Python events per call), 34 of them views. Measured per event (tiny tensors): "
        "a view under vmap 9-11 µs against 4-5 µs for a pointwise op (which skips torch's dispatcher in "
        "`BatchedTensor.__torch_function__`); at a top-level grad level `mul` 9.5 µs, `tanh` 18 µs (its saved "
        "output costs a detach event and the shadow graph's cut), a view 11.7 µs; torch.func ~2 µs each. A "
        "view fast path like the pointwise one was not taken: a wrapper made outside the dispatcher is not "
        "registered as a view of its base (no shared version counter), so autograd at the vmap level could "
        "miss an in-place write to the base.",
        "- Depth 2 below (vmap∘grad of 20 pointwise ops on [64, 8]) is the same path: 3.84x -> ~2.5x "
        "torch.func.",
        "- Reverse mode with no transform around it (`grad`, `vjp`, `jacrev` called at top level; not in the "
        "table, whose depths 2 and 3 are nested): the level also records its graph on the plain inner values "
        "(the *shadow graph*, `reverse._Shadow`, docs/architecture.md) and differentiates that one, so the "
        "backward pass runs in torch's C++ engine: no Python event per backward op (jacrev's backward had two: "
        "the ended vjp level and the vmap level). Paired against the previous tree: jacrev 256x256 1.38x -> "
        "1.27x torch.func, jacrev 64->1024 1.09x -> 1.04x, top-level grad of the MLP 2.2-2.5x -> 1.9-2.0x. "
        "What is left is the forward pass on the wrappers (~10 events, ~150 µs for jacrev 256; torch.func's "
        "vjp forward costs ~60 µs). Under vmap (per-sample gradients) the graph is recorded one level further "
        "down, on the physical values (previous item); recording it on the batched wrappers themselves was "
        "measured slower (more detach events on the vmap level). Also: autograd's detach of a live grad/jvp "
        "wrapper (every saved output) is answered at the top of `__torch_dispatch__` (7.0 -> 4.5 µs), and the "
        "broadcasting rule runs `tanh_backward(g, y)` with an unbatched `y` of lower rank as it is "
        "(4.6 -> 2.4 µs).",
        "- Ensembles (W2, `vmap` over stacked parameters): `F.linear` (every `nn.Linear`) on tensors batched at "
        "the bottom level runs in `BatchedTensor.__torch_function__` (`batched.tensor._linear_call`): one "
        "`linear` over every example's rows for a shared layer, one `baddbmm` for per-example weights; through "
        "torch's dispatcher it was `t` and `addmm`, two Python events and the general addmm rule: ~40 -> ~17 µs "
        "per linear (torch.func ~15-20), W2 with 8-wide layers 317 -> 184-198 µs per call, W2 B=64 1.19x -> 1.01-1.04x "
        "and B=256 1.17x -> 1.00-1.02x torch.func. The argument flattening of every call (a params dict, "
        "`(dict, x, y)`) takes `_pytree`'s fast path with torch's spec cached per structure: vmap over a dict "
        "61 -> 53 µs, vmap(grad) of a 3-op function over a params dict 428 -> 402 µs.",
        "- Measured and not adopted: running the function of a grad/vjp level that nothing encloses on plain "
        "tensors (its inputs' aliases, plain autograd, no wrappers; a prototype): top-level grad 16.9 -> 6.2 µs "
        "per op (torch.func 9.6), fixed cost 131 -> 49 µs, jacrev 256 ~1.28x -> ~0.95x torch.func (its vjp "
        "forward is 223 µs on the wrappers, 24 µs plain, torch.func 64 µs; `vmap(vjp_fn)` is 893 µs against "
        "torch.func's 791). The wrappers' forward is where the level sees what the function does, and plain "
        "autograd gives other answers without it: a differentiated value written into a captured tensor (torch.func "
        "and pyfunctorch raise before writing; plain autograd writes and attaches the level's graph to the user's "
        "tensor), a custom Function reading a differentiated tensor through a closure (raised; plain autograd drops "
        "the derivative silently), `.data`/`new_tensor` cutting this level only where an outside tensor requires "
        "grad (plain cuts every graph), third derivatives of layer_norm and batch_norm through nested plain levels "
        "(torch's double-backward formulas read saved statistics). 12 tests failed on the prototype "
        "(tests/test_autograd_links.py, test_regressions.py, test_custom_function.py, test_forward_ad.py, "
        "test_shadow_graph.py). Keeping them would take a per-op check on plain tensors (a TorchFunctionMode costs "
        "~1.2 µs per op) with provenance for 'created inside the function'. The same holds for per-sample "
        "gradients without the grad level's wrappers (vmap(grad) 27.7 -> 11.4 µs per op emulated; torch.func "
        "11.7), where the inputs would also read `requires_grad=False` inside the function (checkpoint, "
        "fast-path gates in nn modules read it). Measured on the whole W1 rows with a prototype (no grad level at all "
        "for `vmap(grad(f))`: the function runs on the vmap level's wrappers of the physical aliases, plain "
        "`autograd.grad` of the physical graph; none of the checks above; paired in the suite's harness in one "
        "process against the current path): MLP B=64 1.22x -> 1.07x torch.func, CNN B=64 1.21x -> 1.12x, "
        "transformer B=32 1.27x -> 1.10x, but MLP B=256 0.99x -> 1.08x (the 100 MB per-example result outlived "
        "the call in the prototype and was allocated fresh each time). So even without the grad level's "
        "wrappers no W1 row reaches 1.05x: what is left is the vmap level's own Python dispatch per op and the "
        "fixed cost per call (vmap(grad) of a one-op function over a 4-tensor params dict: 274 µs against "
        "torch.func's 186; keeping torch's patched entry points installed saves ~35 µs of it, of which ~20 come "
        "from the `torch.Tensor` attributes: their swap invalidates the attribute caches of every tensor "
        "class).",
        "- Also measured for W1 (MLP, per-example weight gradients are outer products, a (B, 128, 784) result): "
        "the product as a broadcast `mul` instead of `bmm` is ~0.2x torch.func faster at B <= 128 and ~0.15-0.2x "
        "slower at B=256 with 4 KB pages, and ~0.05-0.1x faster at both sizes with huge pages (paired); not adopted "
        "(which wins depends on the memory system). With 4 KB pages W1's ratio at one B moved by up to 0.3x from "
        "one process to another (the physical pages of the 25-100 MB results differ per process); the suite now "
        "puts torch's large allocations on huge pages (benchmarks/_harness.py), which holds W1 MLP B=64 at "
        "1.34-1.38x in four processes. The small-model figures (8-wide layers, where kernels cost nothing) isolate the overhead: "
        "per-sample gradients of one 8-wide linear layer and cross entropy 822 µs against torch.func's 472, each further linear+ReLU layer "
        "252 µs against 113.",
        "- Where W1's gap sits, by phase (py-spy at 1 kHz over 15 s of calls, MLP B=2, where the kernels cost "
        "little): the forward on the wrappers 58% of 1350 µs (~780 µs) against torch.func's 36% of 850 (~310 "
        "µs); the backward (the physical graph in torch's engine) ~290 µs against ~310; setup and results "
        "~270 against ~240. So the whole gap is the forward's per-op dispatch: a `linear` is ~160 µs (grad "
        "level ~18 µs, torch's dispatcher into the vmap level ~14 µs, the vmap level and its addmm rule ~100 "
        "µs, of which the shared-weight product as an `autograd.Function` ~27 µs and the bias add ~19 µs) "
        "against torch.func's ~45 µs.",
        "- Measured and not adopted, both as paired ratios in the suite's harness: (1) the grad level calling "
        "the vmap level's dispatch directly for functional, non-view ops whose operands require no grad "
        "(skipping torch's dispatcher between the two levels): MLP B=64 1.20x -> 1.21-1.22x, transformer "
        "B=32 1.27-1.29x -> 1.25-1.26x torch.func -- the dispatcher's ~14 µs per event is mostly spent again "
        "in the Python that replaces it. (2) A compiled accelerator: 49 of the 53 modules compiled unchanged "
        "with Cython 3.3 (no type declarations; 4 modules refuse it or change behaviour compiled: "
        "`batching/losses.py` crashes the compiler, `_compat.py`, `custom_function/entry.py` check Python "
        "objects Cython replaces, and annotations must not be enforced): W1 MLP B=2 1298-1400 µs against "
        "1340-1458 pure Python (1.57-1.63x torch.func against 1.58-1.62x, alternating processes), 20 "
        "pointwise ops under vmap on [64, 8] 1.88-1.91x against 2.15-2.35x, the same under vmap(grad) "
        "2.43x against 2.37-2.53x, jacrev 2.38-2.47x against 2.55-2.65x. The time is in torch's C++ (the "
        "dispatcher, wrapper construction, autograd nodes) that each Python step calls, not in the bytecode "
        "Cython removes: at most ~10% where the Python is thinnest, nothing on W1, for a build that would "
        "need wheels per platform and torch version.",
        "",
        END,
    ])


def write_doc(text: str, path=DOC) -> None:
    old = open(path).read() if os.path.exists(path) else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace the breakdown section of docs/benchmarks.md")
    ap.add_argument("--only", default="1,2,3", help="depths to run, e.g. 1,2")
    args = ap.parse_args(argv)
    depths = {int(d) for d in args.only.split(",")}
    rows = [measure_row(*w, quick=args.quick) for i, w in enumerate(workloads(), 1) if i in depths]
    patch_us = patch_cost_us()
    info = H.machine_info()
    text = markdown(rows, patch_us, info)
    print(text)
    if args.write:
        write_doc(text)
        print(f"# wrote {os.path.relpath(DOC, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
