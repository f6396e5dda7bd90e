"""Every defense on a user's own ``nn.Module`` (not a mirage class; docs/design.md §any-module):
MAD's last layer found by a forward hook, GRAD²'s fused scores by walking the ``torch.fx`` graph,
each equal to the slow reference (autograd, ``torch.func.jvp``), and the whole registry runs."""

from __future__ import annotations

import factories
import pytest
import torch
import torch.nn.functional as F
from factories import FACTORIES
from torch import nn

from mirage.defenses import create_defense
from mirage.defenses.grad2 import scores
from mirage.defenses.grad2.scores import SCORE_METHODS, check_direction
from mirage.defenses.grad2.targets import all_ones, random_direction
from mirage.defenses.mad.defense import candidate_objective, move_to_vertex

K = 6


class Net(nn.Module):
    """LeNet-like, written as users write them: functional ReLU/pool, flatten, view, dropout."""

    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, k)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = x.view(x.size(0), -1)
        return self.fc2(F.dropout(F.relu(self.fc1(x)), p=0.2, training=self.training))


class Quirky(nn.Module):
    """Ops the fused path has no rule for (tanh, a residual add, a bare parameter, a scale):
    each one falls back to ``torch.func.jvp`` on that call alone."""

    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.head = nn.Linear(4 * 4 * 4, k)

    def forward(self, x):
        h = self.conv(x)
        h = torch.tanh(h) * self.gain + 0.5 * h
        h = F.avg_pool2d(h, 2).flatten(1)
        return self.head(h)


class Untraceable(Net):
    """Data-dependent control flow: ``torch.fx`` cannot trace it (the whole module takes jvp)."""

    def forward(self, x):
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


def sequential(k: int = K) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 12),
        nn.ReLU(),
        nn.Linear(12, k),
    )


