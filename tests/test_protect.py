"""``mirage.protect`` and the top-level exports (docs/design.md §protect)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mirage
from mirage.models import create_model, save_checkpoint


class Net(nn.Module):
    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, k)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def test_import_mirage_loads_nothing_heavy():
    code = (
        "import sys, mirage; "
        "print(sorted(m for m in ('torch', 'mirage.defenses', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_export_resolves():
    for name in mirage.__all__:
        assert getattr(mirage, name) is not None, name
    assert callable(mirage.protect) and callable(mirage.bench.evaluate)
    with pytest.raises(AttributeError):
        _ = mirage.no_such_thing


@pytest.mark.parametrize(
    "defense, params",
    [
        ("grad2", {"epsilon": 0.5}),
        ("grad2", {"epsilon": 0.5, "preserve_top1": True}),
        ("mad", {"epsilon": 0.4}),
        ("reverse_sigmoid", {}),
        ("top_k", {"k": 3}),
    ],
)
@pytest.mark.slow
def test_protect_answers_as_the_defense_does_on_a_users_module(defense, params):
    model, surrogate = net(0), net(1)
    x = torch.rand(9, 1, 8, 8)
    parts = {"surrogate": surrogate} if defense in ("grad2", "mad") else {}
    api = mirage.protect(model, defense, batch_size=4, **params, **parts)
    expected = torch.cat(
        [
            mirage.create_defense(defense, **params, **parts)(chunk, torch.softmax(model(chunk), 1))
            for chunk in x.split(4)
        ]
    ).detach()
    torch.testing.assert_close(api.predict(x), expected)
    torch.testing.assert_close(api(x), expected)
    torch.testing.assert_close(api.clean(x), torch.softmax(model(x), 1).detach())


def test_protect_takes_a_surrogate_checkpoint_path_a_preprocess_and_a_plain_callable(
    tmp_path, digits_lenet
):
    surrogate, card = digits_lenet(seed=3)
    path = save_checkpoint(surrogate, card, tmp_path / "surrogate")
    model = net(0)

    def callable_model(x):  # not an nn.Module: the defense needs probabilities only
        return model(x)

    def preprocess(images):  # (B, H, W) uint8 -> (B, 1, H, W) in [0, 1]
        return torch.as_tensor(images).float().div(255).unsqueeze(1)

    raw = torch.randint(0, 256, (5, 8, 8), dtype=torch.uint8)
    api = mirage.protect(
        callable_model, "grad2", epsilon=0.6, surrogate=str(path), preprocess=preprocess
    )
    x = preprocess(raw)
    expected = mirage.create_defense("grad2", epsilon=0.6, surrogate=surrogate)(
        x, torch.softmax(model(x), 1).detach()
    )
    torch.testing.assert_close(api.predict(raw), expected)
    built = mirage.create_defense("mad", epsilon=0.3, surrogate=surrogate)
    assert mirage.protect(model, built).defense is built


def test_protect_says_what_is_missing():
    with pytest.raises(ValueError, match="grad2 needs a surrogate"):
        mirage.protect(net(0), "grad2", epsilon=0.5)
    with pytest.raises(ValueError, match="training-time"):
        mirage.protect(net(0), "dpsgd")
    with pytest.raises(ValueError, match="no parameters"):
        mirage.protect(net(0), "mad", epsilon=0.5, nonsense=1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        mirage.protect(net(0), "none").predict(torch.rand(8, 8))
    with pytest.raises(TypeError, match="not both"):
        mirage.protect(net(0), mirage.create_defense("none"), epsilon=0.1)


@pytest.mark.slow
def test_bench_evaluate_runs_one_protocol_run_on_a_defense_instance(isolated_cache):
    from mirage.models.fit import TrainConfig

    fast = TrainConfig(epochs=1, batch_size=64)
    clean = mirage.bench.evaluate(
        None, scenario="digits", attack="knockoff", budget=150, clone_training=fast, eval_size=100
    )
    assert clean.queries == 150 and clean.defender_l1 == 0.0
    assert (
        clean.defender_accuracy == pytest.approx(clean.victim_accuracy)
        and clean.victim_accuracy > 0.5
    )
    noisy = mirage.bench.evaluate(
        mirage.create_defense("random_noise", epsilon=0.8, seed=1),
        scenario="digits",
        attack="knockoff",
        budget=150,
        clone_training=fast,
        eval_size=100,
    )
    assert noisy.effective_l1 == pytest.approx(
        0.8, abs=0.02
    ) and noisy.defender_l1 == pytest.approx(0.8, abs=0.02)
    assert 0 <= noisy.clone_accuracy <= 1 and noisy.as_dict()["queries"] == 150


def test_a_missing_part_names_the_parameters_that_fill_it():
    """GRAD² unlearn without a scenario: the error names reference_x/reference_y, not only
    scenarios."""

    model = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"reference_x=.*reference_y="):
        mirage.protect(model, "grad2", epsilon=0.5, target="unlearn", surrogate=model)


def test_bench_evaluate_on_a_given_victim_neither_loads_nor_trains_the_scenarios(
    isolated_cache, digits_lenet
):
    from mirage.models.fit import TrainConfig

    victim, card = digits_lenet(seed=0)
    with pytest.raises(ValueError, match="needs its card"):
        mirage.bench.evaluate(None, scenario="digits", victim=victim)
    result = mirage.bench.evaluate(
        mirage.create_defense("random_noise", epsilon=0.5, seed=1),
        scenario="digits",
        budget=100,
        clone_training=TrainConfig(epochs=1, batch_size=64),
        victim=victim,
        card=card,
    )
    assert result.queries == 100 and result.effective_l1 == pytest.approx(0.5, abs=0.02)
    assert not (isolated_cache / "victims").exists()  # the scenario's victim was never trained
