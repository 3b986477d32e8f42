"""pyfunctorch.compile: guards (a replay is never stale), the bounded cache, errors raised while
tracing, mode='reduce-overhead' and interop with torch.compile. Oracles: the eager function,
torch.func, plain torch."""

from __future__ import annotations

import functools
import types
import warnings

import pytest
import torch
import torch.func as tf
import torch.nn as nn

import pyfunctorch as pf

from conftest import assert_close

DT = torch.float64

# -- guards: globals, closure cells, modules, constant tensors ------------------------------

W = torch.randn(3, 3, dtype=DT)
FLAG = True
SCALE = 2.0


def _uses_w(x):
    return (W @ x).sin().sum()


def test_rebinding_a_global_tensor_retraces():
    global W
    g = pf.compile(pf.grad(_uses_w))
    x = torch.randn(3, dtype=DT)
    assert_close(g(x), tf.grad(_uses_w)(x))
    assert_close(g(x), tf.grad(_uses_w)(x))
    old = W
    try:
        W = torch.randn(3, 3, dtype=DT)
        assert_close(g(x), tf.grad(_uses_w)(x))  # not the old W
        info = g.cache_info()
        assert (info.traces, info.guard_failures, info.entries) == (2, 1, 1), info
        assert_close(g(x), tf.grad(_uses_w)(x))
        assert g.cache_info().traces == 2  # the new graph replays
    finally:
        W = old


THRESHOLD = torch.tensor(1.0)


def test_inplace_update_of_a_constant_tensor_retraces():
    def f(x):
        # a Python read of a one-element constant: make_fx folds it, the branch is baked in
        return x * 2 if float(THRESHOLD) > 0 else x * 3

    c = pf.compile(f)
    x = torch.randn(3, dtype=DT)
    assert_close(c(x), x * 2)
    try:
        with torch.no_grad():
            THRESHOLD.neg_()
        assert_close(c(x), x * 3)  # the other branch: eager's answer
        info = c.cache_info()
        assert (info.traces, info.guard_failures) == (2, 1), info
    finally:
        with torch.no_grad():
            THRESHOLD.fill_(1.0)
    # a larger constant read into Python is data-dependent (runs eagerly), also right
    c2 = pf.compile(lambda x: x if float(W.sum()) > 1e9 else W @ x)
    with pytest.warns(pf.PerformanceWarning):
        assert_close(c2(x), W @ x)


def _branch(x):
    return x.sin() if FLAG else x.cos()


def test_a_global_flag_picks_another_branch():
    global FLAG
    c = pf.compile(pf.vmap(_branch))
    x = torch.randn(4, 3)
    assert_close(c(x), x.sin())
    try:
        FLAG = False
        assert_close(c(x), x.cos())
        FLAG = True
        assert_close(c(x), x.sin())
    finally:
        FLAG = True
    assert c.cache_info().guard_failures == 2


def test_closed_over_number_changes():
    scale = 3.0

    def f(x):
        return (x * scale).sum()

    c = pf.compile(pf.grad(f))
    x = torch.randn(3)
    assert_close(c(x), torch.full((3,), 3.0))
    scale = 5.0
    assert_close(c(x), torch.full((3,), 5.0))
    scale = 5.0  # another float object, the same value: no retrace
    c(x)
    info = c.cache_info()
    assert (info.traces, info.guard_failures) == (2, 1), info


def test_numbers_by_value_strings_and_nested_functions():
    mode = "sin"
    k = 2

    def helper(x):
        return getattr(torch, mode)(x) * k

    def f(x):
        inner = lambda y: helper(y) + SCALE  # noqa: E731 (a nested function reading a global)
        return inner(x)

    c = pf.compile(f)
    x = torch.randn(4)
    assert_close(c(x), f(x))
    mode = "cos"
    assert_close(c(x), f(x))
    k = 3
    assert_close(c(x), f(x))
    assert c.cache_info().guard_failures == 2


def test_global_read_through_a_global_function_and_partial():
    global SCALE

    def f(x, extra):
        return torch.sin(x) * SCALE + extra

    p = functools.partial(f, extra=1.0)
    c = pf.compile(pf.vmap(p))
    x = torch.randn(2, 3)
    assert_close(c(x), torch.sin(x) * 2.0 + 1.0)
    try:
        SCALE = 4.0
        assert_close(c(x), torch.sin(x) * 4.0 + 1.0)
    finally:
        SCALE = 2.0


