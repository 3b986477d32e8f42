"""pyfunctorch is a drop-in for torch.func: the same script text, run once with
`from torch.func import ...` and once with `from pyfunctorch import ...`, gives the
same outputs.

The script follows PyTorch's torch.func tutorials (per-sample gradients, model
ensembling, Jacobians/Hessians/hvp) and the other public functions. Only the import
line differs between the two runs; every value it stores in `results` is compared.
"""

import warnings

import pytest
import torch

SCRIPT = '''
from LIBRARY import (vmap, grad, grad_and_value, vjp, jvp, linearize, jacrev, jacfwd,
                     hessian, functional_call, stack_module_state)
import copy
import torch
import torch.nn as nn
import torch.nn.functional as F

results = {}
torch.manual_seed(0)

# -- per-sample gradients (tutorial "Per-sample-gradients") ----------------------------
class SimpleCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)

model = SimpleCNN()
data = torch.randn(16, 1, 14, 14)
targets = torch.randint(10, (16,))
params = {k: v.detach() for k, v in model.named_parameters()}
buffers = {k: v.detach() for k, v in model.named_buffers()}

def compute_loss(params, buffers, sample, target):
    batch = sample.unsqueeze(0)
    targets = target.unsqueeze(0)
    predictions = functional_call(model, (params, buffers), (batch,))
    return F.nll_loss(predictions, targets)

ft_compute_grad = grad(compute_loss)
ft_compute_sample_grad = vmap(ft_compute_grad, in_dims=(None, None, 0, 0))
results["per_sample_grads"] = ft_compute_sample_grad(params, buffers, data, targets)
results["per_sample_grads_and_values"] = vmap(grad_and_value(compute_loss), in_dims=(None, None, 0, 0))(
    params, buffers, data, targets)

# -- model ensembling (tutorial "Model ensembling") ------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

num_models = 5
minibatches = torch.randn(num_models, 32, 1, 28, 28)
minibatch = minibatches[0]
models = [MLP() for _ in range(num_models)]
ens_params, ens_buffers = stack_module_state(models)
results["stacked_params"] = {k: v.detach() for k, v in ens_params.items()}
base_model = copy.deepcopy(models[0]).to("meta")

def fmodel(params, buffers, x):
    return functional_call(base_model, (params, buffers), (x,))

results["ensemble_different_minibatches"] = vmap(fmodel)(ens_params, ens_buffers, minibatches).detach()
results["ensemble_same_minibatch"] = vmap(fmodel, in_dims=(0, 0, None))(ens_params, ens_buffers, minibatch).detach()

def ens_loss(params, buffers, x, y):
    return F.cross_entropy(fmodel(params, buffers, x), y)

labels = torch.randint(10, (num_models, 32))
results["ensemble_grads"] = vmap(grad(ens_loss))(
    {k: v.detach() for k, v in ens_params.items()}, ens_buffers, minibatches, labels)

# -- Jacobians, Hessians, hvp, vmap (tutorial "Jacobians, Hessians, hvp, vhp, and more") --
def predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()

D = 16
weight = torch.randn(D, D)
bias = torch.randn(D)
x = torch.randn(D)
results["jacrev"] = jacrev(predict, argnums=2)(weight, bias, x)
results["jacfwd"] = jacfwd(predict, argnums=2)(weight, bias, x)
results["jacrev_argnums"] = jacrev(predict, argnums=(0, 1))(weight, bias, x)
results["jacfwd_argnums"] = jacfwd(predict, argnums=(0, 1))(weight, bias, x)

batch_size = 8
xs = torch.randn(batch_size, D)
results["batched_jacrev"] = vmap(jacrev(predict, argnums=2), in_dims=(None, None, 0))(weight, bias, xs)
results["jacrev_of_batch"] = jacrev(lambda w, b, xs: predict(w, b, xs).sum(0), argnums=2)(weight, bias, xs)
results["hessian"] = hessian(predict, argnums=2)(weight, bias, x)
results["jacfwd_jacrev"] = jacfwd(jacrev(predict, argnums=2), argnums=2)(weight, bias, x)
results["batched_hessian"] = vmap(hessian(predict, argnums=2), in_dims=(None, None, 0))(weight, bias, xs)

def f(x):
    return x.sin().sum()

v = torch.randn(D)

def hvp_fwdrev(f, primals, tangents):
    return jvp(grad(f), primals, tangents)[1]

def hvp_revrev(f, primals, tangents):
    _, vjp_fn = vjp(grad(f), *primals)
    return vjp_fn(*tangents)

results["hvp_fwdrev"] = hvp_fwdrev(f, (x,), (v,))
results["hvp_revrev"] = hvp_revrev(f, (x,), (v,))

# -- the rest of the API -----------------------------------------------------------------
def g(x, y):
    out = (x * y.exp()).sum()
    return out, {"aux": x.cos()}

y = torch.randn(D)
results["grad_argnums_aux"] = grad(g, argnums=(0, 1), has_aux=True)(x, y)
results["grad_and_value_aux"] = grad_and_value(g, has_aux=True)(x, y)
out, vjp_fn = vjp(lambda a, b: {"p": a * b, "s": a + b}, x, y)
results["vjp"] = (out, vjp_fn({"p": v, "s": torch.ones(D)}))
results["jvp"] = jvp(lambda a, b: (a * b).sin(), (x, y), (v, torch.ones(D)))
out, jvp_fn = linearize(lambda a: a.tanh() * 2, x)
results["linearize"] = (out, jvp_fn(v))
results["vmap_out_dims"] = vmap(lambda a: (a * 2, a.sum()), out_dims=(1, 0))(torch.randn(4, 3))
results["vmap_nested"] = vmap(vmap(torch.dot, in_dims=(None, 0)), in_dims=(0, None))(xs, torch.randn(5, D))
results["vmap_chunked"] = vmap(jacrev(predict, argnums=2), in_dims=(None, None, 0), chunk_size=3)(weight, bias, xs)
torch.manual_seed(1)
results["vmap_randomness_same"] = vmap(lambda a: a + torch.rand(()), randomness="same")(torch.zeros(4))
'''


