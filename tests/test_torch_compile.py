"""torch.compile around pyfunctorch transforms: correct, no recompiles, no warnings.

The transforms are opaque to dynamo (``_compiler.opaque_to_compiler``): each one is a graph
break that runs eagerly, so dynamo never guards on per-call state such as the level
counter. Oracle: torch.func (and plain eager pyfunctorch is never the oracle).
"""

import warnings

import pytest
import torch
import torch.func

import pyfunctorch

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _loss(w, x):
    return torch.tanh(x @ w).sum()


def _calls_without_compiling(fn, *args, n=5):
    """Run ``fn`` n times; return the outputs and the dynamo frames compiled meanwhile."""
    counters.clear()
    outs = [fn(*args) for _ in range(n)]
    return outs, sum(counters["frames"].values()) if "frames" in counters else 0


def test_compile_vmap_grad_matches_torch_func_and_never_recompiles():
    w, x = torch.randn(8, 4, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    expected = torch.func.vmap(torch.func.grad(_loss), in_dims=(None, 0))(w, x)
    compiled = torch.compile(pyfunctorch.vmap(pyfunctorch.grad(_loss), in_dims=(None, 0)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compiled(w, x)
        outs, frames = _calls_without_compiling(compiled, w, x)
    assert [str(c.message) for c in caught] == []
    torch.testing.assert_close(first, expected)
    for out in outs:
        torch.testing.assert_close(out, expected)
    assert frames == 0, dict(counters["frames"])
    assert "recompiles" not in counters or not counters["recompiles"]


@pytest.mark.parametrize("which", ["inside", "jacrev", "hessian", "vjp", "jvp"])
def test_transforms_called_inside_a_compiled_function(which):
    w, x = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    if which == "inside":
        def run(lib, w, x):
            return lib.vmap(lib.grad(_loss), in_dims=(None, 0))(w, x) * 2 + 1
    elif which == "jacrev":
        def run(lib, w, x):
            return lib.jacrev(lambda w: torch.sin(x @ w))(w).cos()
    elif which == "hessian":
        def run(lib, w, x):
            return lib.hessian(_loss)(w, x)
    elif which == "vjp":
        def run(lib, w, x):
            out, fn = lib.vjp(lambda w: torch.sin(x @ w), w)
            return fn(torch.ones_like(out))[0] + out.sum()
    else:
        def run(lib, w, x):
            return lib.jvp(lambda w: torch.sin(x @ w), (w,), (torch.ones_like(w),))[1]
    expected = run(torch.func, w, x)
    compiled = torch.compile(lambda w, x: run(pyfunctorch, w, x), backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(w, x), expected)
        outs, frames = _calls_without_compiling(compiled, w, x)
    assert [str(c.message) for c in caught] == []
    for out in outs:
        torch.testing.assert_close(out, expected)
    assert frames == 0, dict(counters["frames"])


def test_eager_calls_unaffected_by_compile_marker():
    # outside torch.compile the entry point is the plain function (one extra Python call)
    x = torch.randn(3, 4)
    torch.testing.assert_close(pyfunctorch.vmap(pyfunctorch.grad(lambda v: v.sin().sum()))(x), x.cos())


@pytest.mark.parametrize("where", ["outermost", "inside"])
def test_torch_compile_of_pyfunctorch_compile(where):
    # pyfunctorch.compile traces and replays by itself; under torch.compile it is one opaque call
    x = torch.randn(4, 3, dtype=torch.float64)
    f = lambda v: (v.sin() * 2).sum()  # noqa: E731
    expected = torch.func.vmap(torch.func.grad(f))(x)
    traced = pyfunctorch.compile(pyfunctorch.vmap(pyfunctorch.grad(f)))
    fn = torch.compile(traced if where == "outermost" else (lambda v: traced(v) + 1), backend="eager")
    shift = 0 if where == "outermost" else 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(fn(x), expected + shift)
        outs, frames = _calls_without_compiling(fn, x)
    assert [str(c.message) for c in caught] == []
    for out in outs:
        torch.testing.assert_close(out, expected + shift)
    assert frames == 0, dict(counters["frames"])
    assert traced.cache_info().traces == 1


def test_torch_compile_inside_hold_entry_points():
    # the held wrappers stand in for torch.zeros / Tensor.clone / torch.randn: dynamo traces
    # through them and the compiled code computes what torch's functions compute
    def g(x):
        return torch.zeros(3) + x.clone().sin() * torch.ones(3)

    x = torch.randn(3)
    with pyfunctorch.hold_entry_points():
        pyfunctorch.vmap(torch.sin)(torch.randn(2, 3))
        fn = torch.compile(g, backend="eager")
        torch.testing.assert_close(fn(x), x.sin())
        torch.testing.assert_close(fn(x + 1), (x + 1).sin())
        # a transform inside the compiled function, with the entry points held around it
        h = torch.compile(lambda v: pyfunctorch.vmap(lambda r: r.cos() + torch.zeros(()))(v), backend="eager")
        v = torch.randn(4, 3)
        torch.testing.assert_close(h(v), v.cos())