def test_a_compiled_function_called_by_a_compiled_function():
    global SCALE
    inner = pf.compile(pf.grad(lambda x: (x.sin() * SCALE).sum()))
    outer = pf.compile(lambda x: inner(x) * 2)
    x = torch.randn(3)
    assert_close(outer(x), x.cos() * 4)
    try:
        SCALE = 5.0  # read by the inner function only
        assert_close(outer(x), x.cos() * 10)
    finally:
        SCALE = 2.0


def test_attributes_of_a_user_module_are_guarded():
    cfg = types.ModuleType("user_cfg")
    cfg.gain = 2.0
    glb = {"cfg": cfg, "torch": torch}
    exec("def f(x):\n    return torch.sin(x) * cfg.gain\n", glb)
    c = pf.compile(glb["f"])
    x = torch.randn(3)
    assert_close(c(x), torch.sin(x) * 2.0)
    cfg.gain = 7.0
    assert_close(c(x), torch.sin(x) * 7.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()
        self.drop = nn.Dropout(0.5)
        self.scale = 1.0

    def forward(self, x):
        return self._body(x) * self.scale

    def _body(self, x):
        return self.drop(torch.tanh(self.lin(x)))


def test_module_parameters_training_flag_and_attributes():
    torch.manual_seed(0)
    net = _Net().eval()
    c = pf.compile(pf.vmap(pf.grad(lambda x: net(x).sum())))
    x = torch.randn(5, 4, dtype=DT)

    def oracle():
        return tf.vmap(tf.grad(lambda x: net(x).sum()))(x)

    assert_close(c(x), oracle())
    net.lin.weight = nn.Parameter(torch.randn(3, 4, dtype=DT))  # replaced parameter
    assert_close(c(x), oracle())
    net.scale = 3.0  # a plain attribute of a user module
    assert_close(c(x), oracle())
    net.train()  # dropout on: the eval graph must not be replayed (randomness='error' -> error)
    with pytest.raises(pf.RandomnessError):
        c(x)
    net.eval()
    assert_close(c(x), oracle())
    assert c.cache_info().guard_failures == 3  # (then eval: a miss, the failed retrace cached nothing)


def test_module_train_eval_switch_without_vmap():
    torch.manual_seed(0)
    net = _Net().eval()
    c = pf.compile(lambda x: net(x))
    x = torch.ones(200, 4, dtype=DT)
    assert_close(c(x), net(x))
    net.train()
    out = c(x)
    assert (out == 0).any()  # dropout active
    net.eval()
    assert_close(c(x), net(x))


def test_a_module_passed_as_an_argument_is_guarded_too():
    torch.manual_seed(0)
    net = _Net().eval()
    c = pf.compile(lambda m, x: m(x))
    x = torch.ones(100, 4, dtype=DT)
    assert_close(c(net, x), net(x))
    net.train()
    assert (c(net, x) == 0).any()
    net.eval()
    net.lin.weight = nn.Parameter(torch.randn(3, 4, dtype=DT))
    assert_close(c(net, x), net(x))


def test_inplace_parameter_updates_replay_without_retrace():
    # parameters and buffers are guarded by identity: an optimizer step (in place) is seen
    # through the reference, without a retrace
    lin = nn.Linear(3, 2).double()
    c = pf.compile(lambda x: lin(x).sum())
    x = torch.randn(3, dtype=DT)
    c(x)
    with torch.no_grad():
        lin.weight.mul_(2)
    assert_close(c(x), lin(x).sum())
    assert c.cache_info().traces == 1


def test_batchnorm_running_stats_updated_by_the_graph_do_not_retrace():
    bn = nn.BatchNorm1d(3).double()
    state = {"bn": bn}  # reached only through a dict: its buffers are version-guarded constants
    c = pf.compile(lambda x: state["bn"](x))
    ref = nn.BatchNorm1d(3).double()
    for _ in range(4):
        x = torch.randn(8, 3, dtype=DT)
        assert_close(c(x), ref(x))
    assert_close(bn.running_mean, ref.running_mean)
    assert c.cache_info().traces == 1  # the graph's own in-place updates are not a change


def test_closed_over_tensor_mutated_by_the_graph_does_not_retrace():
    count = torch.zeros(())

    def f(x):
        count.add_(1)
        return x * 2

    c = pf.compile(f)
    x = torch.randn(3)
    for _ in range(3):
        c(x)
    assert count.item() == 3 and c.cache_info().traces == 1
    with torch.no_grad():
        count.zero_()  # an outside update: the graph may have read it, retrace
    c(x)
    assert c.cache_info().guard_failures == 1


def test_default_dtype_and_grad_mode_are_part_of_the_signature():
    c = pf.compile(lambda x: x + torch.ones(3))
    x = torch.zeros(3, dtype=DT)
    assert c(x).dtype == DT
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        out = c(torch.zeros(3, dtype=torch.float32))
        assert out.dtype == (torch.zeros(3, dtype=torch.float32) + torch.ones(3)).dtype
    finally:
        torch.set_default_dtype(old)
    assert c(torch.zeros(3)).dtype == torch.float32


def test_many_retraces_warn_once():
    box = [0.0]
    c = pf.compile(lambda x: x * box[0])  # a list item: not guarded (documented) ...
    x = torch.ones(2)
    c(x)
    box[0] = 1.0
    assert_close(c(x), torch.zeros(2))  # ... so the replay keeps the traced value
    val = 0.0

    def f(x):
        return x * val

    c = pf.compile(f)
    with pytest.warns(pf.PerformanceWarning, match="retraced 8 times"):
        for i in range(10):
            val = float(i)
            assert_close(c(x), x * val)


def test_guard_cost_is_small():
    import timeit

    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    c = pf.compile(pf.vmap(pf.grad(lambda x: m(x).sum())))
    x = torch.randn(64, 8)
    c(x)
    (entry,) = c._cache.values()
    assert entry.guard is not None and entry.guard()
    per_call = min(timeit.repeat(entry.guard, number=2000, repeat=3)) / 2000
    assert per_call < 20e-6  # ~0.4 us measured; generous for a loaded CI machine


# -- the bounded cache ----------------------------------------------------------------------


def test_cache_is_a_bounded_lru_that_warns_once():
    c = pf.compile(lambda x: x.sin(), cache_size_limit=3)
    xs = [torch.randn(n) for n in range(1, 6)]
    c(xs[0]), c(xs[1]), c(xs[2])
    c(xs[0])  # most recently used now: xs[1] is the oldest
    with pytest.warns(pf.PerformanceWarning, match="cache_size_limit=3"):
        c(xs[3])
    info = c.cache_info()
    assert (info.entries, info.evictions) == (3, 1), info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        c(xs[4])
    traces = c.cache_info().traces
    c(xs[0])  # still cached
    assert c.cache_info().traces == traces
    assert_close(c(xs[1]), xs[1].sin())  # evicted: traced again
    assert c.cache_info().traces == traces + 1
    assert len(c.graphs()) == 3


def test_cache_size_limit_validation():
    with pytest.raises(ValueError, match="cache_size_limit"):
        pf.compile(torch.sin, cache_size_limit=0)


# -- exceptions while tracing -----------------------------------------------------------------


def test_a_user_exception_while_tracing_propagates_without_a_rerun():
    calls = []

    def f(x):
        calls.append(1)
        raise KeyError("missing")

    c = pf.compile(pf.vmap(f))
    with pytest.raises(KeyError, match="missing"):
        c(torch.randn(2, 3))
    assert len(calls) == 1


def test_an_operator_error_while_tracing_propagates_without_a_rerun():
    calls = []

    def f(x):
        calls.append(1)
        return torch.mv(torch.ones(3, 4), x)  # shape mismatch: the kernel raises

    c = pf.compile(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)
        with pytest.raises(RuntimeError, match="size mismatch"):
            c(torch.randn(5))
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="size mismatch"):
        f(torch.randn(5))  # eager raises the same


