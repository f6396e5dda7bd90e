"""The attacker suite: named variants, exact budgets, query averaging under jitter, noise-robust
losses against autograd-free references, the exact clone cache, and the posterior restorer."""

import math

import pytest
import torch

from mirage.api import InProcessAPI, clean_posteriors
from mirage.attacks import ATTACKER_SUITE, RestorerConfig, create_attack, variant_params
from mirage.attacks.base import QueryClient, jitter_images
from mirage.attacks.clone import (
    bootstrapped_cross_entropy,
    generalized_cross_entropy,
    train_clone,
)
from mirage.attacks.restorer import attacker_defense, public_params, restore_answers
from mirage.defenses import create_defense


def test_every_variant_builds_every_attack_and_explicit_params_override():
    for variant in ATTACKER_SUITE:
        for attack in ("knockoff", "jbda", "jb-top3", "knockoff-adaptive"):
            create_attack(attack, variant=variant)
    assert create_attack("knockoff", variant="averaging", repeats=5).params.repeats == 5
    assert create_attack("knockoff", variant="hard-label").params.hard_labels
    with pytest.raises(ValueError, match="unknown attacker variant"):
        variant_params("telepathy")
    with pytest.raises(ValueError, match="repeats"):
        create_attack("knockoff", jitter=0.1)  # jitter acts on repetitions only


@pytest.mark.parametrize("attack", ["knockoff", "jbda"])
def test_averaging_counts_every_query_and_sends_jittered_copies(
    victim, digits, clone_spec, attack, recording_api
):
    api = recording_api(victim, None)
    budget = 91  # not a multiple of 3: the last image that fits costs 3, the rest stays unspent
    extra = {"rounds": 1, "seed_size": 20, "substitute_epochs": 1} if attack == "jbda" else {}
    result = create_attack(attack, variant="averaging", **extra).run(
        api, budget, digits.train, clone_spec, seed=0
    )
    assert result.queries == api.queries_used <= budget
    assert result.queries % 3 == 0 and result.queries > budget - 3
    assert result.transfer_size == result.queries // 3
    first = api.asked[0].view(-1, 3, *digits.input_shape)
    # copy 0 is the image itself; copies 1 and 2 differ from it and from each other, stay in [0, 1]
    assert not torch.equal(first[:, 0], first[:, 1]) and not torch.equal(first[:, 1], first[:, 2])
    assert first.min() >= 0 and first.max() <= 1


def test_jitter_is_a_small_seeded_perturbation(digits):
    x = digits.train.images[:64]
    a = jitter_images(x, 0.02, torch.Generator().manual_seed(1))
    b = jitter_images(x, 0.02, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert 0 < (a - x).abs().mean() < 0.3


def test_averaged_answer_is_the_mean_of_the_three_served_rows(victim, digits, recording_api):
    defense = create_defense("random_noise", epsilon=1.0, seed=3)
    api = recording_api(victim, defense)
    client = QueryClient(
        api, 30, repeats=3, jitter=0.05, generator=torch.Generator().manual_seed(0)
    )
    x = digits.test.images[:10]
    averaged = client.query(x)
    sent = api.asked[0]
    replay = create_defense("random_noise", epsilon=1.0, seed=3)(
        sent, clean_posteriors(victim, sent)
    )
    torch.testing.assert_close(averaged, replay.view(10, 3, -1).mean(1))
    assert client.spent == 30 and client.remaining == 0


def _reference_gce(logits, targets, q):
    p = torch.softmax(logits.double(), 1)
    return float(
        sum(
            targets[i, k] * (1 - p[i, k] ** q) / q for i in range(len(p)) for k in range(p.shape[1])
        )
        / len(p)
    )


def test_generalized_cross_entropy_matches_its_definition_and_limits():
    logits, targets = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), 1)
    for q in (0.3, 0.7, 1.0):
        assert math.isclose(
            float(generalized_cross_entropy(logits, targets, q)),
            _reference_gce(logits, targets, q),
            rel_tol=1e-5,
        )
    ce = float(-(targets * torch.log_softmax(logits, 1)).sum(1).mean())
    assert math.isclose(float(generalized_cross_entropy(logits, targets, 1e-4)), ce, rel_tol=1e-3)
    # q = 1 is the mean absolute error on the probability of each target class
    p = torch.softmax(logits, 1)
    assert math.isclose(
        float(generalized_cross_entropy(logits, targets, 1.0)),
        float((targets * (1 - p)).sum(1).mean()),
        rel_tol=1e-5,
    )


