"""GRAD² scores a_ik = (1/N)⟨∇_θ log p_θ(k|x_i), v⟩: the fused JVP, the torch.func JVP and the
double-backward path against a slow per-sample, per-class autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mirage.defenses.grad2.scores import SCORE_METHODS, check_direction
from mirage.defenses.grad2.targets import all_ones, from_vector, max_norm, random_direction
from mirage.models import create_model


def reference_scores(model: nn.Module, x: torch.Tensor, v: dict) -> torch.Tensor:
    """One backward pass per (sample, class): obviously correct and slow."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        log_p = torch.log_softmax(model(x[i : i + 1]), dim=1)[0]
        row = []
        for k in range(len(log_p)):
            grads = torch.autograd.grad(
                log_p[k], list(params.values()), retain_graph=True, allow_unused=True
            )
            row.append(
                sum(
                    (g * v[name]).sum()
                    for name, g in zip(params, grads, strict=True)
                    if g is not None
                )
            )
        rows.append(torch.stack(row))
    return torch.stack(rows).detach() / len(x)


class Odd(nn.Module):
    """A network with layers the fused path does not special-case (falls back to torch.func)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 6),
        )

    def forward(self, x):
        return self.body(x)


def models():
    lenet = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,))
    odd = Odd()
    odd.body[1].running_mean.uniform_(-0.2, 0.2)
    odd.body[1].running_var.uniform_(0.5, 2)
    return {
        "lenet": lenet.eval(),
        "odd": odd.body.eval(),
    }  # Sequential: fused per layer, fallback inside


@pytest.mark.parametrize("name", ["lenet", "odd"])
@pytest.mark.parametrize("target", ["all-ones", "random", "max-norm", "vector"])
def test_all_score_paths_match_per_sample_reference(name, target):
    model = models()[name]
    x = torch.rand(5, 1, 8, 8)
    total = sum(p.numel() for p in model.parameters())
    v = {
        "all-ones": lambda: all_ones(model),
        "random": lambda: random_direction(model, 3),
        "max-norm": lambda: max_norm(model),
        "vector": lambda: from_vector(model, torch.randn(total)),
    }[target]()
    check_direction(model, v)
    expected = reference_scores(model, x, v)
    scale = expected.abs().max()
    for method, score in SCORE_METHODS.items():
        got = score(model, x, v)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5 * scale + 1e-7, rtol=1e-4, msg=method)


def test_tied_maxpool_follows_first_maximum_like_autograd():
    model = models()["lenet"]
    x = torch.zeros(3, 1, 8, 8)  # constant images: every pooling window is a tie
    v = random_direction(model, 1)
    torch.testing.assert_close(
        SCORE_METHODS["fused"](model, x, v), reference_scores(model, x, v), atol=1e-6, rtol=1e-4
    )


def test_direction_must_match_parameters():
    model = models()["lenet"]
    v = all_ones(model)
    v.pop(next(iter(v)))
    with pytest.raises(ValueError):
        check_direction(model, v)
    with pytest.raises(ValueError):
        from_vector(model, torch.ones(3))


@pytest.mark.parametrize("method", sorted(SCORE_METHODS))
def test_max_norm_scores_of_a_bias_free_relu_net_are_its_centred_logits_times_depth(method):
    """A bias-free ReLU/max-pool network is positively homogeneous of degree L (its weight
    layers) in θ, so along v = θ: d/dt log softmax f((1+t)θ) = L·(z − Σ_j p_j z_j). This is why
    max-norm — and the all-ones target, nearly
    (experiments/grad2_sharpening/grad2_target_geometry.py) — only sharpens the answers of such a
    network."""
    torch.manual_seed(0)
    model = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,)).eval()
    x = torch.rand(6, 1, 8, 8)
    model(x)  # materialise lazy layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    depth = sum(1 for name, _ in model.named_parameters() if name.endswith("weight"))
    with torch.no_grad():
        z = model(x)
    expected = depth * (z - (torch.softmax(z, 1) * z).sum(1, keepdim=True)) / len(x)
    got = SCORE_METHODS[method](model, x, max_norm(model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def production_models():
    """ResNet-18, ResNet-50 and a ViT at toy widths on 3×8×8: batch norm with moved running
    statistics, residual adds, layer norm, attention and GELU."""
    torch.manual_seed(0)
    nets = {
        "resnet18": create_model("resnet18", (3, 8, 8), 10, (0.5,) * 3, (0.3,) * 3, width=4),
        "resnet50": create_model("resnet50", (3, 8, 8), 10, (0.5,) * 3, (0.3,) * 3, width=2),
        "vit": create_model(
            "vit", (3, 8, 8), 10, (0.5,) * 3, (0.3,) * 3, patch=4, dim=16, depth=2, heads=2
        ),
    }
    for net in nets.values():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2)
    return {name: net.eval() for name, net in nets.items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit"])
@pytest.mark.parametrize("target", ["all-ones", "random"])
def test_score_paths_match_the_reference_on_resnets_and_a_vit(name, target):
    model = production_models()[name]
    x = torch.rand(3, 3, 8, 8)
    v = all_ones(model) if target == "all-ones" else random_direction(model, 3)
    expected = reference_scores(model, x, v)
    scale = expected.abs().max()
    for method, score in SCORE_METHODS.items():
        torch.testing.assert_close(
            score(model, x, v), expected, atol=1e-5 * scale + 1e-7, rtol=1e-4, msg=method
        )


class Tokens(nn.Module):
    """A linear layer on a sequence of tokens (B, T, D) with T equal to its output width: a bias
    added along the wrong axis would still broadcast, silently."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x.view(-1, 8, 8))).flatten(1))


@pytest.mark.parametrize("target", ["all-ones", "random"])
def test_a_linear_layer_on_tokens_adds_its_bias_along_the_features(target):
    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.rand(4, 1, 8, 8)
    v = all_ones(model) if target == "all-ones" else random_direction(model, 3)
    expected = reference_scores(model, x, v)
    for method, score in SCORE_METHODS.items():
        torch.testing.assert_close(score(model, x, v), expected, atol=1e-6, rtol=1e-4, msg=method)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit"])
def test_the_fused_path_has_a_rule_for_every_layer_and_call_of_resnets_and_a_vit(name, monkeypatch):
    """Batch norm, residual adds, layer norm, attention (matrix products, softmax, indexing) and
    GELU each have a fused rule: no call falls back to torch.func.jvp, and the scores still match
    the reference."""
    from mirage.defenses.grad2 import scores

    model = production_models()[name]
    x = torch.rand(3, 3, 8, 8)
    v = random_direction(model, 3)
    expected = reference_scores(model, x, v)

    def no_fallback(*args, **kwargs):
        raise AssertionError("a layer or call fell back to torch.func.jvp")

    monkeypatch.setattr(scores, "_jvp", no_fallback)
    got = scores.fused_jvp_scores(model, x, v)
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max() + 1e-7, rtol=1e-4)