def _run(library):
    ns = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(compile(SCRIPT.replace("LIBRARY", library), f"<dropin script: {library}>", "exec"), ns)
    return ns["results"]


@pytest.fixture(scope="module")
def both():
    return _run("torch.func"), _run("pyfunctorch")


def test_same_script_runs_with_either_import(both):
    reference, ours = both
    assert reference.keys() == ours.keys()


KEYS = [
    "per_sample_grads", "per_sample_grads_and_values", "stacked_params", "ensemble_different_minibatches",
    "ensemble_same_minibatch", "ensemble_grads", "jacrev", "jacfwd", "jacrev_argnums", "jacfwd_argnums",
    "batched_jacrev", "jacrev_of_batch", "hessian", "jacfwd_jacrev", "batched_hessian", "hvp_fwdrev",
    "hvp_revrev", "grad_argnums_aux", "grad_and_value_aux", "vjp", "jvp", "linearize", "vmap_out_dims",
    "vmap_nested", "vmap_chunked",
]


@pytest.mark.parametrize("key", KEYS)
def test_same_outputs(both, key):
    reference, ours = both
    # same structure (dicts, tuples), same shapes and dtypes, same values up to rounding
    torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5)


def test_randomness_same_is_shared_across_the_batch(both):
    # the random stream differs between implementations; the semantics do not
    for results in both:
        r = results["vmap_randomness_same"]
        assert r.shape == (4,) and torch.all(r == r[0])


def test_every_result_is_compared(both):
    assert set(both[0]) == set(KEYS) | {"vmap_randomness_same"}


def test_tutorial_script_takes_no_slow_path():
    """Every op of the tutorials has a batching rule: no per-example loop fallback."""
    from pyfunctorch import PerformanceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PerformanceWarning)
        _run("pyfunctorch")
    slow = [str(w.message) for w in caught if issubclass(w.category, PerformanceWarning)]
    assert slow == []
