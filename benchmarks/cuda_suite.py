"""The benchmark suite on a CUDA device: ``python benchmarks/run.py --device cuda``.

GPU-sized workloads (pyfunctorch vs torch.func vs plain batched torch where there is a
hand-written floor), every timed call bracketed by ``torch.cuda.synchronize()``, and the
peak CUDA memory (``torch.cuda.max_memory_allocated``, reset per case) of jacrev / Hessian
with and without ``chunk_size``.

  W1  per-sample grads: MLP 784-128-10 B=1024; CNN 28x28 B=256; ResNet-style CNN 3x32x32
      B=128; TransformerEncoderLayer d=256 (4 heads, ff 1024) B=64 T=64
  W2  ensembling: 10 MLPs 784-128-10, B=1024
  W3  jacrev / jacfwd of a tanh MLP 1024->1024->1024->1024
  W4  Hessian of c.tanh(Wx+b), 1024 inputs, hidden 4096; 256 batched HVPs
  W5  20 pointwise ops under vmap: tiny [64, 8] and large [256, 65536]
  MEM peak CUDA memory: jacrev 1024->4096->4096->4096 and Hessian 2048 inputs (hidden
      8192), with and without chunk_size

Same protocol as the CPU suite (``_harness.py``): results checked against the reference
first (hand-batched, else torch.func), then paired rotated rounds in one process;
ratios are medians of per-round paired ratios. The builders take a ``device``, so the
tests run the whole suite at tiny sizes on the CPU (``run(..., device="cpu",
check=True)``): the CUDA path is the same code with a different device.
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402  (pins threads before torch is imported)
import overhead  # noqa: E402
import torch  # noqa: E402
import torch.func as tf  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pyfunctorch as pf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sizes: "full" on the GPU; "check" tiny (correctness only, also used on the CPU by the tests)
SIZES = {
    "full": dict(mlp_B=1024, cnn_B=256, res_B=128, tr=(64, 64, 256, 4), ens_B=1024, jac=1024,
                 hess=(1024, 4096), hvp_K=256, pw_large=(256, 65536),
                 mem_jac=(1024, 4096, 4096), mem_hess=(2048, 8192), chunk=256),
    "check": dict(mlp_B=3, cnn_B=2, res_B=2, tr=(2, 5, 16, 2), ens_B=3, jac=6,
                  hess=(6, 10), hvp_K=4, pw_large=(4, 16),
                  mem_jac=(8, 16, 32), mem_hess=(16, 32), chunk=4),
}


def synced(fn, device):
    """``fn`` with a device synchronize before and after (a CUDA call returns before the
    kernels finish: without it the timer would measure the launch, not the work)."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        torch.cuda.synchronize(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _impl(name, fn, device, note=""):
    return H.Impl(name, synced(fn, device), note=note)


def _psg(model, params, x, y, device, loss_fn=None, hand=None, hand_note=""):
    """Per-sample grads of model's loss: pyfunctorch vs torch.func (vmap(grad(functional_call)))."""

    def loss_with(fc):
        def loss(p, xi, yi):
            out = fc(model, p, (xi.unsqueeze(0),))
            return loss_fn(out, yi.unsqueeze(0)) if loss_fn else F.cross_entropy(out, yi.unsqueeze(0))

        return loss

    pf_fn = pf.vmap(pf.grad(loss_with(pf.functional_call)), in_dims=(None, 0, 0))
    tf_fn = tf.vmap(tf.grad(loss_with(tf.functional_call)), in_dims=(None, 0, 0))
    impls = [_impl("pyfunctorch", lambda: pf_fn(params, x, y), device),
             _impl("torch.func", lambda: tf_fn(params, x, y), device)]
    if hand is not None:
        impls.append(_impl("hand-batched", hand, device, hand_note))
    return impls