def test_a_tracer_failure_still_falls_back_to_eager():
    # an exception raised inside torch's tracing machinery (simulated: code whose file is
    # under torch/fx/) is the tracer's, not the function's: the call runs eagerly
    ns: dict = {}
    exec(compile("def boom(active):\n    if active:\n        raise RuntimeError('tracer limitation')\n",
                 "/site-packages/torch/fx/_simulated.py", "exec"), ns)
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    calls = []

    def f(x):
        calls.append(1)
        ns["boom"](get_proxy_mode() is not None)
        return x * 2

    c = pf.compile(f)
    x = torch.randn(3)
    with pytest.warns(pf.PerformanceWarning, match="tracer limitation"):
        assert_close(c(x), x * 2)
    assert len(calls) == 2  # the failed trace and the eager run
    assert_close(c(x), x * 2)
    assert c.cache_info().eager_calls == 2
    with pytest.raises(RuntimeError, match="tracer limitation"):
        pf.compile(f, strict=True)(x)


# -- mode='reduce-overhead' -------------------------------------------------------------------


def test_reduce_overhead_on_cpu_falls_back_with_one_warning():
    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    c = pf.compile(pf.vmap(pf.grad(loss), in_dims=(None, 0)), mode="reduce-overhead")
    w = torch.randn(4, 3, dtype=DT)
    with pytest.warns(pf.PerformanceWarning, match="reduce-overhead.*CUDA"):
        c(w, torch.randn(5, 4, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            x = torch.randn(5, 4, dtype=DT)
            assert_close(c(w, x), tf.vmap(tf.grad(loss), in_dims=(None, 0))(w, x))
    assert c.cache_info().traces == 1


def test_mode_validation():
    with pytest.raises(ValueError, match="mode"):
        pf.compile(torch.sin, mode="max-speed")
    with pytest.raises(ValueError, match="reduce-overhead"):
        pf.compile(torch.sin, backend="aot_eager", mode="reduce-overhead")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reduce_overhead_cuda_graph_matches_eager():
    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    eager = pf.vmap(pf.grad(loss), in_dims=(None, 0))
    oracle = tf.vmap(tf.grad(loss), in_dims=(None, 0))
    c = pf.compile(eager, mode="reduce-overhead")
    w = torch.randn(4, 3, device="cuda", dtype=DT)
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)  # captured, no fallback
        for _ in range(5):  # trace, warm-up + capture, replays
            x = torch.randn(7, 4, device="cuda", dtype=DT)
            out = c(w, x)
            outs.append(out)
            assert_close(out, oracle(w, x))
    assert outs[-1].data_ptr() != outs[-2].data_ptr()  # outputs are not the static buffers
    (entry,) = c._cache.values()
    assert entry.run.graph is not None
    # in-place updates of an input reach the caller's tensor
    def bump(x):
        x.add_(1)
        return x.sin()

    cb = pf.compile(bump, mode="reduce-overhead")
    x = torch.zeros(3, device="cuda")
    for i in range(4):
        assert_close(cb(x), torch.full((3,), float(i + 1), device="cuda").sin())
    assert_close(x, torch.full((3,), 4.0, device="cuda"))
    # an output that is an input is returned as a copy that later calls do not overwrite
    ident = pf.compile(lambda x: x[1:], mode="reduce-overhead")
    xs = [torch.randn(4, device="cuda") for _ in range(4)]
    got = [ident(x) for x in xs]
    for x, g in zip(xs, got):
        assert_close(g, x[1:])
    # random ops draw fresh numbers on each CUDA-graph replay
    noise = pf.compile(lambda x: x + torch.randn_like(x), mode="reduce-overhead")
    z = torch.zeros(1000, device="cuda")
    draws = [noise(z) for _ in range(4)]
    assert not torch.equal(draws[2], draws[3]) and abs(float(draws[3].std()) - 1) < 0.2


# -- interop with torch.compile ---------------------------------------------------------------


def test_torch_compile_over_a_pyfunctorch_compiled_function():
    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).sum()

    psg = pf.compile(pf.vmap(pf.grad(loss), in_dims=(None, 0)))

    def step(w, x):
        return psg(w, x).mean(0) * 2

    compiled = torch.compile(step, backend="aot_eager")
    w = torch.randn(4, 3)
    for _ in range(3):
        x = torch.randn(5, 4)
        assert_close(compiled(w, x), tf.vmap(tf.grad(loss), in_dims=(None, 0))(w, x).mean(0) * 2)
    assert psg.cache_info().traces == 1  # our replay ran (dynamo graph-broke around it)


def test_pyfunctorch_compile_over_a_torch_compiled_module():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    tc = torch.compile(lin, backend="aot_eager")
    c = pf.compile(pf.vmap(pf.grad(lambda x: tc(x).pow(2).sum())))
    x = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.PerformanceWarning)  # traced, not an eager fallback
        for _ in range(2):
            assert_close(c(x), tf.vmap(tf.grad(lambda x: lin(x).pow(2).sum()))(x))
    assert c.cache_info().traces == 1


def test_public_names_of_the_compile_package():
    from pyfunctorch.compile import CacheInfo, CompiledFunction, compile as compile_fn

    assert pf.compile is compile_fn
    assert pf.compile.CompiledFunction is CompiledFunction and pf.compile.CacheInfo is CacheInfo
    c = pf.compile(torch.sin)
    assert isinstance(c, CompiledFunction) and isinstance(c.cache_info(), CacheInfo)
