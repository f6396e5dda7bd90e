"""The posterior restorer: undo a known defense before training the clone (D-DAE-style).

Chen et al. ("D-DAE: Defense-Penetrating Model Extraction Attacks", IEEE S&P 2023) observe that a
perturbation defense is a fixed, public algorithm whose only secrets are its parts — so under
Kerckhoffs' principle the attacker can *simulate* it: train shadow victims of its own, serve them
through the same defense type, and learn a generative model that maps perturbed answers back to
clean ones. The clone is then trained on restored answers.

What mirage's attacker knows and builds (``RestorerConfig``):

* **knows** the defense's registered name and its public parameters (budget ε, target, τ, β,
  top-1 preservation) — never the defender's surrogate, reference set, detectors, seeds or keys;
* **shadow victims**: ``shadows`` models with the clone's architecture, each trained for
  ``shadow_epochs`` on a random half of the attacker's own transfer set, on the served answers
  themselves (the attacker has no other labels: in ``mnist`` its pool is Fashion-MNIST; the
  argmax of a label-flipping defense's answers would teach the shadow the defense's noise, while
  the soft answers average it out over images). A shadow need not equal the victim; it must only
  produce realistic clean posteriors for the defense to act on;
* **its own defense parts**: a surrogate distilled from the shadow and stopped after
  ``surrogate_epochs`` (as the defender's GRAD² / MAD surrogate is), its own reference set (512
  of its images with the shadow's labels) for GRAD²'s ``unlearn`` target, the shadow itself as
  adaptive misinformation's OOD scorer and a misinformation model trained for one epoch on
  −log(1 − p_y), its own seeds;
* **calibration**: a shadow is much less confident than the victim after a few epochs, so its
  logits are divided by the temperature at which its simulated answers look like the real ones
  (mean top probability; :func:`matched_temperature`) — a statistic of what the attacker sees;
* **the restorer**: a residual two-hidden-layer MLP from log ỹ (and, with ``features``, the logits
  of a *different* shadow on the same image — the image features; never the shadow being restored,
  whose logits would give the answer away) to the clean posterior, trained with the soft
  cross-entropy on ``pairs`` (perturbed, clean) pairs per shadow drawn from the half that shadow did
  not train on.

Cut for two CPU cores, against the paper: no meta-classifier detecting *which* defense is on
(the attacker is told), an MLP instead of a generative model, two shadows of five epochs instead
of many converged ones. Costs no queries: everything runs on the answers already bought.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mirage.attacks.clone import CloneSpec, train_clone, training_targets
from mirage.attacks.countermeasures import RestorerConfig
from mirage.defenses import DEFENSES, Defense, create_defense
from mirage.models.fit import GRAD2_RECIPE, TrainConfig, fit, soft_cross_entropy
from mirage.ownership import watermark_layers
from mirage.training.outlier_exposure import train_misinformation

log = logging.getLogger(__name__)

SECRET_PARAMS = frozenset(
    {
        "surrogate",
        "surrogate_config",
        "reference",
        "reference_x",
        "reference_y",
        "watermark_x",
        "watermark_y",
        "watermark",
        "target_vector",
        "seed",
        "oe_model",
        "misinformation_model",
        "models_config",
        "tau",
        "gate_model",
        "key",
        "evidence",
        "benign_reference",
    }
)
"""Parameters the attacker never learns: it builds its own (or takes the defaults)."""

REFERENCE_SIZE = 512


def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """What the attacker may know of a defense's parameters: everything but its secrets."""
    return {k: v for k, v in params.items() if k not in SECRET_PARAMS}


def tell_restorer(
    attack_params: dict[str, Any], defense: str, defense_params: dict[str, Any]
) -> dict[str, Any]:
    """``attack_params`` with what a Kerckhoffs attacker knows filled in: a ``restorer`` that
    names no defense is told ``defense`` and its public parameters (never its secrets)."""
    params = dict(attack_params)
    restorer = params.get("restorer")
    if isinstance(restorer, RestorerConfig):
        restorer = restorer.model_dump()
    if restorer is not None and restorer.get("defense") is None:
        params["restorer"] = {
            **restorer,
            "defense": defense,
            "defense_params": public_params(defense_params),
        }
    return params