def w1_mlp(device, B):
    torch.manual_seed(0)
    din, dh, dout = (12, 8, 5) if B < 16 else (784, 128, 10)
    model = nn.Sequential(nn.Linear(din, dh), nn.ReLU(), nn.Linear(dh, dout)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(B, din, device=device), torch.randint(0, dout, (B,), device=device)

    def hand():
        W1, b1, W2, b2 = params.values()
        h = torch.addmm(b1, x, W1.t())
        a = h.relu()
        out = torch.addmm(b2, a, W2.t())
        d = out.softmax(-1)
        d[torch.arange(B, device=device), y] -= 1
        dh_ = (d @ W2) * (h > 0)
        return {"0.weight": torch.einsum("bh,bi->bhi", dh_, x), "0.bias": dh_,
                "2.weight": torch.einsum("bo,bh->boh", d, a), "2.bias": d}

    impls = _psg(model, params, x, y, device, hand=hand, hand_note="manual backward, einsum")
    return H.Case("W1 per-sample grads", f"MLP {din}-{dh}-{dout}, B={B}", impls, ref="hand-batched")


class CNN(nn.Module):
    def __init__(self, hw=28):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        s = ((hw - 2) // 2 - 2) // 2
        self.fc = nn.Linear(16 * s * s, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def w1_cnn(device, B):
    torch.manual_seed(0)
    hw = 12 if B < 16 else 28
    model = CNN(hw).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(B, 1, hw, hw, device=device), torch.randint(0, 10, (B,), device=device)
    return H.Case("W1 per-sample grads", f"CNN {hw}x{hw} conv8-conv16-fc10, B={B}",
                  _psg(model, params, x, y, device), ref="torch.func", hand=None)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.norm(self.conv1(x)))))


class ResNetish(nn.Module):
    """stem conv -> residual block -> strided conv -> residual block -> pool -> fc (GroupNorm:
    per-sample gradients need a normalisation that does not mix examples)."""

    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.b1 = ResBlock(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.b2 = ResBlock(2 * c)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.b1(F.relu(self.stem(x)))
        x = self.b2(F.relu(self.down(x)))
        return self.fc(x.mean((2, 3)))


def w1_resnet(device, B):
    torch.manual_seed(0)
    hw, c = (8, 8) if B < 16 else (32, 32)
    model = ResNetish(c).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(B, 3, hw, hw, device=device), torch.randint(0, 10, (B,), device=device)
    return H.Case("W1 per-sample grads", f"ResNet-style CNN 3x{hw}x{hw} (2 residual blocks, {c}/{2 * c} ch), B={B}",
                  _psg(model, params, x, y, device), ref="torch.func", hand=None)


def w1_transformer(device, B, T, d, heads):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True).to(device)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x, t = torch.randn(B, T, d, device=device), torch.randn(B, T, d, device=device)
    impls = _psg(layer, params, x, t, device, loss_fn=F.mse_loss)
    return H.Case("W1 per-sample grads", f"TransformerEncoderLayer d={d} heads={heads} ff={4 * d}, B={B} T={T}",
                  impls, ref="torch.func", hand=None)


def w2_ensemble(device, B, M=10):
    torch.manual_seed(0)
    din, dh, dout = (12, 8, 5) if B < 16 else (784, 128, 10)
    models = [nn.Sequential(nn.Linear(din, dh), nn.ReLU(), nn.Linear(dh, dout)).to(device) for _ in range(M)]
    pf_p, pf_b = pf.stack_module_state(models)
    tf_p, tf_b = tf.stack_module_state(models)
    base = nn.Sequential(nn.Linear(din, dh), nn.ReLU(), nn.Linear(dh, dout)).to("meta")
    x = torch.randn(B, din, device=device)
    pf_fn = pf.vmap(lambda p, b, xx: pf.functional_call(base, (p, b), (xx,)), in_dims=(0, 0, None))
    tf_fn = tf.vmap(lambda p, b, xx: tf.functional_call(base, (p, b), (xx,)), in_dims=(0, 0, None))

    def hand():
        W1, b1, W2, b2 = tf_p.values()
        h = torch.baddbmm(b1.unsqueeze(1), x.expand(M, B, din), W1.transpose(1, 2)).relu()
        return torch.baddbmm(b2.unsqueeze(1), h, W2.transpose(1, 2))

    impls = [_impl("pyfunctorch", lambda: pf_fn(pf_p, pf_b, x), device),
             _impl("torch.func", lambda: tf_fn(tf_p, tf_b, x), device),
             _impl("hand-batched", hand, device, "baddbmm over stacked weights")]
    return H.Case("W2 ensembling", f"{M} MLPs {din}-{dh}-{dout}, B={B}", impls, ref="hand-batched")


