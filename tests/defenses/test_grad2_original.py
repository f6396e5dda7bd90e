"""GRAD² (all-ones target) against the faithful re-implementation of the original code path
(``tests/oracles/grad2_original.py``: double backward per batch and a per-row greedy loop): the
served posteriors agree."""

import pytest
import torch

from mirage.defenses import create_defense
from mirage.models import create_model

from oracles.grad2_original import original_grad2


@pytest.mark.parametrize("epsilon", [0.25, 0.5, 1.0])
def test_grad2_serves_what_the_original_code_serves(epsilon):
    shape = (1, 28, 28)
    torch.manual_seed(0)
    victim = create_model("lenet", shape, 10, (0.5,), (0.25,)).eval()
    with torch.no_grad():  # peaked posteriors, like a trained victim's
        victim.classifier.weight.mul_(20)
    surrogate = create_model("lenet", shape, 10, (0.5,), (0.25,)).eval()
    x = torch.rand(40, *shape)  # more than one of the original's batches of 32
    grad2 = create_defense("grad2", epsilon=epsilon, surrogate=surrogate)
    v_flat = torch.ones(sum(p.numel() for p in surrogate.parameters()))
    with torch.no_grad():
        probs = torch.softmax(victim(x), dim=1)
    served = grad2(x, probs)
    assert not torch.allclose(served, probs, atol=1e-3)  # the redirection did something
    torch.testing.assert_close(
        served, original_grad2(x, victim, surrogate, v_flat, epsilon), atol=1e-5, rtol=0
    )
