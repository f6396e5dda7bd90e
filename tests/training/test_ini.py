"""InI (docs/design.md §ini): each loss term against an independent computation, PCGrad on
constructed gradients, and a tiny end-to-end run on scikit-learn digits through the registry
cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from mirage.data import load_dataset
from mirage.models import ImageClassifier, create_model, load_checkpoint
from mirage.scenarios import get_scenario
from mirage.training.ini import (
    INI_VICTIM_TRAINING,
    IniConfig,
    distance,
    ini_terms,
    patch_shuffle,
    pcgrad,
    victim_step,
    weighted_terms,
)
from mirage.training.registry import defended_victim_dir, get_defended_victim


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    victim = create_model("lenet", (1, 8, 8), 10, (0.3,), (0.38,))
    student = create_model("lenet", (1, 8, 8), 10, (0.3,), (0.38,))
    return victim, student


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, 1, 8, 8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        torch.rand(n, 1, 8, 8, generator=g),
    )


def test_distances_match_loops():
    v, s = torch.randn(5, 4), torch.randn(5, 4) + 3.0
    l1 = (
        sum(
            abs(
                (
                    math.log(torch.softmax(s[b], 0)[k])
                    - sum(math.log(q) for q in torch.softmax(s[b], 0)) / 4
                )
                - (
                    math.log(torch.softmax(v[b], 0)[k])
                    - sum(math.log(q) for q in torch.softmax(v[b], 0)) / 4
                )
            )
            for b in range(5)
            for k in range(4)
        )
        / 20
    )
    assert distance(v, s, "l1").item() == pytest.approx(float(l1), rel=1e-5)
    kl = (
        sum(
            float(p * (p.log() - q.log()))
            for b in range(5)
            for p, q in zip(torch.softmax(v[b], 0), torch.softmax(s[b], 0), strict=True)
        )
        / 5
    )
    assert distance(v, s, "kl").item() == pytest.approx(kl, rel=1e-5)
    assert distance(v, v + 7.0, "l1").item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    with pytest.raises(ValueError):
        distance(v, s, "l2")


def functional_reference(victim, student, x_in, y_in, x_ood, norm):
    """Terms as functions of θ_V via torch.func (grad of grad), independent of ini_terms."""
    s_params = {k: p.detach() for k, p in student.named_parameters()}
    v_buffers = dict(victim.named_buffers())
    s_buffers = dict(student.named_buffers())

    def s_logits(sp, x):
        return functional_call(student, {**sp, **s_buffers}, (x,))

    def v_logits(vp, x):
        return functional_call(victim, {**vp, **v_buffers}, (x,))

    def kl_s_v(sp, vp, x):  # KL(S‖V), mean over the batch, written out
        log_s = F.log_softmax(s_logits(sp, x), 1)
        log_v = F.log_softmax(v_logits(vp, x), 1)
        return (log_s.exp() * (log_s - log_v)).sum(1).mean()

    def flatten(d):
        return torch.cat([t.reshape(-1) for t in d.values()])

    g_ce = flatten(grad(lambda sp: F.cross_entropy(s_logits(sp, x_in), y_in))(s_params))

    def grad_cos(vp):
        g_kl = flatten(grad(kl_s_v)(s_params, vp, x_in))
        return (g_kl @ g_ce) / (g_kl.norm() * g_ce.norm())

    def grad_size(vp):
        g = flatten(grad(kl_s_v)(s_params, vp, x_ood))
        return g.abs().mean() if norm == "mean-abs" else g.norm()

    def benign(vp):
        return F.cross_entropy(v_logits(vp, x_in), y_in)

    def dist_ood(vp):
        return distance(v_logits(vp, x_ood), s_logits(s_params, x_ood), "l1")

    return {"grad_cos": grad_cos, "grad_norm": grad_size, "benign": benign, "dist_ood": dist_ood}


@pytest.mark.parametrize("norm", ["mean-abs", "l2"])
def test_terms_and_their_victim_gradients_match_torch_func_reference(norm):
    victim, student = tiny_pair()
    x_in, y_in, x_ood = batch()
    config = IniConfig(grad_norm=norm, beta=0.5)
    terms = ini_terms(victim, student, x_in, y_in, x_ood, config)
    reference = functional_reference(victim, student, x_in, y_in, x_ood, norm)
    v_params = {k: p.detach() for k, p in victim.named_parameters()}
    names = list(v_params)
    for term, fn in reference.items():
        value = fn(v_params)
        torch.testing.assert_close(terms[term], value, rtol=1e-4, atol=1e-7)
        expected = grad(fn)(v_params)
        got = torch.autograd.grad(
            terms[term],
            list(victim.parameters()),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for name, g in zip(names, got, strict=True):
            torch.testing.assert_close(
                g, expected[name], rtol=2e-3, atol=1e-8, msg=f"{term} / {name}"
            )
    assert -1.0 <= terms["grad_cos"].item() <= 1.0
    assert terms["grad_norm"].item() > 0


def test_weighted_terms_signs_and_zero_weights_skip_gradient_terms():
    victim, student = tiny_pair()
    x_in, y_in, x_ood = batch()
    config = IniConfig(beta=0.5, gamma=0.3, delta=0.0, epsilon_g=0.0)
    terms = ini_terms(victim, student, x_in, y_in, x_ood, config)
    assert terms["grad_cos"].item() == 0 and terms["grad_norm"].item() == 0
    weighted = weighted_terms(terms, config)
    assert set(weighted) == {"benign", "dist_in", "dist_ood"}
    torch.testing.assert_close(weighted["dist_in"], -0.5 * terms["dist_in"])
    torch.testing.assert_close(weighted["dist_ood"], 0.3 * terms["dist_ood"])


def test_pcgrad_on_constructed_conflicting_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1·g2 = −1: g1' = g1 + g2/2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); mean (0.25, 0.75)
    torch.testing.assert_close(pcgrad(g), torch.tensor([0.25, 0.75]))
    agreeing = torch.tensor([[1.0, 2.0], [0.5, 1.0], [3.0, 0.0]])
    torch.testing.assert_close(pcgrad(agreeing), agreeing.mean(0))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # two tasks: each projected gradient no longer conflicts with the other
        pair = torch.randn(2, 7, generator=gen)
        if pair[0] @ pair[1] >= 0:
            pair[1] = -pair[1]
        a = pair[0] - (pair[0] @ pair[1]) / pair[1].square().sum() * pair[1]
        b = pair[1] - (pair[1] @ pair[0]) / pair[0].square().sum() * pair[0]
        torch.testing.assert_close(pcgrad(pair), (a + b) / 2)
        assert abs(float(a @ pair[1])) < 1e-4 and abs(float(b @ pair[0])) < 1e-4
    with pytest.raises(ValueError):
        pcgrad(torch.zeros(3))


def test_patch_shuffle_permutes_patches_per_image():
    x = torch.rand(6, 2, 8, 8)
    out = patch_shuffle(x, 4, torch.Generator().manual_seed(0))
    for i in range(6):
        source = sorted(
            tuple(x[i, :, r : r + 2, c : c + 2].reshape(-1).tolist())
            for r in range(0, 8, 2)
            for c in range(0, 8, 2)
        )
        target = sorted(
            tuple(out[i, :, r : r + 2, c : c + 2].reshape(-1).tolist())
            for r in range(0, 8, 2)
            for c in range(0, 8, 2)
        )
        assert source == target
    assert not torch.equal(out, x)
    with pytest.raises(ValueError):
        patch_shuffle(torch.rand(1, 1, 9, 9), 4, torch.Generator())


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError):
        IniConfig(gamma=-1)
    with pytest.raises(ValueError):
        IniConfig(unknown=1)


def test_victim_step_without_pcgrad_is_a_clipped_step_on_the_summed_loss():
    victim, student = tiny_pair()
    x_in, y_in, x_ood = batch()
    config = IniConfig(
        pcgrad=False,
        max_grad_norm=0.5,
        beta=0.2,
        training=INI_VICTIM_TRAINING.model_copy(
            update={"momentum": 0.0, "weight_decay": 0.0, "lr": 0.1}
        ),
    )
    before = [p.detach().clone() for p in victim.parameters()]
    total = sum(
        weighted_terms(ini_terms(victim, student, x_in, y_in, x_ood, config), config).values()
    )
    grads = torch.autograd.grad(total, list(victim.parameters()))
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    scale = min(1.0, 0.5 / (float(norm) + 1e-6))
    optimizer = torch.optim.SGD(victim.parameters(), lr=0.1)
    victim_step(
        victim, student, optimizer, x_in, y_in, x_ood, config, torch.Generator().manual_seed(0)
    )
    for p, b, g in zip(victim.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), b - 0.1 * scale * g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.slow
def test_ini_victim_trains_caches_and_loads_as_plain_model(isolated_cache):
    scenario = get_scenario("digits")
    config = IniConfig(
        num_train=384,
        training=INI_VICTIM_TRAINING.model_copy(update={"epochs": 3, "batch_size": 32, "lr": 0.1}),
    )
    model, card, cached = get_defended_victim(scenario, "ini", config, show_progress=False)
    assert not cached and isinstance(model, ImageClassifier)
    assert card.training["defense"] == "ini" and len(card.training["history"]) == 3
    assert all(math.isfinite(v) for row in card.training["history"] for v in row.values())
    assert card.test_accuracy > 0.3  # 36 steps on 384 digits: well above chance (0.1)
    assert card.training["history"][1]["benign"] < card.training["history"][0]["benign"]
    directory = defended_victim_dir(scenario, "ini", config)
    loaded, _loaded_card = load_checkpoint(directory)
    assert type(loaded) is type(model)
    test = load_dataset("digits").test.images
    torch.testing.assert_close(loaded(test), model(test))
    _again, card2, cached2 = get_defended_victim(
        scenario, "ini", config.model_dump(), show_progress=False
    )
    assert cached2 and card2.test_accuracy == card.test_accuracy
    assert (
        defended_victim_dir(scenario, "ini", config.model_copy(update={"gamma": 0.1})) != directory
    )
    with pytest.raises(ValueError):
        get_defended_victim(scenario, "nope")


def test_a_killed_ini_training_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """Kill after the first of three epochs (the progress file is written, then the second epoch
    raises); a second call resumes from the file and must end bit-identical to one uninterrupted
    run, student, history and all, with the progress file's epoch count as its history."""
    from mirage.data.base import ImageData
    from mirage.training import ini as ini_module

    x, y, _ = batch(n=40, seed=3)
    train = ImageData(x, y)
    ood = batch(n=56, seed=4)[2]  # 4 OOD batches a cycle, 6 drawn an epoch: the cycle straddles
    config = IniConfig(
        training=INI_VICTIM_TRAINING.model_copy(update={"epochs": 3, "batch_size": 16}),
        patch_grid=2,
    )

    def run(progress_file=None, fail_in_epoch=None):
        victim, student = tiny_pair(seed=5)
        calls = {"n": 0}
        real_step = ini_module.victim_step

        def step(*args, **kwargs):
            calls["n"] += 1
            if fail_in_epoch is not None and calls["n"] > 3 * (fail_in_epoch - 1):
                raise KeyboardInterrupt
            return real_step(*args, **kwargs)

        ini_module.victim_step = step
        try:
            stats = ini_module.train_ini(
                victim,
                student,
                train,
                ood,
                config,
                ood_transform=True,
                show_progress=False,
                progress_file=progress_file,
            )
        finally:
            ini_module.victim_step = real_step
        return victim, student, stats

    reference_victim, reference_student, reference = run()
    progress = tmp_path / "ini-progress.pt"
    with pytest.raises(KeyboardInterrupt):
        run(progress, fail_in_epoch=2)
    assert len(torch.load(progress, weights_only=True)["history"]) == 1
    victim, student, resumed = run(progress)
    assert resumed["history"] == reference["history"]
    for model, expected in ((victim, reference_victim), (student, reference_student)):
        for (name, got), want in zip(
            model.state_dict().items(), expected.state_dict().values(), strict=True
        ):
            assert torch.equal(got, want), name