def attacker_defense(
    name: str,
    params: dict[str, Any],
    shadow: nn.Module,
    surrogate: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    seed: int,
    fresh_model: Callable[[], nn.Module] | None = None,
) -> Defense:
    """The defense ``name`` with public ``params``, its secret parts replaced by the attacker's:
    ``surrogate`` for GRAD² and MAD, ``images``/``labels`` (the shadow's) as reference or
    behaviour sets, ``shadow`` as the OOD scorer, ``seed`` for every random choice;
    ``fresh_model()`` builds the misinformation model adaptive misinformation needs."""
    if name not in DEFENSES:
        raise ValueError(f"the restorer cannot simulate unknown defense {name!r}")
    fields = DEFENSES[name].params.model_fields
    built = public_params(params)
    generator = torch.Generator().manual_seed(seed)
    if "surrogate" in fields:
        built["surrogate"] = surrogate
    if "seed" in fields:
        built["seed"] = seed
    pick = torch.randperm(len(images), generator=generator)[:REFERENCE_SIZE]
    target = built.get("target")
    grad2_family = name in ("grad2", "grad2_gated")
    if name == "grad2_gated":
        # τ is calibrated on data the attacker lacks; it assumes the gate finds all its queries
        # attacker-like (it sees answers, not which branch made them) and simulates that branch
        built.update(tau=float("inf"), gate_score="msp")
        built.pop("gate_model", None)
    if grad2_family and target == "unlearn":
        built["reference_x"], built["reference_y"] = images[pick], labels[pick]
    elif grad2_family and target == "watermark":  # its own guess of a behaviour set
        num_classes = int(labels.max()) + 1
        built["watermark_x"] = images[pick[:16]]
        built["watermark_y"] = torch.randint(
            0, num_classes, (len(built["watermark_x"]),), generator=generator
        )
    elif grad2_family and target == "vector":
        built["target"] = "random"
    if name == "watermarked":  # its own key; it cannot know (or rebuild) a defense underneath
        if params.get("inner") is not None:
            raise ValueError("the restorer cannot simulate a watermark over another defense yet")
        built["key"] = (
            torch.randint(0, 256, (32,), generator=generator, dtype=torch.uint8).numpy().tobytes()
        )
        # Under density_cap it cannot know which buckets the defender's data fills, and its own
        # images as the reference would leave nothing carried on an out-of-distribution pool: it
        # simulates the watermark without the cap, so that it sees carried answers everywhere.
        built["config"] = [
            layer.model_copy(update={"density_cap": None})
            for layer in watermark_layers(built.get("config"))
        ]
    if name == "adaptive_misinformation":
        if fresh_model is None:
            raise ValueError("simulating adaptive_misinformation needs fresh_model")
        misinformation = fresh_model()
        train_misinformation(
            misinformation, images, labels, _quick_recipe(epochs=1, seed=seed), show_progress=False
        )
        built["oe_model"], built["misinformation_model"] = shadow, misinformation.eval()
    return create_defense(name, **built)


def _quick_recipe(epochs: int, seed: int) -> TrainConfig:
    return GRAD2_RECIPE.model_copy(update={"epochs": epochs, "seed": seed})


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


class Restorer(nn.Module):
    """A residual MLP: restored logits = log ỹ + MLP(log ỹ [, log-softmax of image features]).

    The last layer starts at zero, so an untrained restorer is the identity and what it learns is
    a correction: where the shadows taught it nothing (answers unlike theirs), it passes the
    served answer through instead of extrapolating."""

    def __init__(self, num_classes: int, features: int, hidden: int) -> None:
        super().__init__()
        first, second, last = (
            nn.Linear(num_classes + features, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, num_classes),
        )
        self.net = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), last)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, answers: Tensor, features: Tensor | None = None) -> Tensor:
        log_answers = answers.clamp_min(1e-6).log()
        inputs = log_answers
        if features is not None:
            inputs = torch.cat([inputs, F.log_softmax(features, dim=1)], dim=1)
        return log_answers + self.net(inputs)