def test_bootstrapped_loss_mixes_in_the_models_own_prediction_without_its_gradient():
    logits = torch.randn(6, 3, requires_grad=True)
    targets = torch.softmax(torch.randn(6, 3), 1)
    loss = bootstrapped_cross_entropy(logits, targets, 0.8)
    mixed = 0.8 * targets + 0.2 * torch.softmax(logits.detach(), 1)
    reference = -(mixed * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(loss, reference)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, (torch.softmax(logits, 1) - mixed).detach() / 6)


def test_robust_loss_reaches_the_clone_training(victim, digits, clone_spec):
    api = InProcessAPI(victim, None)
    result = create_attack("knockoff", variant="noise-robust").run(
        api, 200, digits.train, clone_spec, seed=0
    )
    assert result.countermeasures["robust_loss"] == "gce"
    plain = create_attack("knockoff").run(
        InProcessAPI(victim, None), 200, digits.train, clone_spec, seed=0
    )
    w_gce, w_ce = (next(r.clone.parameters()).detach() for r in (result, plain))
    assert not torch.equal(w_gce, w_ce)  # same data and seed, another loss


def test_clone_cache_replays_an_exact_transfer_set_and_only_that(tmp_path, digits, clone_spec):
    x = digits.train.images[:128]
    y = torch.nn.functional.one_hot(digits.train.labels[:128], 10).float()
    cached = clone_spec.model_copy(update={"cache": tmp_path})
    first, stats = train_clone(cached, x, y, 10, show_progress=False)
    again, stats_again = train_clone(cached, x, y, 10, show_progress=False)
    y2 = y.clone()
    y2[0] = torch.roll(y2[0], 1)
    _, stats_other = train_clone(cached, x, y2, 10, show_progress=False)
    assert not stats["from_cache"] and stats_again["from_cache"] and not stats_other["from_cache"]
    assert (
        stats["transfer_digest"] == stats_again["transfer_digest"] != stats_other["transfer_digest"]
    )
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # without the cache the same training gives the same weights: the cache changes nothing
    fresh, _ = train_clone(clone_spec, x, y, 10, show_progress=False)
    for a, b in zip(first.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_restorer_never_sees_the_defenders_secrets(victim, digits):
    params = {
        "epsilon": 0.5,
        "target": "unlearn",
        "surrogate": victim,
        "seed": 3,
        "reference_x": digits.train.images[:4],
        "preserve_top1": True,
    }
    assert public_params(params) == {"epsilon": 0.5, "target": "unlearn", "preserve_top1": True}
    defense = attacker_defense(
        "grad2", params, victim, victim, digits.train.images[:64], digits.train.labels[:64], seed=11
    )
    assert defense.params.surrogate is victim and defense.params.seed == 11
    own = digits.train.images[:64]
    assert defense.params.reference_x.shape[0] == 64  # its own images, in its own order
    assert torch.equal(defense.params.reference_x.sum(0), own.sum(0))
    with pytest.raises(ValueError, match="unknown defense"):
        attacker_defense(
            "telepathy",
            {},
            victim,
            victim,
            digits.train.images[:8],
            digits.train.labels[:8],
            seed=0,
        )


def test_the_restorer_simulates_a_density_capped_watermark_with_its_own_key_and_no_cap(
    victim, digits
):
    """It knows the watermark's public parameters but neither the key nor the defender's data:
    its simulation draws its own key and drops the cap (no reference images to judge it on)."""
    from mirage.ownership import WatermarkConfig, derive_key

    secret_key = derive_key(b"0123456789abcdef-server-secret", "alice")
    config = WatermarkConfig(bucket_fraction=1.0, density_cap=1e-4)
    params = {
        "key": secret_key,
        "client": "alice",
        "config": config.model_dump(),
        "benign_reference": digits.train.images,
    }
    assert set(public_params(params)) == {"client", "config"}
    defense = attacker_defense(
        "watermarked",
        public_params(params),
        victim,
        victim,
        digits.train.images[:64],
        digits.train.labels[:64],
        seed=5,
    )
    assert defense.params.key != secret_key and defense.params.benign_reference is None
    assert defense.params.config == (config.model_copy(update={"density_cap": None}),)
    probs = torch.softmax(torch.randn(64, 10), 1)
    assert torch.allclose(defense(digits.train.images[:64], probs).sum(1), torch.ones(64))


SMALL = RestorerConfig(shadows=2, shadow_epochs=15, pairs=600, epochs=60)


def _restore(victim, digits, clone_spec, defense_name, defense):
    x = digits.train.images[:1200]
    clean = clean_posteriors(victim, x)
    served = clean if defense is None else defense(x, clean)
    config = SMALL.model_copy(
        update={
            "defense": defense_name,
            "defense_params": {"epsilon": 1.0} if defense is not None else {},
        }
    )
    spec = clone_spec.model_copy(
        update={"training": clone_spec.training.model_copy(update={"lr": 0.05})}
    )
    restored, stats = restore_answers(config, spec, x, served, 10, seed=0)
    return clean, served, restored, stats


@pytest.mark.slow
def test_the_restorer_learns_the_identity_against_no_defense(victim, digits, clone_spec):
    clean, _, restored, stats = _restore(victim, digits, clone_spec, "none", None)
    assert stats["simulated_l1"] < 1e-6
    assert (restored.argmax(1) == clean.argmax(1)).float().mean() > 0.97
    assert float((restored - clean).abs().sum(1).mean()) < 0.25


@pytest.mark.slow
def test_the_restorer_undoes_part_of_random_noise(victim, digits, clone_spec):
    defense = create_defense("random_noise", epsilon=1.0, seed=5)
    clean, served, restored, stats = _restore(victim, digits, clone_spec, "random_noise", defense)
    before = float((served - clean).abs().sum(1).mean())
    after = float((restored - clean).abs().sum(1).mean())
    top1_before = float((served.argmax(1) == clean.argmax(1)).float().mean())
    top1_after = float((restored.argmax(1) == clean.argmax(1)).float().mean())
    assert stats["simulated_l1"] > 0.5
    assert after < 0.8 * before, (before, after)
    assert top1_after >= top1_before - 0.01, (top1_before, top1_after)


@pytest.mark.slow
def test_restorer_attack_runs_end_to_end_and_reports_its_cost(victim, digits, clone_spec):
    api = InProcessAPI(victim, create_defense("random_noise", epsilon=1.0))
    attack = create_attack(
        "knockoff",
        restorer=SMALL.model_copy(update={"defense": "random_noise", "pairs": 200, "epochs": 5}),
    )
    result = attack.run(api, 400, digits.train, clone_spec, seed=0)
    assert result.queries == 400  # restoring costs no queries
    assert result.history[-1]["restorer"]["pairs"] == 400
    with pytest.raises(ValueError, match="needs the defense"):
        create_attack("knockoff", variant="restorer").run(
            InProcessAPI(victim, None), 50, digits.train, clone_spec, seed=0
        )


def test_the_confident_only_attacker_trains_on_confident_answers_and_pays_for_all(
    victim, digits, clone_spec
):
    result = create_attack("knockoff", min_confidence=0.8).run(
        InProcessAPI(victim, None), 300, digits.train, clone_spec, seed=0
    )
    asked = digits.train.images[
        torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(0))[:300]
    ]
    confident = int((clean_posteriors(victim, asked).max(1).values >= 0.8).sum())
    assert result.queries == 300 and 0 < confident < 300
    assert result.history[-1]["kept_confident"] == confident
    with pytest.raises(ValueError, match="min_confidence"):
        create_attack("knockoff", min_confidence=1.0).run(
            InProcessAPI(victim, None), 50, digits.train, clone_spec, seed=0
        )
    assert ATTACKER_SUITE["confident-only"] == {"min_confidence": 0.9}


def test_the_restorer_simulates_gated_grad2_as_if_every_query_were_flagged(victim, digits):
    params = {
        "epsilon_low": 0.5,
        "epsilon_high": 2.0,
        "target": "unlearn",
        "tau": 7.3,
        "gate_score": "neg-energy",
        "gate_model": victim,
    }
    assert "tau" not in public_params(params) and "gate_model" not in public_params(params)
    defense = attacker_defense(
        "grad2_gated",
        params,
        victim,
        victim,
        digits.train.images[:64],
        digits.train.labels[:64],
        seed=1,
    )
    x = digits.train.images[:16]
    probs = clean_posteriors(victim, x)
    assert defense.attacker_like(x, probs).all() and defense.params.reference_x.shape[0] == 64
    assert torch.allclose(defense(x, probs).sum(1), torch.ones(16))