def user_model(kind: str, k: int = K, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return (
        {"net": Net, "quirky": Quirky, "untraceable": Untraceable, "sequential": sequential}[kind](
            k
        )
        .to(dtype)
        .eval()
    )


def per_sample_scores(model, x, v):
    """One backward per (sample, class): the obviously right a_ik."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        log_p = torch.log_softmax(model(x[i : i + 1]), 1)[0]
        grads = [
            torch.autograd.grad(log_p[k], list(params.values()), retain_graph=True)
            for k in range(len(log_p))
        ]
        rows.append(
            torch.stack(
                [sum((g * v[n]).sum() for n, g in zip(params, gs, strict=True)) for gs in grads]
            )
        )
    return torch.stack(rows).detach() / len(x)


@pytest.mark.parametrize("kind", ["net", "quirky", "untraceable", "sequential"])
@pytest.mark.parametrize("target", ["all-ones", "random"])
def test_grad2_scores_on_user_modules_equal_jvp_and_autograd(kind, target):
    model = user_model(kind)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    v = all_ones(model) if target == "all-ones" else random_direction(model, 3)
    check_direction(model, v)
    fused = SCORE_METHODS["fused"](model, x, v)
    torch.testing.assert_close(fused, SCORE_METHODS["jvp"](model, x, v), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        fused, SCORE_METHODS["double-backward"](model, x, v), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(fused, per_sample_scores(model, x, v), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["net", "sequential"])
def test_grad2_fused_path_needs_no_generic_jvp_on_known_layers(kind, monkeypatch):
    model = user_model(kind)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    expected = SCORE_METHODS["jvp"](model, x, all_ones(model))

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path fell back to torch.func.jvp")

    monkeypatch.setattr(scores, "jvp", refuse)
    torch.testing.assert_close(
        SCORE_METHODS["fused"](model, x, all_ones(model)), expected, rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["net", "quirky", "sequential"])
def test_grad2_answers_on_user_modules_equal_the_jvp_route(kind):
    model = user_model(kind)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.softmax(3 * torch.randn(6, K, dtype=torch.float64), 1)
    fused = create_defense("grad2", epsilon=0.7, surrogate=model)(x, y)
    slow = create_defense("grad2", epsilon=0.7, surrogate=model, score_method="jvp")(x, y)
    torch.testing.assert_close(fused, slow, rtol=0, atol=1e-9)


def reference_last_gram(model, x, weight):
    """G Gᵀ with G = ∂ log p/∂W of the final linear layer, one autograd.grad per class."""
    grams = []
    for i in range(len(x)):
        log_p = torch.log_softmax(model(x[i : i + 1]), 1)[0]
        G = torch.stack(
            [
                torch.autograd.grad(log_p[k], weight, retain_graph=True)[0].flatten()
                for k in range(len(log_p))
            ]
        )
        grams.append(G @ G.T)
    return torch.stack(grams)


@pytest.mark.parametrize("kind, head", [("net", "fc2"), ("quirky", "head"), ("sequential", "6")])
@pytest.mark.parametrize("named", [False, True])
def test_mad_last_layer_on_user_modules_equals_autograd(kind, head, named):
    model = user_model(kind)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    y = torch.softmax(3 * torch.randn(4, K, dtype=torch.float64), 1)
    mad = create_defense("mad", epsilon=0.6, surrogate=model, head=head if named else None)
    reference = reference_last_gram(model, x, model.get_submodule(head).weight)
    torch.testing.assert_close(mad.gram(x, y), reference, rtol=1e-9, atol=1e-12)
    vertex = candidate_objective(
        reference, y, torch.eye(K, dtype=y.dtype).expand(4, K, K), "cosine"
    ).argmax(1)
    torch.testing.assert_close(
        mad(x, y), move_to_vertex(y, vertex, mad.vertex_step(y, vertex)), rtol=0, atol=1e-12
    )


def test_mad_all_layers_on_a_user_module_equals_autograd():
    model = user_model("net")
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.softmax(torch.randn(3, K, dtype=torch.float64), 1)
    params = list(model.parameters())
    grams = []
    for i in range(3):
        log_p = torch.log_softmax(model(x[i : i + 1]), 1)[0]
        G = torch.stack(
            [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(log_p[k], params, retain_graph=True)]
                )
                for k in range(K)
            ]
        )
        grams.append(G @ G.T)
    mad = create_defense("mad", epsilon=0.6, surrogate=model, layers="all")
    torch.testing.assert_close(mad.gram(x, y), torch.stack(grams), rtol=1e-8, atol=1e-10)


class Scaled(Net):
    def forward(self, x):
        return 2 * super().forward(x)


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, K, 8)

    def forward(self, x):
        return self.conv(x).flatten(1)


@pytest.mark.parametrize(
    "model, head, message",
    [
        (NoLinear(), None, "has none"),
        (Scaled(), None, "not the model's logits"),
        (Net(), "conv1", "must name an nn.Linear"),
        (Net(), "nope", "no such module"),
    ],
)
def test_mad_last_layer_says_clearly_when_there_is_no_head(model, head, message):
    mad = create_defense("mad", epsilon=0.5, surrogate=model.eval(), head=head)
    with pytest.raises(ValueError, match=message):
        mad(torch.rand(2, 1, 8, 8), torch.full((2, K), 1 / K))


@pytest.mark.parametrize("key", sorted(FACTORIES))
@pytest.mark.parametrize("kind", ["net", "sequential"])
def test_every_registered_defense_runs_on_a_user_module(key, kind, monkeypatch):
    monkeypatch.setattr(
        factories, "tiny_model", lambda k, seed=0: user_model(kind, k, seed, torch.float32)
    )
    victim = user_model(kind, K, 9, torch.float32)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        probs = torch.softmax(victim(x), 1)
    served = FACTORIES[key](K)(x, probs)  # Defense.__call__ checks simplex and budget
    assert served.shape == probs.shape


class InPlace(Net):
    """An in-place update of an activation (taken by ``torch.func.jvp`` on that call)."""

    def forward(self, x):
        h = self.conv1(x)
        h.mul_(1.5)
        x = F.max_pool2d(F.relu(h), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@pytest.mark.parametrize("walk_fails", [False, True])
def test_a_graph_the_walk_cannot_take_falls_back_to_jvp_on_the_module(
    walk_fails, monkeypatch, caplog
):
    torch.manual_seed(0)
    model = InPlace().double().eval()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    v = random_direction(model, 1)
    if walk_fails:

        def fail(*args, **kwargs):
            raise RuntimeError("no rule")

        monkeypatch.setattr(scores, "_call_jvp", fail)
    torch.testing.assert_close(
        SCORE_METHODS["fused"](model, x, v), per_sample_scores(model, x, v), rtol=1e-9, atol=1e-12
    )
    assert ("cannot be walked" in caplog.text) == walk_fails
    assert (scores._graph_of(model) is None) == walk_fails
