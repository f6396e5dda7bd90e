"""One property suite over every registered defense (docs/design.md §defense-contract): simplex
(sub-simplex when truncating), budget, top-1 when promised, determinism, and clear errors for
invalid input."""

import pytest
import torch
from factories import FACTORIES, INPUT_SHAPE, registered_name
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirage.defenses import list_defenses
from mirage.defenses.base import strict_top1_kept

PROPERTY_SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_every_registered_defense_has_a_factory():
    covered = {registered_name(key) for key in FACTORIES}
    missing = set(list_defenses()) - covered
    assert not missing, f"add these defenses to tests/defenses/factories.py: {sorted(missing)}"


@st.composite
def batches(draw):
    b = draw(st.integers(1, 6))
    k = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**16))
    temperature = draw(st.sampled_from([0.3, 1.0, 3.0, 10.0]))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, generator=generator, dtype=torch.float64) * temperature
    probs = torch.softmax(logits, dim=1)
    if draw(st.booleans()):  # a one-hot row: the corner of the simplex
        probs[0] = torch.nn.functional.one_hot(torch.tensor(seed % k), k).double()
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    x = torch.rand(b, *INPUT_SHAPE, generator=generator)
    return x, probs.to(dtype)


def _distance(clean, served, norm):
    if norm == "l1":
        return (served - clean).abs().sum(1)
    if norm == "l2":
        return ((served - clean) ** 2).sum(1).sqrt()
    assert norm == "kl", norm
    terms = torch.where(clean > 0, clean * (clean.log() - served.log()), torch.zeros_like(clean))
    return terms.sum(1)


@pytest.mark.parametrize("key", sorted(FACTORIES))
@PROPERTY_SETTINGS
@given(batch=batches())
def test_output_contract(key, batch):
    x, probs = batch
    defense = FACTORIES[key](probs.shape[1])
    served = defense(x, probs)
    atol = 1e-5 if probs.dtype == torch.float32 else 1e-6
    assert served.shape == probs.shape and served.dtype == probs.dtype
    assert torch.isfinite(served).all() and (served >= -atol).all()
    sums = served.sum(dim=1)
    contract = defense.contract
    if contract.truncating:
        assert (sums <= 1 + atol).all()
    else:
        assert torch.allclose(sums, torch.ones_like(sums), atol=atol)
    if contract.budget is not None:
        assert (
            _distance(probs.double(), served.double(), contract.norm) <= contract.budget + atol
        ).all()
    if contract.keeps_top1:
        assert strict_top1_kept(probs, served).all()


@pytest.mark.parametrize("key", sorted(FACTORIES))
@PROPERTY_SETTINGS
@given(batch=batches())
def test_deterministic_under_a_seed(key, batch):
    x, probs = batch
    first = FACTORIES[key](probs.shape[1])(x, probs)
    second = FACTORIES[key](probs.shape[1])(x, probs)
    assert torch.equal(first, second)


def _invalid_inputs(k: int):
    good = torch.softmax(torch.randn(3, k), dim=1)
    nan = good.clone()
    nan[1, 0] = float("nan")
    negative = good.clone()
    negative[0, 0] = -0.2
    negative[0, 1] += 0.2
    return {
        "nan": nan,
        "negative": negative,
        "unnormalised": good * 1.5,
        "one-dimensional": good[0],
        "three-dimensional": good.unsqueeze(0),
        "empty": good[:0],
        "infinite": good.clone().fill_(float("inf")),
    }


@pytest.mark.parametrize("key", sorted(FACTORIES))
@pytest.mark.parametrize("case", sorted(_invalid_inputs(4)))
def test_invalid_input_is_a_clear_value_error(key, case):
    k = 4
    probs = _invalid_inputs(k)[case]
    rows = probs.shape[0] if probs.ndim == 2 else 3
    x = torch.rand(max(rows, 1), *INPUT_SHAPE)[:rows]
    with pytest.raises(ValueError):
        FACTORIES[key](k)(x, probs)
