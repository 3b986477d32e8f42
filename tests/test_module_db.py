"""Per-sample gradients of PyTorch's ModuleInfo database (the harness is scripts/module_coverage.py).

``vmap(grad(loss), in_dims=(None, 0))(params, x)`` with ``functional_call`` against the
per-example loop of ``torch.autograd.grad``: gradients (parameters and input), outputs, and the
buffers afterwards (unbatched buffers are updated as the loop updates them: once per example,
in order).

* ``test_module_slice`` (CI): a dozen representative modules, every config passes.
* ``test_module_db_full`` (slow): every module in ``module_db``; the configs in
  ``KNOWN_FAILURES`` must fail (strictly: one that passes must be removed from the list).
* focused tests of the semantics the sweep relies on: batch norm's running statistics
  (momentum, cumulative average, num_batches_tracked, chunking, both transform orders),
  recurrent layers with batched weights or hidden states, layer norm's backward.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pyfunctorch as pf
from conftest import assert_close

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("pyfunctorch_module_coverage", ROOT / "scripts" / "module_coverage.py")
mc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mc
_spec.loader.exec_module(mc)

INFOS = {m.name: m for m in mc.module_infos()}

#: config key -> why it fails (see the report in docs/module_coverage.md)
KNOWN_FAILURES: dict[str, str] = {
    # (empty: every config passes. LinearCrossEntropyLoss(reduction='none') used to fail: its
    # custom op's backward writes grad_output in place into scratch computed from unbatched
    # constants; custom_function.call_backward now re-runs such a formula once per example.)
}

DT = torch.float64


def _describe(recs):
    return "\n".join(f"  {r['key']}: {r['pyf']} {r.get('pyf_err') or r.get('reason', '')}" for r in recs)


def test_slice_modules_exist():
    missing = [n for n, _ in mc.FAST if n not in INFOS]
    assert not missing, missing
    assert len(mc.FAST) >= 12


@pytest.mark.parametrize("name,mode", mc.FAST, ids=[f"{n}[{m}]" for n, m in mc.FAST])
def test_module_slice(name, mode):
    info = INFOS[name]
    recs = [mc.run_config(info, mode, i, mi, torch_func=False) for i, mi in mc.configs(info, mode)]
    assert recs
    bad = [r for r in recs if r["pyf"] != "pass"]
    assert not bad, "\n" + _describe(bad)


@pytest.fixture
def ensemble(monkeypatch):
    """The sweep's --ensemble kind: every example its own parameters, grad of the summed loss
    *around* vmap (the level outside differentiates what the batching rules compute)."""
    monkeypatch.setattr(mc, "ENSEMBLE", True)


@pytest.mark.parametrize("name,mode", mc.FAST, ids=[f"{n}[{m}]" for n, m in mc.FAST])
def test_module_slice_ensemble(name, mode, ensemble):
    info = INFOS[name]
    recs = [mc.run_config(info, mode, i, mi, torch_func=False) for i, mi in mc.configs(info, mode)]
    bad = [r for r in recs if r["pyf"] != "pass"]
    assert not bad, "\n" + _describe(bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INFOS))
def test_module_db_full_ensemble(name, ensemble):
    # (CrossEntropyLoss with every target of an example ignored, 'mean': its rule's 0 / 0 gave
    # inf gradients around vmap before the kernel's gradient was used there too)
    recs = mc.sweep([INFOS[name]], torch_func=False)
    bad = [r for r in recs if r["pyf"] in ("fail", "error")]
    assert not bad, "\n" + _describe(bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(INFOS))
def test_module_db_full(name):
    info = INFOS[name]
    recs = mc.sweep([info], torch_func=False)
    unexpected = [r for r in recs if r["pyf"] in ("fail", "error") and r["key"] not in KNOWN_FAILURES]
    assert not unexpected, "\n" + _describe(unexpected)
    fixed = [r for r in recs if r["key"] in KNOWN_FAILURES and r["pyf"] == "pass"]
    assert not fixed, "now passing, remove from KNOWN_FAILURES:\n" + _describe(fixed)


def test_known_failures_are_configs():
    """Every KNOWN_FAILURES key names a config the full sweep runs."""
    keys = set()
    for key in KNOWN_FAILURES:
        name = key.split("[")[0]
        info = INFOS[name]
        keys |= {mc.config_key(info, m, i, mi) for m in mc.modes(info) for i, mi in mc.configs(info, m)}
    assert set(KNOWN_FAILURES) <= keys


#: configs whose custom-op backward writes a batched grad_output into scratch that torch made
#: from unbatched constants (LinearCrossEntropyLoss, reduction='none'); torch.func fails them.
#: Chosen by what they are, not by index: module_db's config list differs between torch releases.
def _per_example_backward_configs():
    info = INFOS.get("nn.LinearCrossEntropyLoss")
    if info is None:  # (torch 2.11's module_db has no LinearCrossEntropyLoss)
        return []
    keys = [mc.config_key(info, "train", i, mi) for i, mi in mc.configs(info, "train")
            if mi.constructor_input.kwargs.get("reduction") == "none"]
    assert len(keys) >= 3, "module_db has no LinearCrossEntropyLoss reduction='none' configs"
    return keys


PER_EXAMPLE_BACKWARD_CONFIGS = _per_example_backward_configs()


@pytest.mark.parametrize("key", PER_EXAMPLE_BACKWARD_CONFIGS)
def test_custom_op_backward_runs_per_example(key):
    info = INFOS[key.split("[")[0]]
    recs = [mc.run_config(info, m, i, mi, torch_func=False) for m in mc.modes(info)
            for i, mi in mc.configs(info, m) if mc.config_key(info, m, i, mi) == key]
    assert len(recs) == 1, key
    assert recs[0]["pyf"] == "pass", _describe(recs)


# -- batch norm: running statistics shared by the batch ------------------------------------------


def _bn_loss(fc, bn, bufs):
    def loss(p, x):
        out = fc(bn, (p, bufs), (x,))
        return (out * out).sum(), out

    return loss


def _bn_check(bn, X, *, chunk_size=None):
    """vmap(grad) vs the loop: gradients, outputs, and the buffers after all examples."""
    params = {k: v.detach().clone() for k, v in bn.named_parameters()}
    bufs0 = {k: v.clone() for k, v in bn.named_buffers()}
    bufs = copy.deepcopy(bufs0)
    (gp, gx), out = pf.vmap(pf.grad(_bn_loss(pf.functional_call, bn, bufs), argnums=(0, 1), has_aux=True),
                            in_dims=(None, 0), chunk_size=chunk_size)(params, X)
    loop_bufs = copy.deepcopy(bufs0)
    for b in range(X.shape[0]):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        x = X[b].clone().requires_grad_()
        total, o = _bn_loss(torch.func.functional_call, bn, loop_bufs)(p, x)
        grads = torch.autograd.grad(total, [*p.values(), x])
        assert_close(out[b], o.detach())
        assert_close(gx[b], grads[-1])
        for k, g in zip(p, grads):
            assert_close(gp[k][b], g)
    for k in bufs:
        torch.testing.assert_close(bufs[k], loop_bufs[k], rtol=1e-12, atol=1e-12, msg=k)
    for k in ("running_mean", "running_var"):
        if k in bufs:
            assert not torch.equal(bufs[k], bufs0[k])  # the check compared something
    return bufs, bufs0


@pytest.mark.parametrize("momentum", [0.1, 0.8, None], ids=["m0.1", "m0.8", "cumulative"])
@pytest.mark.parametrize("cls,shape", [(torch.nn.BatchNorm1d, (5, 3)), (torch.nn.BatchNorm1d, (5, 3, 4)),
                                       (torch.nn.BatchNorm2d, (2, 3, 4, 4)), (torch.nn.BatchNorm3d, (2, 3, 2, 3, 2))])
def test_batch_norm_train_running_stats_follow_the_loop(cls, shape, momentum):
    bn = cls(3, momentum=momentum).to(DT)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(5)
    bufs, _ = _bn_check(bn, torch.randn(4, *shape, dtype=DT))
    assert int(bufs["num_batches_tracked"]) == 5 + 4


def test_batch_norm_train_chunked_and_zero_batch():
    bn = torch.nn.BatchNorm2d(3, momentum=None).to(DT)
    _bn_check(bn, torch.randn(5, 2, 3, 3, 3, dtype=DT), chunk_size=2)
    # an empty example batch updates nothing but still counts the forward calls
    bn = torch.nn.BatchNorm1d(3).to(DT)
    bufs = {k: v.clone() for k, v in bn.named_buffers()}
    pf.vmap(lambda x: pf.functional_call(bn, bufs, (x,)))(torch.randn(4, 0, 3, dtype=DT))
    assert int(bufs["num_batches_tracked"]) == 4
    assert_close(bufs["running_mean"], bn.running_mean)


def test_batch_norm_train_grad_of_vmap():
    """The other order: grad over the sum of a vmapped forward (vmap inside grad)."""
    bn = torch.nn.BatchNorm1d(3, momentum=0.2).to(DT)
    X = torch.randn(4, 5, 3, dtype=DT)
    params = {k: v.detach().clone() for k, v in bn.named_parameters()}
    b1 = {k: v.clone() for k, v in bn.named_buffers()}
    b2 = {k: v.clone() for k, v in bn.named_buffers()}
    g = pf.grad(lambda p: (pf.vmap(lambda x: pf.functional_call(bn, (p, b1), (x,)))(X) ** 2).sum())(params)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = sum((torch.func.functional_call(bn, (p, b2), (X[i],)) ** 2).sum() for i in range(4))
    assert_close(g, dict(zip(p, torch.autograd.grad(total, list(p.values())))))
    assert_close(b1, b2)


def test_batch_norm_train_ensemble_shared_input():
    """Per-model affine parameters, one shared input and shared running stats: every example
    has the same statistics, and the loop still updates the stats once per example."""
    bn = torch.nn.BatchNorm1d(3, momentum=None).to(DT)
    P = {k: torch.randn(4, *v.shape, dtype=DT) for k, v in bn.named_parameters()}
    x = torch.randn(6, 3, dtype=DT)
    b1 = {k: v.clone() for k, v in bn.named_buffers()}
    b2 = {k: v.clone() for k, v in bn.named_buffers()}
    got = pf.vmap(lambda p: pf.functional_call(bn, (p, b1), (x,)), in_dims=(0,))(P)
    want = torch.stack([torch.func.functional_call(bn, ({k: v[i] for k, v in P.items()}, b2), (x,)) for i in range(4)])
    assert_close(got, want)
    assert_close(b1, b2)
    assert int(b1["num_batches_tracked"]) == 4


def test_batch_norm_train_batched_buffers_unchanged_behaviour():
    """Buffers batched with the input (stack_module_state): each example updates its own."""
    models = [torch.nn.BatchNorm1d(3).to(DT) for _ in range(3)]
    params, buffers = pf.stack_module_state(models)
    X = torch.randn(3, 5, 3, dtype=DT)
    base = copy.deepcopy(models[0])
    out = pf.vmap(lambda p, b, x: pf.functional_call(base, (p, b), (x,)))(params, buffers, X)
    assert_close(out, torch.stack([m(X[i]) for i, m in enumerate(models)]).detach())
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(buffers[k], torch.stack([getattr(m, k) for m in models]))


def test_instance_norm_tracking_stats_follow_the_loop():
    m = torch.nn.InstanceNorm1d(3, momentum=0.3, track_running_stats=True, affine=True).to(DT)
    X = torch.randn(4, 2, 3, 5, dtype=DT)
    b1 = {k: v.clone() for k, v in m.named_buffers()}
    b2 = {k: v.clone() for k, v in m.named_buffers()}
    params = {k: v.detach() for k, v in m.named_parameters()}
    got = pf.vmap(lambda x: pf.functional_call(m, (params, b1), (x,)))(X)
    want = torch.stack([torch.func.functional_call(m, (params, b2), (X[i],)) for i in range(4)])
    assert_close(got, want)
    assert_close(b1, b2)


def test_batch_norm_train_nested_vmap_shared_stats_errors():
    bn = torch.nn.BatchNorm1d(3).to(DT)
    bufs = {k: v.clone() for k, v in bn.named_buffers()}
    f = lambda x: pf.functional_call(bn, bufs, (x,))  # noqa: E731
    with pytest.raises(RuntimeError, match="two vmap levels.*track_running_stats=False"):
        pf.vmap(pf.vmap(f))(torch.randn(2, 3, 4, 3, dtype=DT))


# -- recurrent layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM])
def test_rnn_ensemble_and_batched_hidden(cls):
    models = [cls(2, 3, num_layers=2, bidirectional=True).to(DT) for _ in range(3)]
    params, _ = pf.stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    x = torch.randn(4, 2, dtype=DT)
    base = copy.deepcopy(models[0])
    # batched weights, unbatched input and (implicit, zero) hidden state
    got = pf.vmap(lambda p: pf.functional_call(base, p, (x,)))(params)
    want = [m(x) for m in models]
    assert_close(got[0], torch.stack([w[0] for w in want]).detach())
    # batched initial hidden state, everything else shared
    H = torch.randn(3, 4, 3, dtype=DT)

    def f(h):
        return base(x, (h, h) if cls is torch.nn.LSTM else h)[0]

    assert_close(pf.vmap(f)(H), torch.stack([f(h) for h in H]).detach())


@pytest.mark.parametrize("cls", [torch.nn.RNNCell, torch.nn.GRUCell, torch.nn.LSTMCell])
def test_rnn_cell_per_sample_grads(cls):
    cell = cls(3, 4).to(DT)
    params = {k: v.detach() for k, v in cell.named_parameters()}
    X = torch.randn(5, 2, 3, dtype=DT)

    def loss(fc):
        def f(p, x):
            out = fc(cell, p, (x,))
            return sum((o * o).sum() for o in (out if isinstance(out, tuple) else (out,)))
        return f

    got = pf.vmap(pf.grad(loss(pf.functional_call)), in_dims=(None, 0))(params, X)
    for b in range(5):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        want = torch.autograd.grad(loss(torch.func.functional_call)(p, X[b]), list(p.values()))
        assert_close({k: got[k][b] for k in p}, dict(zip(p, want)))


# -- layer norm / group norm backward with an unbatched input --------------------------------------


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_norm_backward_unbatched_input_batched_grad(norm):
    """The forward is unbatched and only the cotangent is batched (a decoder's self-attention
    on an unbatched target under per-sample gradients): the backward kernel gets expanded
    saved statistics, which it reads as flat buffers."""
    x = torch.randn(3, 4, dtype=DT)
    W = torch.randn(4, 4, dtype=DT)
    Y = torch.randn(5, 3, 4, dtype=DT)
    if norm == "layer":
        n = lambda h: F.layer_norm(h, (4,))  # noqa: E731
    else:
        n = lambda h: F.group_norm(h, 2)  # noqa: E731

    def f(W, y):
        return ((n(x @ W) * y) ** 2).sum()

    got = pf.vmap(pf.grad(f), in_dims=(None, 0))(W, Y)
    want = []
    for y in Y:
        w = W.clone().requires_grad_()
        want.append(torch.autograd.grad(f(w, y), w)[0])
    assert_close(got, torch.stack(want))
