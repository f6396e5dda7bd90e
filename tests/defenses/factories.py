"""How to build every registered defense for the shared property tests, with tiny models.

Each factory takes the number of classes K and returns a fresh defense; inputs are 1×8×8 images.
``test_properties.py`` fails if a registered defense has no entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mirage.defenses import Defense, create_defense
from mirage.models import create_model
from mirage.ownership import WatermarkConfig

INPUT_SHAPE = (1, 8, 8)


def tiny_model(num_classes: int, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("lenet", INPUT_SHAPE, num_classes, [0.5], [0.5]).eval()


FACTORIES: dict[str, Callable[[int], Defense]] = {
    "none": lambda k: create_defense("none"),
    "argmax": lambda k: create_defense("argmax"),
    "top_k": lambda k: create_defense("top_k", k=2),
    "rounding": lambda k: create_defense("rounding", decimals=2),
    "reverse_sigmoid": lambda k: create_defense("reverse_sigmoid", beta=0.3, gamma=0.4),
    "random_noise": lambda k: create_defense("random_noise", epsilon=0.7, seed=3),
    "random_noise/logit": lambda k: create_defense(
        "random_noise", epsilon=0.7, mode="logit", seed=3
    ),
    "modelguard": lambda k: create_defense("modelguard", epsilon=0.6),
    "modelguard/top1": lambda k: create_defense("modelguard", epsilon=0.6, preserve_top1=True),
    "mad": lambda k: create_defense("mad", epsilon=0.6, surrogate=tiny_model(k)),
    "mad/l2-all": lambda k: create_defense(
        "mad", epsilon=0.3, norm="l2", layers="all", surrogate=tiny_model(k)
    ),
    "mad/kl-surrogate-objective": lambda k: create_defense(
        "mad", epsilon=0.2, norm="kl", objective="surrogate", surrogate=tiny_model(k)
    ),
    "mad/random-init": lambda k: create_defense("mad", epsilon=0.5, seed=2),
    "mad/identity": lambda k: create_defense("mad", epsilon=0.5, jacobian="identity"),
    "mad/random-oracle": lambda k: create_defense("mad", epsilon=0.5, oracle="random", seed=5),
    "mad_argmax": lambda k: create_defense("mad_argmax", epsilon=0.8, surrogate=tiny_model(k)),
    "mad_argmax/all-greedy": lambda k: create_defense(
        "mad_argmax",
        epsilon=1.0,
        layers="all",
        surrogate=tiny_model(k),
        exhaustive_max_classes=4,
        max_evaluations=12,
    ),
    "adaptive_misinformation": lambda k: create_defense(
        "adaptive_misinformation",
        oe_model=tiny_model(k, 1),
        misinformation_model=tiny_model(k, 2),
        tau=0.6,
        nu=20.0,
    ),
    "grad2": lambda k: create_defense("grad2", epsilon=0.6, surrogate=tiny_model(k)),
    "grad2/top1": lambda k: create_defense(
        "grad2", epsilon=0.6, surrogate=tiny_model(k), preserve_top1=True
    ),
    "grad2_gated": lambda k: create_defense(
        "grad2_gated", epsilon_low=0.4, epsilon_high=1.5, tau=0.3, surrogate=tiny_model(k)
    ),
    "grad2_gated/energy": lambda k: create_defense(
        "grad2_gated",
        epsilon_low=0.2,
        epsilon_high=2.0,
        tau=2.3,
        gate_score="neg-energy",
        gate_model=tiny_model(k, 4),
        surrogate=tiny_model(k),
    ),
    "grad2_gated/permute": lambda k: create_defense(
        "grad2_gated",
        epsilon_low=0.3,
        epsilon_high=1.2,
        tau=0.3,
        attacker_answer="permute",
        surrogate=tiny_model(k),
    ),
    "grad2_gated/scramble": lambda k: create_defense(
        "grad2_gated",
        epsilon_low=0.3,
        epsilon_high=2.0,
        tau=0.3,
        attacker_answer="scramble",
        surrogate=tiny_model(k),
    ),
    "grad2_gated/alarm": lambda k: create_defense(
        "grad2_gated",
        epsilon_low=0.3,
        epsilon_high=2.0,
        tau=0.3,
        attacker_answer="scramble",
        alarm_rate=0.05,
        alarm_alpha=1e-3,
        surrogate=tiny_model(k),
    ),
    # every bucket selected and no margin, so that the properties meet carried rows
    "watermarked": lambda k: create_defense(
        "watermarked",
        key=b"k" * 32,
        inner=create_defense("top_k", k=3),
        config=WatermarkConfig(bucket_fraction=1.0, margin=0.0),
    ),
    "watermarked/reverse-sigmoid": lambda k: create_defense(
        "watermarked",
        key=b"k" * 32,
        inner=create_defense("reverse_sigmoid", beta=0.3, gamma=0.4),
        config=WatermarkConfig(bucket_fraction=0.5, margin=0.1),
    ),
}


def registered_name(factory_key: str) -> str:
    return factory_key.split("/")[0]