def fit_restorer(
    perturbed: Tensor, clean: Tensor, features: Tensor | None, config: RestorerConfig, *, seed: int
) -> Restorer:
    """Train a :class:`Restorer` on (perturbed, clean) pairs (N, K), with optional features."""
    num_classes = clean.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        restorer = Restorer(
            num_classes, 0 if features is None else features.shape[1], config.hidden
        )
    optimizer = torch.optim.Adam(restorer.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    restorer.train()
    for _ in range(config.epochs):
        for index in torch.randperm(len(clean), generator=generator).split(256):
            feats = None if features is None else features[index]
            loss = soft_cross_entropy(restorer(perturbed[index], feats), clean[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return restorer.eval()


TEMPERATURES = (0.1, 0.2, 0.35, 0.5, 0.7, 1.0, 1.5)
CALIBRATION_SIZE = 256


def _answer(defense: Defense, x: Tensor, clean: Tensor) -> Tensor:
    return torch.cat(
        [defense(xb, cb) for xb, cb in zip(x.split(256), clean.split(256), strict=True)]
    )


def matched_temperature(
    defense: Defense, x: Tensor, shadow_logits: Tensor, served: Tensor
) -> float:
    """The temperature T at which the shadow, served through the simulated defense, looks like the
    real API: its answers' mean top probability closest to that of the real answers ``served``.

    A few epochs of training leave a shadow much less confident than the victim, and most
    defenses act differently on flat and on sharp posteriors; this one statistic of what the
    attacker observes calibrates the simulation without any clean answer."""
    target = float(served.max(1).values.mean())
    x, shadow_logits = x[:CALIBRATION_SIZE], shadow_logits[:CALIBRATION_SIZE]
    gaps = []
    for t in TEMPERATURES:
        simulated = training_targets(_answer(defense, x, torch.softmax(shadow_logits / t, dim=1)))
        gaps.append(abs(float(simulated.max(1).values.mean()) - target))
    return TEMPERATURES[min(range(len(gaps)), key=gaps.__getitem__)]


def restore_answers(
    config: RestorerConfig,
    clone: CloneSpec,
    images: Tensor,
    answers: Tensor,
    num_classes: int,
    *,
    seed: int,
) -> tuple[Tensor, dict[str, Any]]:
    """images (N, C, H, W), answers (N, K) as served -> (restored answers (N, K), stats)."""
    if config.defense is None:
        raise ValueError("the restorer needs the defense's name (RestorerConfig.defense)")
    start = time.perf_counter()
    answers = training_targets(answers)
    labels = answers.argmax(1)
    generator = torch.Generator().manual_seed(seed + 4241)
    shadows, holdouts = [], []
    for s in range(config.shadows):
        order = torch.randperm(len(images), generator=generator)
        train, held = order[: len(order) // 2], order[len(order) // 2 :]
        spec = clone.model_copy(
            update={
                "loss": "cross-entropy",
                "loss_param": None,
                "restarts": 1,
                "training": clone.training.model_copy(update={"seed": seed + 101 + s}),
            }
        )
        shadow, _ = train_clone(
            spec,
            images[train],
            answers[train],
            num_classes,
            epochs=config.shadow_epochs,
            description=f"shadow {s}",
            show_progress=False,
        )
        shadows.append(shadow)
        holdouts.append(held[: config.pairs])
    perturbed_rows, clean_rows, feature_rows, temperatures = [], [], [], []
    for s, (shadow, held) in enumerate(zip(shadows, holdouts, strict=True)):
        x = images[held]
        clean_logits = _logits(shadow, x)
        surrogate = clone.build(images.shape[1:], num_classes)
        fit(
            surrogate,
            x,
            torch.softmax(clean_logits, dim=1),
            _quick_recipe(config.surrogate_epochs, seed + 211 + s),
            description=f"shadow {s} surrogate",
            show_progress=False,
        )
        defense = attacker_defense(
            config.defense,
            config.defense_params,
            shadow,
            surrogate.eval(),
            x,
            clean_logits.argmax(1),
            seed=seed + 307 + s,
            fresh_model=lambda: clone.build(images.shape[1:], num_classes),
        )
        temperature = matched_temperature(defense, x, clean_logits, answers)
        temperatures.append(temperature)
        clean = torch.softmax(clean_logits / temperature, dim=1)
        perturbed_rows.append(training_targets(_answer(defense, x, clean)))
        clean_rows.append(clean)
        if config.features:
            feature_rows.append(_logits(shadows[(s + 1) % len(shadows)], x))
    features = torch.cat(feature_rows) if config.features else None
    restorer = fit_restorer(
        torch.cat(perturbed_rows), torch.cat(clean_rows), features, config, seed=seed
    )
    with torch.no_grad():
        real_features = _logits(shadows[0], images) if config.features else None
        restored = torch.softmax(restorer(answers, real_features), dim=1)
    stats = {
        "shadows": config.shadows,
        "pairs": sum(len(h) for h in holdouts),
        "simulated_l1": float(
            (torch.cat(perturbed_rows) - torch.cat(clean_rows)).abs().sum(1).mean()
        ),
        "restored_change_l1": float((restored - answers).abs().sum(1).mean()),
        "restored_top1_changed": float((restored.argmax(1) != labels).float().mean()),
        "shadow_temperatures": temperatures,
        "seconds": time.perf_counter() - start,
    }
    log.info("restorer (%s): %s", config.defense, stats)
    return restored, stats
