#!/usr/bin/env python
"""Per-sample gradients of every module in PyTorch's ModuleInfo database.

For every ``ModuleInfo`` in ``torch.testing._internal.common_modules.module_db`` (CPU,
float64 where the module supports it, else float32) and a spread of its ``ModuleInput``
configs, this builds the module and compares ::

    vmap(grad(loss, argnums, has_aux=True), in_dims=(None, 0))(params, X)

with a per-example loop over ``torch.autograd.grad`` (the oracle), for pyfunctorch and for
torch.func. ``loss(params, x)`` is ``functional_call(module, (params, buffers), inputs)``
where ``inputs`` are the config's forward inputs with the first tensor replaced by ``x``;
it returns the sum of squares of every floating-point tensor output (and those outputs as
aux). ``X`` stacks 3 variants of that first tensor (the config's own, and two scaled by
random factors in [0.8, 1); integer inputs are redrawn in their own value range). Gradients
are taken with respect to the parameters and, when it is floating point, the input ``x``
(so that parameterless modules -- activations, pools, losses -- are checked too).

Buffer semantics: the buffers are passed unbatched. The oracle runs the examples one after
the other on *one* set of buffers, so a module that updates buffers in training mode
(BatchNorm, InstanceNorm with track_running_stats) updates them once per example, in
order; vmap must leave the buffers exactly as that loop does (checked too).

A config's status: ``pass``; ``fail`` (a gradient, output or buffer differs from the
loop's); ``error`` (the transform raised); ``skip`` (not comparable: the loop itself
raises, or the module is random in this mode). Modules whose training and eval behaviour
differ are run in both modes.

    python scripts/module_coverage.py            # the full sweep: writes docs/module_coverage.md
    python scripts/module_coverage.py --modules nn.GRU,nn.BatchNorm2d -v
    python scripts/module_coverage.py --fast     # the representative slice of the tests
    python scripts/module_coverage.py --max-configs 0 --no-write   # every config of every module

The harness is importable (tests/test_module_db.py uses ``run_config``).
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

BATCH = 3
MAX_CONFIGS = 32  # configs per module and mode in the full sweep (spread over its list)
MAX_CONFIGS_EVAL = 8
CONFIG_TIMEOUT = 60  # seconds per config (pyfunctorch, torch.func and the oracle together)

#: the representative slice (module name, mode): tests/test_module_db.py runs it unmarked
FAST = [
    ("nn.Linear", "train"), ("nn.Conv2d", "train"), ("nn.ConvTranspose2d", "train"),
    ("nn.BatchNorm2d", "train"), ("nn.LayerNorm", "train"), ("nn.GroupNorm", "train"),
    ("nn.Embedding", "train"), ("nn.LSTM", "train"), ("nn.GRU", "train"), ("nn.RNN", "train"),
    ("nn.MultiheadAttention", "train"), ("nn.TransformerEncoderLayer", "train"),
]  # fmt: skip


def module_infos(names=None):
    from torch.testing._internal.common_modules import module_db

    infos = list(module_db)
    if names is not None:
        want = set(names)
        infos = [m for m in infos if m.name in want]
        missing = want - {m.name for m in infos}
        if missing:
            raise SystemExit(f"unknown module(s): {', '.join(sorted(missing))}")
    return infos


#: the device and dtype of the sweep (``--device``, ``--dtype``); dtype None: float64 where the
#: module supports it, else float32
DEVICE, DTYPE = "cpu", None
ENSEMBLE = False  # (--ensemble: parameters batched, differentiated around vmap)


def dtype_for(info):
    dts = info.supported_dtypes(DEVICE)
    if DTYPE is not None:
        return DTYPE
    return torch.float64 if torch.float64 in dts else torch.float32


def _spread(n, k):
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def configs(info, mode, max_configs=None):
    """``[(index, ModuleInput)]`` for ``info`` in ``mode`` ('train' or 'eval')."""
    torch.manual_seed(0)
    mis = info.module_inputs_func(info, device=DEVICE, dtype=dtype_for(info), requires_grad=False,
                                  training=mode == "train")
    mis = list(mis)
    if max_configs is None:
        max_configs = MAX_CONFIGS if mode == "train" else MAX_CONFIGS_EVAL
    if max_configs <= 0:  # every config
        max_configs = len(mis)
    return [(i, mis[i]) for i in _spread(len(mis), max_configs)]


def modes(info):
    return ("train", "eval") if info.train_and_eval_differ else ("train",)


def config_key(info, mode, idx, mi):
    return f"{info.name}[{mode}]#{idx}" + (f" {mi.desc}" if mi.desc else "")


# -- one config --------------------------------------------------------------------------------


class ConfigTimeout(Exception):
    pass


def _detach_tree(t):
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, t)


def _build(info, mi, dtype, mode):
    torch.manual_seed(0)
    c = mi.constructor_input
    module = info.module_cls(*copy.deepcopy(c.args), **copy.deepcopy(c.kwargs))
    f = mi.forward_input
    fargs, fkwargs = _detach_tree(f.args), _detach_tree(f.kwargs)
    module = module.to(dtype)
    if info.is_lazy:  # materialize the lazy parameters with one plain forward
        with torch.no_grad():
            module(*copy.deepcopy(fargs), **copy.deepcopy(fkwargs))
    module.train(mode == "train")
    return module, fargs, fkwargs


def _variants(x, B):
    """``B`` different examples like ``x`` (the first is ``x``), stacked."""
    g = torch.Generator().manual_seed(1234)
    out = [x]
    for _ in range(B - 1):
        if x.is_floating_point():
            out.append(x * (0.8 + 0.2 * torch.rand(x.shape, generator=g, dtype=x.dtype).to(x.device)))
        elif x.dtype is torch.bool:
            out.append((torch.rand(x.shape, generator=g) < 0.5).to(x.device))
        elif x.numel():
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device))
        else:
            out.append(x.clone())
    return torch.stack(out)


def _float_outputs(out):
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.is_floating_point()]


def make_loss(functional_call, module, buffers, leaves, spec, pos):
    """``loss(params, x) -> (sum of squares of the outputs, outputs)``."""

    def loss(params, x):
        lv = list(leaves)
        lv[pos] = x
        args, kwargs = pytree.tree_unflatten(lv, spec)
        out = functional_call(module, (params, buffers), tuple(args), kwargs)
        outs = _float_outputs(out)
        total = sum((o * o).sum() for o in outs)
        return total, tuple(outs)

    return loss


def _oracle(module, params, buffers, leaves, spec, pos, X, argnums):
    """The per-example loop: one set of buffers, updated by the examples in order."""
    from torch.func import functional_call

    grads, auxes = [], []
    for b in range(X.shape[0]):
        p = {k: (v[b] if ENSEMBLE else v).detach().clone().requires_grad_() for k, v in params.items()}
        x = X[b].clone()
        if 1 in argnums:
            x.requires_grad_()
        total, aux = make_loss(functional_call, module, buffers, leaves, spec, pos)(p, x)
        wrt_p = [v for v in p.values() if v.requires_grad]
        inputs = wrt_p + ([x] if 1 in argnums else [])
        if inputs and isinstance(total, torch.Tensor) and total.requires_grad:
            gs = torch.autograd.grad(total, inputs, allow_unused=True)
        else:
            gs = [None] * len(inputs)
        gs = [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]
        gp = dict(zip([k for k, v in p.items() if v.requires_grad], gs[: len(wrt_p)]))
        grads.append((gp, gs[-1]) if 1 in argnums else gp)
        auxes.append(tuple(a.detach() for a in aux))
    stack = lambda trees: pytree.tree_map(lambda *ts: torch.stack(ts), *trees)  # noqa: E731
    return stack(grads), stack(auxes)


def _transform(lib, module, params, buffers, leaves, spec, pos, X, argnums):
    loss = make_loss(lib.functional_call, module, buffers, leaves, spec, pos)
    if ENSEMBLE:  # every example its own parameters, differentiated around vmap (the sum of the losses)
        def total(P, X):
            return lib.vmap(lambda p, x: loss(p, x)[0])(P, X).sum()

        grads = lib.grad(total, argnums=argnums if len(argnums) > 1 else argnums[0])(params, X)
        return grads
    g = lib.vmap(lib.grad(loss, argnums=argnums if len(argnums) > 1 else argnums[0], has_aux=True),
                 in_dims=(None, 0))
    return g(params, X)


def _compare(actual, expected, dtype):
    """None if equal within tolerance, else a short description of the first difference."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if a_spec != e_spec:
        short = lambda sp: " ".join(str(sp).split())[:150]  # noqa: E731
        return f"structure differs: {short(a_spec)} vs {short(e_spec)}"
    rtol, atol = (1e-7, 1e-7) if dtype is torch.float64 else (1e-4, 1e-5)
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(expected)[0]]
    for path, a, e in zip(paths, a_leaves, e_leaves):
        if not isinstance(e, torch.Tensor):
            if a != e:
                return f"{path}: {a!r} != {e!r}"
            continue
        if not isinstance(a, torch.Tensor) or type(a) is not torch.Tensor:
            return f"{path}: got {type(a).__name__}"
        if a.shape != e.shape:
            return f"{path}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        try:
            torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError:
            diff = (a.double() - e.double()).abs()
            return f"{path}: max abs diff {diff.nan_to_num(float('inf')).max().item():.3g}"
    return None


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _alarm(signum, frame):
    raise ConfigTimeout()