def w3_jac(device, mode, n):
    import _models as R

    f, jac, _ = R.tanh_mlp(n, n, n, device=device)
    x = torch.randn(n, device=device)
    pf_fn = (pf.jacrev if mode == "jacrev" else pf.jacfwd)(f)
    tf_fn = (tf.jacrev if mode == "jacrev" else tf.jacfwd)(f)
    impls = [_impl("pyfunctorch", lambda: pf_fn(x), device), _impl("torch.func", lambda: tf_fn(x), device),
             _impl("hand-batched", lambda: jac(x), device, "analytic Jacobian, matmuls")]
    return H.Case(f"W3 {mode}", f"3-layer tanh MLP {n}->{n}->{n}->{n}", impls, ref="hand-batched")


def w4_hessian(device, n, dh):
    import _models as R

    f, hess, _, _ = R.scalar_fn(n, dh, device=device)
    x = torch.randn(n, device=device)
    pf_fn, tf_fn = pf.hessian(f), tf.hessian(f)
    impls = [_impl("pyfunctorch", lambda: pf_fn(x), device), _impl("torch.func", lambda: tf_fn(x), device),
             _impl("hand-batched", lambda: hess(x), device, "analytic")]
    return H.Case("W4 Hessian", f"f = c.tanh(Wx+b), {n} inputs, hidden {dh}", impls, ref="hand-batched")


def w4_hvp(device, n, dh, K):
    import _models as R

    f, _, hvps, _ = R.scalar_fn(n, dh, device=device)
    x, V = torch.randn(n, device=device), torch.randn(K, n, device=device)
    pf_fn = pf.vmap(lambda v: pf.jvp(pf.grad(f), (x,), (v,))[1])
    tf_fn = tf.vmap(lambda v: tf.jvp(tf.grad(f), (x,), (v,))[1])
    impls = [_impl("pyfunctorch", lambda: pf_fn(V), device), _impl("torch.func", lambda: tf_fn(V), device),
             _impl("hand-batched", lambda: hvps(x, V), device, "analytic")]
    return H.Case("W4 HVP", f"vmap(jvp(grad f)), {K} vectors, {n} inputs, hidden {dh}", impls, ref="hand-batched")


def w5_pointwise(device, shape):
    x = torch.randn(*shape, device=device)
    pf_v, tf_v = pf.vmap(overhead.chain), tf.vmap(overhead.chain)
    impls = [_impl("hand-batched", lambda: overhead.chain(x), device, "plain torch on the whole batch"),
             _impl("torch.func", lambda: tf_v(x), device), _impl("pyfunctorch", lambda: pf_v(x), device)]
    return H.Case("W5 20 pointwise ops under vmap", "x " + "x".join(map(str, shape)), impls, ref="hand-batched",
                  ops=overhead.CHAIN_OPS)


