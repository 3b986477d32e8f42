"""vmap's randomness flag: 'error' (default), 'different', 'same' -- torch.func's semantics."""

from __future__ import annotations

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F

import pyfunctorch as pf

from conftest import assert_close

B = 6


def _rows_distinct(t):
    """All B examples (dim 0) differ pairwise."""
    flat = t.reshape(t.shape[0], -1)
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            if torch.equal(flat[i], flat[j]):
                return False
    return True


def _rows_identical(t):
    flat = t.reshape(t.shape[0], -1)
    return all(torch.equal(flat[0], r) for r in flat[1:])


RANDOM_FNS = {
    # x is batched; each returns a tensor that depends on a random draw
    "randn_scalar": lambda x: x * 0 + torch.randn(()),
    "randn_shape": lambda x: x + torch.randn(x.shape),
    "rand_like_batched": lambda x: torch.rand_like(x),
    "randn_like_batched": lambda x: x + torch.randn_like(x),
    "dropout_batched": lambda x: F.dropout(x, p=0.5, training=True),
    "normal_inplace": lambda x: x.clone().normal_(),
    "uniform_inplace": lambda x: torch.empty_like(x).uniform_(),
    "bernoulli_batched_p": lambda x: torch.bernoulli(torch.full_like(x, 0.5)),
}


def _x():
    return torch.ones(B, 32)


# ----------------------------------------------------------------------------------------
# 'error'
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
@pytest.mark.parametrize("explicit", [False, True])
def test_randomness_error_is_default(name, explicit):
    f = RANDOM_FNS[name]
    v = pf.vmap(f, randomness="error") if explicit else pf.vmap(f)
    with pytest.raises(pf.RandomnessError, match=r"(?s)randomness.*different.*same") as ei:
        v(_x())
    assert isinstance(ei.value, RuntimeError)
    assert pf._core.interpreter_stack() == []


def test_no_error_for_dropout_in_eval_mode_or_p0():
    x = torch.randn(B, 5)
    assert_close(pf.vmap(lambda a: F.dropout(a, p=0.5, training=False))(x), x)
    assert_close(pf.vmap(lambda a: F.dropout(a, p=0.0, training=True))(x), x)


def test_random_ops_outside_vmap_unaffected():
    # a transform that is not vmap allows random ops; the draw is an ordinary one
    x = torch.randn(4, dtype=torch.float64)
    torch.manual_seed(3)
    g = pf.grad(lambda a: (a * torch.randn(4, dtype=torch.float64)).sum())(x)
    torch.manual_seed(3)
    assert_close(g, torch.randn(4, dtype=torch.float64))


# ----------------------------------------------------------------------------------------
# 'different' and 'same'
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
def test_randomness_different(name):
    f = RANDOM_FNS[name]
    out = pf.vmap(f, randomness="different")(_x())
    ref = tf.vmap(f, randomness="different")(_x())
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rows_distinct(out), out


# random ops whose *distribution parameters* are batched cannot share one draw (torch.func
# raises for them too)
SAME_UNSUPPORTED = {"bernoulli_batched_p"}


@pytest.mark.parametrize("name", sorted(set(RANDOM_FNS) - SAME_UNSUPPORTED))
def test_randomness_same(name):
    f = RANDOM_FNS[name]
    ref = tf.vmap(f, randomness="same")(_x())  # torch.func supports every one of these
    out = pf.vmap(f, randomness="same")(_x())
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rows_identical(out), out
    # and it is random: a second call differs
    out2 = pf.vmap(f, randomness="same")(_x())
    assert not torch.equal(out, out2)


@pytest.mark.parametrize("name", sorted(SAME_UNSUPPORTED))
def test_randomness_same_with_batched_distribution_parameters_raises(name):
    f = RANDOM_FNS[name]
    with pytest.raises(RuntimeError):
        tf.vmap(f, randomness="same")(_x())  # the oracle refuses too
    with pytest.raises(pf.RandomnessError, match="different"):
        pf.vmap(f, randomness="same")(_x())
    assert pf._core.interpreter_stack() == []


