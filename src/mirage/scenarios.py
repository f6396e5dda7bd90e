"""The scenarios that run here on real data (SPEC section 5): a victim, its training recipe and
the attacker's query pool."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mirage.data.base import ImageData
from mirage.training.fit import TrainConfig


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    victim_dataset: str
    architecture: str = "lenet"
    arch_kwargs: dict = Field(default_factory=dict)
    pool_dataset: str
    pool_split: Literal["train", "test", "all"] = "all"
    victim_training: TrainConfig
    reverse_sigmoid_gamma: float = 0.2
    data_root: str | None = None
    pool_root: str | None = None


LENET_VICTIM = TrainConfig(epochs=20, batch_size=128, lr=0.05, momentum=0.9, nesterov=True,
                           weight_decay=5e-4, schedule="cosine", seed=0)

SCENARIOS: dict[str, Scenario] = {
    "fmnist": Scenario(name="fmnist", victim_dataset="fmnist", pool_dataset="mnist",
                       victim_training=LENET_VICTIM, reverse_sigmoid_gamma=0.4),
    "fmnist-id": Scenario(name="fmnist-id", victim_dataset="fmnist", pool_dataset="fmnist",
                          victim_training=LENET_VICTIM, reverse_sigmoid_gamma=0.4),
    "mnist": Scenario(name="mnist", victim_dataset="mnist", pool_dataset="fmnist",
                      victim_training=LENET_VICTIM.model_copy(update={"epochs": 30}),
                      reverse_sigmoid_gamma=0.2),
    "digits": Scenario(name="digits", victim_dataset="digits", pool_dataset="digits",
                       victim_training=LENET_VICTIM.model_copy(update={"epochs": 15}),
                       arch_kwargs={}),
    "cifar10": Scenario(name="cifar10", victim_dataset="cifar10", architecture="resnet",
                        pool_dataset="cifar100",
                        victim_training=TrainConfig(epochs=100, lr=0.1, augment=True),
                        reverse_sigmoid_gamma=0.1),
}


class ReferenceSet(BaseModel):
    """How many of the defender's own labelled images to sample, and the seed (e.g. the reference
    set of GRAD²'s ``unlearn`` target)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=1)
    seed: int = 0


def defender_sample(scenario: Scenario, reference: ReferenceSet = ReferenceSet()) -> ImageData:
    """A seeded sample of the defender's own labelled data (the victim's training split)."""
    from mirage.data import load_dataset

    train = load_dataset(scenario.victim_dataset, scenario.data_root).train
    return train.sample(reference.size, reference.seed)


def get_scenario(name: str, **overrides) -> Scenario:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}")
    scenario = SCENARIOS[name]
    return scenario.model_copy(update=overrides) if overrides else scenario