def build_cases(which, device, size):
    s = SIZES[size]
    B, T, d, heads = s["tr"]
    n, dh = s["hess"]
    cases = []
    if "W1" in which:
        cases += [lambda: w1_mlp(device, s["mlp_B"]), lambda: w1_cnn(device, s["cnn_B"]),
                  lambda: w1_resnet(device, s["res_B"]), lambda: w1_transformer(device, B, T, d, heads)]
    if "W2" in which:
        cases.append(lambda: w2_ensemble(device, s["ens_B"]))
    if "W3" in which:
        cases += [lambda m=m: w3_jac(device, m, s["jac"]) for m in ("jacrev", "jacfwd")]
    if "W4" in which:
        cases += [lambda: w4_hessian(device, n, dh), lambda: w4_hvp(device, n, dh, s["hvp_K"])]
    if "W5" in which:
        cases += [lambda: w5_pointwise(device, (64, 8)), lambda: w5_pointwise(device, s["pw_large"])]
    return cases


# -- peak memory ----------------------------------------------------------------------


def peak_bytes(fn, device) -> int:
    """Peak memory of one call of ``fn`` above what was allocated before it: CUDA's
    ``max_memory_allocated`` after ``reset_peak_memory_stats`` (on the CPU, the torch
    profiler's allocation events, as the CPU suite)."""
    if torch.device(device).type != "cuda":
        import _models as R

        return R.peak_tensor_bytes(fn)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - base


def mem_rows(device, size):
    import _models as R

    s = SIZES[size]
    din, dh, dout = s["mem_jac"]
    n, hh = s["mem_hess"]
    k = s["chunk"]
    f, jac, _ = R.tanh_mlp(din, dh, dout, seed=3, device=device)
    x = torch.randn(din, device=device)
    g, hess, _, _ = R.scalar_fn(n, hh, seed=4, device=device)
    xh = torch.randn(n, device=device)
    return [
        (f"jacrev, tanh MLP {din}->{dh}->{dh}->{dout}", lambda: jac(x), {
            "pyfunctorch jacrev": lambda: pf.jacrev(f)(x),
            f"pyfunctorch jacrev(chunk_size={k})": lambda: pf.jacrev(f, chunk_size=k)(x),
            "torch.func jacrev": lambda: tf.jacrev(f)(x),
            f"torch.func jacrev(chunk_size={k})": lambda: tf.jacrev(f, chunk_size=k)(x),
            "hand-batched (analytic)": lambda: jac(x),
        }),
        (f"Hessian, f = c.tanh(Wx+b), {n} inputs, hidden {hh}", lambda: hess(xh), {
            "pyfunctorch hessian": lambda: pf.hessian(g)(xh),
            "pyfunctorch jacrev(jacrev)": lambda: pf.jacrev(pf.jacrev(g))(xh),
            f"pyfunctorch jacrev(jacrev, chunk_size={k})": lambda: pf.jacrev(pf.jacrev(g), chunk_size=k)(xh),
            "torch.func hessian": lambda: tf.hessian(g)(xh),
            "torch.func jacrev(jacrev)": lambda: tf.jacrev(tf.jacrev(g))(xh),
            f"torch.func jacrev(jacrev, chunk_size={k})": lambda: tf.jacrev(tf.jacrev(g), chunk_size=k)(xh),
            "hand-batched (analytic)": lambda: hess(xh),
        }),
    ]


def run_memory(device, size, check, loud=print):
    import warnings

    table, failures = [], []
    for label, ref_fn, impls in mem_rows(device, size):
        ref = ref_fn()
        for name, fn in impls.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    H.check_close(fn(), ref, name, "analytic")
                    res = "ok" if check else f"{peak_bytes(fn, device) / 2**20:.1f} MiB"
            except H.CheckFailed as e:
                res, _ = f"CHECK FAILED: {e}", failures.append(name)
                loud(f"!!! CHECK FAILED, memory row aborted: {e}")
            except Exception as e:
                res, _ = f"ERROR: {type(e).__name__}: {H._first_line(e, 120)}", failures.append(name)
                loud(f"!!! {name} raised, memory row aborted: {res}")
            table.append([label, name, res.replace("|", "/")])
    return table, failures


# -- driver (called by run.py) -----------------------------------------------------------


def device_info(device) -> str:
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return str(device)


