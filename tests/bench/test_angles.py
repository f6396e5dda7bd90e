import torch

from mirage.bench.angles import angular_deviation
from mirage.models import create_model


def reference_angle(model, x, y, t):
    """Per-sample loop with plain autograd."""
    out = []
    for i in range(len(x)):
        grads = []
        for target in (y[i], t[i]):
            model.zero_grad()
            (target * torch.log_softmax(model(x[i : i + 1]), 1)[0]).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
        out.append(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))
    return torch.stack(out)


def test_matches_per_sample_autograd_and_is_zero_for_identical_answers():
    torch.manual_seed(0)
    model = create_model("lenet", (1, 8, 8), 5, [0.5], [0.5]).double()
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64)
    y = torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1)
    t = torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1)
    fast = angular_deviation(model, x, y, t, chunk=3)
    assert torch.allclose(fast, reference_angle(model, x, y, t), atol=1e-6)
    assert angular_deviation(model, x, y, y).abs().max() < 1e-3