def test_randomness_same_with_unbatched_and_batched_mix():
    # 'same': the random part is shared, the batched part is not
    x = torch.arange(B, dtype=torch.float32)
    out = pf.vmap(lambda a: a + torch.randn(()), randomness="same")(x)
    noise = out - x
    assert torch.allclose(noise, noise[0].expand(B))


def test_randomness_different_scalar_draw_statistics():
    out = pf.vmap(lambda a: a * 0 + torch.randn(()), randomness="different")(torch.ones(2000))
    assert abs(out.mean().item()) < 0.15
    assert 0.85 < out.std().item() < 1.15


def test_dropout_different_masks_values_and_rate():
    x = torch.ones(B, 200)
    out = pf.vmap(lambda a: F.dropout(a, p=0.5, training=True), randomness="different")(x)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert _rows_distinct(out)
    rate = (out == 0).float().mean().item()
    assert 0.4 < rate < 0.6


def test_dropout_same_mask_on_different_inputs():
    x = torch.arange(1, B + 1, dtype=torch.float32)[:, None].expand(B, 50).contiguous()
    out = pf.vmap(lambda a: F.dropout(a, p=0.3, training=True), randomness="same")(x)
    masks = out != 0
    assert _rows_identical(masks)
    assert_close(out[masks.expand_as(out)], (x / 0.7)[masks.expand_as(out)])


def test_randomness_with_in_dims_nonzero():
    x = torch.ones(8, B)
    out = pf.vmap(lambda a: torch.rand_like(a), in_dims=1, randomness="different")(x)
    assert out.shape == (B, 8)
    assert _rows_distinct(out)


def test_randomness_chunked_different():
    out = pf.vmap(lambda a: a + torch.randn(()), randomness="different", chunk_size=2)(torch.zeros(B))
    assert len(set(out.tolist())) == B


# ----------------------------------------------------------------------------------------
# nested vmaps
# ----------------------------------------------------------------------------------------

NESTED = [
    ("different", "different"),
    ("same", "different"),
    ("different", "same"),
    ("same", "same"),
]


@pytest.mark.parametrize("outer,inner", NESTED)
@pytest.mark.parametrize("draw", ["randn_scalar", "rand_like_batched"])
def test_nested_vmap_randomness(outer, inner, draw):
    f = {"randn_scalar": lambda a: a * 0 + torch.randn(()), "rand_like_batched": lambda a: torch.rand_like(a)}[draw]
    x = torch.ones(3, 4, 5)
    out = pf.vmap(pf.vmap(f, randomness=inner), randomness=outer)(x)
    assert out.shape == (3, 4, 5)
    across_outer = out  # dim 0
    across_inner = out.transpose(0, 1)  # dim 1
    if outer == "different":
        assert _rows_distinct(across_outer)
    else:
        assert _rows_identical(across_outer)
    if inner == "different":
        assert _rows_distinct(across_inner)
    else:
        assert _rows_identical(across_inner)


def test_nested_outer_error_inner_different_raises():
    with pytest.raises(pf.RandomnessError, match="randomness"):
        pf.vmap(pf.vmap(lambda a: a + torch.randn(()), randomness="different"))(torch.ones(2, 3))


def test_nested_outer_different_inner_error_raises():
    with pytest.raises(pf.RandomnessError, match="randomness"):
        pf.vmap(pf.vmap(lambda a: a + torch.randn(())), randomness="different")(torch.ones(2, 3))


# ----------------------------------------------------------------------------------------
# randomness composed with grad
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["different", "same"])
def test_per_example_grad_through_dropout(mode):
    x = torch.randn(B, 30)
    g = pf.vmap(pf.grad(lambda a: F.dropout(a, p=0.5, training=True).sum()), randomness=mode)(x)
    assert set(g.unique().tolist()) <= {0.0, 2.0}
    if mode == "different":
        assert _rows_distinct(g)
    else:
        assert _rows_identical(g)