def run(which, device="cuda", check=False, quick=False, out=None, json_path=None, argv_cmd=None, loud=print):
    """Run the CUDA suite; returns (exit status, summary). ``check``: tiny sizes, no timing."""
    t_start = time.perf_counter()
    size = "check" if check else "full"
    kw = dict(target_s=0.01, min_rounds=3, max_rounds=9, budget_s=2.0) if quick else \
        dict(target_s=0.03, min_rounds=7, max_rounds=21, budget_s=8.0)
    info = H.machine_info()
    info["device"] = device_info(device)
    if not check:
        loud("# " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    done, failed, summary = [], [], []
    for make in build_cases(which, device, size):
        try:
            case = make()
        except Exception as e:
            loud(f"!!! building a case failed: {type(e).__name__}: {H._first_line(e)}")
            failed.append("build")
            continue
        case.check(loud=loud)
        if not check:
            case.time(**kw)
        bad = [i.name for i in case.impls if i.status and ("FAILED" in i.status or "ERROR" in i.status)]
        failed += case.failed()
        summary += case.summary()
        done.append(case)
        loud(f"[{case.workload} | {case.config}] check ok: {', '.join(i.name for i in case.impls if i.status is None)}"
             + (f"; FAILED: {', '.join(bad)}" if bad else ""), flush=True)
    if done and not check:
        loud("")
        loud(H.cases_table(done))
    mem_table = []
    if "MEM" in which:
        mem_table, mem_failed = run_memory(device, size, check, loud=loud)
        failed += [f"MEM {m}" for m in mem_failed]
        summary += [{"workload": "MEM", "case": r[0], "impl": r[1], "status": "ok" if r[1] not in mem_failed else r[2],
                     "note": "", "peak": r[2]} for r in mem_table]
        loud("")
        loud(H.text_table(["memory workload", "implementation", "peak memory" if not check else "check"], mem_table,
                          max_note=90))
    elapsed = time.perf_counter() - t_start
    loud(f"\n# {len(done)} cases on {device} in {elapsed:.0f} s")
    if failed:
        loud(f"!!! {len(failed)} implementation(s) failed their correctness check or raised:")
        for f_ in failed:
            loud(f"!!!   {f_}")
    if json_path:
        import json

        with open(json_path, "w") as fh:
            json.dump({"check_only": check, "device": str(device), "failed": failed, "rows": summary}, fh, indent=1)
    if out and not check:
        _write_markdown(out, info, done, mem_table, failed, elapsed, quick)
        loud(f"# wrote {os.path.relpath(out, REPO)}")
    return (1 if failed else 0), summary


def _write_markdown(path, info, cases, mem_table, failed, elapsed, quick):
    lines = ["# Benchmarks on CUDA", "",
             "Generated by `benchmarks/run.py --device cuda`; regenerate with the command below. Do not edit by hand.",
             "", "## Machine and run", ""]
    lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in info.items()]
    lines += [f"- **mode**: {'quick' if quick else 'full'}; wall time {elapsed:.0f} s", "",
              "## Method", "",
              "- As the CPU suite (docs/benchmarks.md): results checked against the reference first; paired rotated",
              "  rounds in one process; **x torch.func** / **x hand-batched** are medians of per-round paired ratios.",
              "- Every timed call is bracketed by `torch.cuda.synchronize()`, so a sample measures the kernels, not",
              "  their launch. Small workloads are launch/Python bound (the per-op dispatch cost shows); large ones",
              "  are kernel bound.",
              "- Peak memory: `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`, minus",
              "  what was allocated before the call (after a warm-up call and `empty_cache`); the result included.",
              "", "## Results", "", H.cases_table(cases, markdown=True), ""]
    if mem_table:
        lines += ["## Peak CUDA memory", "", H.markdown_table(["workload", "implementation", "peak memory"], mem_table), ""]
    if failed:
        lines += ["## Failed checks", ""] + [f"- {f_}" for f_ in failed] + [""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