def run_config(info, mode, idx, mi, *, torch_func=True, timeout=CONFIG_TIMEOUT):
    """Run one config; returns a dict: key, pyf, tf (statuses), pyf_err, tf_err, reason, fallbacks."""
    import pyfunctorch
    from pyfunctorch import batched

    key = config_key(info, mode, idx, mi)
    rec = {"key": key, "module": info.name, "mode": mode, "idx": idx, "desc": mi.desc}
    dtype = dtype_for(info)
    old = signal.signal(signal.SIGALRM, _alarm) if timeout else None
    if timeout:
        signal.alarm(timeout)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (constructor advice, e.g. about nested tensors)
                module, fargs, fkwargs = _build(info, mi, dtype, mode)
        except Exception as e:  # noqa: BLE001
            return dict(rec, pyf="skip", tf="skip", reason="building the module raises: " + _first_line(e))
        leaves, spec = pytree.tree_flatten((list(fargs), dict(fkwargs)))
        pos = next((i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)), None)
        if pos is None:
            return dict(rec, pyf="skip", tf="skip", reason="no tensor input")
        X = _variants(leaves[pos], BATCH)
        argnums = (0, 1) if X.is_floating_point() else (0,)
        params = {k: v.detach().clone() for k, v in module.named_parameters()}
        if ENSEMBLE:  # (B members: the module's own parameters and scaled variants)
            params = {k: _variants(v, BATCH) for k, v in params.items()}
        buffers0 = {k: v.detach().clone() for k, v in module.named_buffers()}

        # the oracle, twice with different seeds: a random module cannot be compared
        results = []
        try:
            for seed in (1, 2):
                torch.manual_seed(seed)
                bufs = _detach_tree(buffers0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    results.append((_oracle(module, params, bufs, leaves, spec, pos, X, argnums), bufs))
        except ConfigTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            return dict(rec, pyf="skip", tf="skip", reason="the loop raises: " + _first_line(e))
        if _compare(results[0], results[1], dtype) is not None:
            return dict(rec, pyf="skip", tf="skip", reason="random in this mode")
        (expected, exp_bufs) = results[0]
        if ENSEMBLE:
            expected = expected[0]  # (the gradients; the outputs are not returned around vmap)

        libs = [("pyf", pyfunctorch)] + ([("tf", torch.func)] if torch_func else [])
        for name, lib in libs:
            bufs = _detach_tree(buffers0)
            before = dict(batched.FALLBACK_COUNTS)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = _transform(lib, module, params, bufs, leaves, spec, pos, X, argnums)
                diff = _compare(got, expected, dtype) or _compare(bufs, exp_bufs, dtype)
                rec[name] = "pass" if diff is None else "fail"
                if diff is not None:
                    rec[name + "_err"] = diff
            except ConfigTimeout:
                rec[name] = "error"
                rec[name + "_err"] = f"timeout ({timeout} s)"
                break
            except Exception as e:  # noqa: BLE001
                rec[name] = "error"
                rec[name + "_err"] = _first_line(e)
            if name == "pyf":
                used = {str(op): n - before.get(op, 0) for op, n in batched.FALLBACK_COUNTS.items()
                        if n != before.get(op, 0)}
                if used:
                    rec["fallbacks"] = sorted(used)
        return rec
    except ConfigTimeout:
        return dict(rec, pyf=rec.get("pyf", "error"), tf=rec.get("tf", "error"), pyf_err=f"timeout ({timeout} s)")
    finally:
        if timeout:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        from pyfunctorch import _core

        _core.interpreter_stack().clear()  # a failed transform must not leave a level behind


def sweep(infos, *, fast=False, torch_func=True, verbose=False, max_configs=None):
    recs = []
    for info in infos:
        for mode in modes(info):
            if fast and (info.name, mode) not in FAST:
                continue
            try:
                cfgs = configs(info, mode, max_configs)
            except Exception as e:  # noqa: BLE001
                recs.append({"key": f"{info.name}[{mode}]", "module": info.name, "mode": mode, "idx": -1,
                             "desc": "", "pyf": "skip", "tf": "skip",
                             "reason": "module_inputs_func raises: " + _first_line(e)})
                continue
            for idx, mi in cfgs:
                t0 = time.time()
                r = run_config(info, mode, idx, mi, torch_func=torch_func)
                r["time"] = time.time() - t0
                recs.append(r)
                if verbose:
                    extra = r.get("pyf_err") or r.get("reason") or ""
                    print(f"{r['key']:60s} pyf={r['pyf']:5s} tf={r.get('tf', '-'):5s} {r['time']:.1f}s {extra}",
                          flush=True)
    return recs


# -- report ---------------------------------------------------------------------------------


def summary(recs):
    ran = [r for r in recs if r["pyf"] != "skip"]
    pyf = Counter(r["pyf"] for r in ran)
    tf = Counter(r.get("tf", "-") for r in ran)
    return {
        "configs": len(recs),
        "compared": len(ran),
        "skipped": len(recs) - len(ran),
        "pyf_pass": pyf["pass"],
        "pyf_fail": pyf["fail"],
        "pyf_error": pyf["error"],
        "tf_pass": tf["pass"],
        "tf_fail": tf["fail"],
        "tf_error": tf["error"],
        "modules": len({r["module"] for r in recs}),
    }


def _md_cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_markdown(recs, path):
    s = summary(recs)
    lines = [
        "# Module coverage: " + ("ensembles differentiated around vmap" if ENSEMBLE else "per-sample gradients")
        + " over `module_db`",
        "",
        *((["Generated by `python scripts/module_coverage.py --ensemble`: every example has its own parameters",
            f"(the module's and {BATCH - 1} scaled variants, stacked), and `grad(lambda P, X: vmap(loss)(P, X).sum())`",
            "-- the level outside vmap differentiates what the batching rules compute -- is compared with the",
            "loop's gradients. The rest of this text describes the per-sample sweep, whose harness it shares.", ""])
          if ENSEMBLE else []),
        "Generated by `python scripts/module_coverage.py` (do not edit by hand). For every module in",
        "`torch.testing._internal.common_modules.module_db` (CPU, float64 where supported) and a spread",
        f"of its configs (at most {MAX_CONFIGS} per module in training mode, {MAX_CONFIGS_EVAL} in eval mode",
        "for modules whose modes differ), `vmap(grad(loss), in_dims=(None, 0))(params, x)` over a batch",
        f"of {BATCH} examples is compared with a per-example loop of `torch.autograd.grad`: gradients",
        "with respect to the parameters and the (floating-point) input, the module's outputs, and the",
        "buffers afterwards (unbatched buffers are updated as the loop updates them: once per example, in",
        "order). See the script's docstring for details.",
        "",
        (f"**pyfunctorch: {s['pyf_pass']} of {s['compared']} configs pass** "
         f"({s['pyf_fail']} fail, {s['pyf_error']} error); "
         f"**torch.func: {s['tf_pass']} of {s['compared']}** ({s['tf_fail']} fail, {s['tf_error']} error). "
         f"{s['skipped']} of {s['configs']} configs ({s['modules']} modules) are not comparable (skip)."),
        "",
    ]
    both = [r for r in recs if r["pyf"] != "skip"]
    only_pyf = [r for r in both if r["pyf"] == "pass" and r.get("tf") != "pass"]
    only_tf = [r for r in both if r["pyf"] != "pass" and r.get("tf") == "pass"]
    lines += [(f"Configs that pass with pyfunctorch but not torch.func: {len(only_pyf)}; "
               f"with torch.func but not pyfunctorch: {len(only_tf)}."), ""]
    fb = Counter(op for r in recs for op in r.get("fallbacks", ()))
    if fb:
        lines += ["Ops served by the per-example loop fallback (configs using them): "
                  + ", ".join(f"`{op}` ({n})" for op, n in fb.most_common()) + ".", ""]
    lines += ["## By module", "", "| module | configs | pyfunctorch pass | torch.func pass |", "|---|---|---|---|"]
    for mod in dict.fromkeys(r["module"] for r in recs):
        rs = [r for r in both if r["module"] == mod]
        lines.append(f"| {mod} | {len(rs)} | {sum(r['pyf'] == 'pass' for r in rs)} | "
                     f"{sum(r.get('tf') == 'pass' for r in rs)} |")
    lines += ["", "## By config", ""]
    lines += ["| config | pyfunctorch | torch.func | pyfunctorch error / reason | torch.func error |",
              "|---|---|---|---|---|"]
    for r in recs:
        lines.append("| " + " | ".join(_md_cell(c) for c in (
            r["key"], r["pyf"], r.get("tf", "-"), r.get("pyf_err") or r.get("reason", ""), r.get("tf_err", ""),
        )) + " |")
    path.write_text("\n".join(lines) + "\n")


def _no_tf32():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpu import no_tf32  # (shared by the three sweeps; the scripts are also loaded by path)

    no_tf32()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", help="comma-separated module names (e.g. nn.GRU,nn.Linear)")
    ap.add_argument("--fast", action="store_true", help="only the representative slice")
    ap.add_argument("--max-configs", type=int, default=None,
                    help=f"configs per module and mode (default {MAX_CONFIGS} in training mode, {MAX_CONFIGS_EVAL} "
                         "in eval mode; 0: all ~2000 configs, ~1 min)")
    ap.add_argument("--no-torch-func", action="store_true", help="skip the torch.func comparison")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/module_coverage.md")
    ap.add_argument("--device", default="cpu", help="device of the modules and inputs (cuda on a GPU machine; "
                                                       "then docs/module_coverage.md is not written)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float64"],
                    help="dtype of every config (default: float64 where the module supports it, else float32)")
    ap.add_argument("--ensemble", action="store_true",
                    help="an ensemble trained through vmap instead: every example its own parameters, "
                         "grad of the summed loss around vmap (writes docs/module_coverage_ensemble.md)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    global DEVICE, DTYPE, ENSEMBLE
    ENSEMBLE = a.ensemble
    DEVICE, DTYPE = a.device, (getattr(torch, a.dtype) if a.dtype else None)
    if torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    if DEVICE != "cpu" or DTYPE is not None:
        a.no_write = True
        _no_tf32()
    torch.set_num_threads(1)
    infos = module_infos(a.modules.split(",") if a.modules else None)
    t0 = time.time()
    recs = sweep(infos, fast=a.fast, torch_func=not a.no_torch_func, verbose=a.verbose, max_configs=a.max_configs)
    s = summary(recs)
    print(f"pyfunctorch: {s['pyf_pass']} of {s['compared']} configs pass ({s['pyf_fail']} fail, "
          f"{s['pyf_error']} error); torch.func: {s['tf_pass']} of {s['compared']} ({s['tf_fail']} fail, "
          f"{s['tf_error']} error); {s['skipped']} skipped; {s['modules']} modules; {time.time() - t0:.0f} s")
    for r in recs:
        if r["pyf"] in ("fail", "error"):
            print(f"  {r['key']}: {r['pyf']}: {r.get('pyf_err', '')}")
    if not (a.no_write or a.modules or a.fast or a.max_configs):
        out = DOCS / ("module_coverage_ensemble.md" if ENSEMBLE else "module_coverage.md")
        write_markdown(recs, out)
        print(f"wrote {out}")
    return recs


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
