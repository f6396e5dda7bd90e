"""The scenarios that run here on real data (docs/design.md §scenarios): a victim, its training
recipe and the attacker's query pool.

The data each side brings is a property of the scenario, so its rules live here (below both the
defender's surrogates and the attacks that query with it; docs/design.md §attack-data):

* the query pool (:func:`query_pool`, what Knockoff queries and GRAD²'s distilled surrogate is
  trained on): the scenario's ``pool_dataset`` / ``pool_split``. When the pool is the victim's own
  dataset (in-distribution attacker, e.g. ``fmnist-id``), its test split is left out even for
  ``pool_split="all"``: those images are the evaluation set, and querying them would leak it into
  the transfer set;
* the seed source (:func:`seed_source`, JBDA family): the victim dataset's *test* images, as in
  Papernot et al. (the attacker holds a few in-distribution images); an attack samples
  ``seed_size`` of them. (100 of 10,000 evaluation images overlap the seed set at most.)
* the defender's own labelled sample (:func:`defender_sample`) and a watermark's behaviour set
  (:func:`defender_watermark`).

The attacker never uses pool labels, except the adaptive bandit's class groups (as Knockoff does).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mirage.data import load_dataset
from mirage.data.base import DatasetSplits, ImageData
from mirage.models.fit import TrainConfig
from mirage.registry import UnknownNameError

log = logging.getLogger(__name__)


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


LENET_VICTIM = TrainConfig(
    epochs=20,
    batch_size=128,
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    seed=0,
)

SCENARIOS: dict[str, Scenario] = {
    "fmnist": Scenario(
        name="fmnist",
        victim_dataset="fmnist",
        pool_dataset="mnist",
        victim_training=LENET_VICTIM,
        reverse_sigmoid_gamma=0.4,
    ),
    "fmnist-id": Scenario(
        name="fmnist-id",
        victim_dataset="fmnist",
        pool_dataset="fmnist",
        victim_training=LENET_VICTIM,
        reverse_sigmoid_gamma=0.4,
    ),
    "mnist": Scenario(
        name="mnist",
        victim_dataset="mnist",
        pool_dataset="fmnist",
        victim_training=LENET_VICTIM.model_copy(update={"epochs": 30}),
        reverse_sigmoid_gamma=0.2,
    ),
    "digits": Scenario(
        name="digits",
        victim_dataset="digits",
        pool_dataset="digits",
        victim_training=LENET_VICTIM.model_copy(update={"epochs": 15}),
        arch_kwargs={},
    ),
    "cifar10": Scenario(
        name="cifar10",
        victim_dataset="cifar10",
        architecture="resnet",
        pool_dataset="cifar100",
        victim_training=TrainConfig(epochs=100, lr=0.1, augment=True),
        reverse_sigmoid_gamma=0.1,
    ),
}


class ReferenceSet(BaseModel):
    """How many of the defender's own labelled images to sample, and the seed (e.g. the reference
    set of GRAD²'s ``unlearn`` target)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=1)
    seed: int = 0


DEFAULT_REFERENCE = ReferenceSet()


def defender_sample(scenario: Scenario, reference: ReferenceSet = DEFAULT_REFERENCE) -> ImageData:
    """A seeded sample of the defender's own labelled data (the victim's training split)."""
    train = load_dataset(scenario.victim_dataset, scenario.data_root).train
    return train.sample(reference.size, reference.seed)


ALIGNMENT_SEED_OFFSET = 7_741
"""The label-aligning attacker's labelled sample is drawn with the run's seed plus this (so it is
not the pool's own draw)."""


def aligned_sample(labelled: ImageData | None, size: int | None, seed: int) -> ImageData | None:
    """The labelled images the label-aligning attacker holds (the ``align_labels``
    countermeasure): ``size`` of ``labelled`` drawn with the run's ``seed``, or ``None``."""
    if size is None or labelled is None:
        return None
    return labelled.sample(size, seed + ALIGNMENT_SEED_OFFSET)


def attacker_labels(scenario: Scenario, size: int | None, seed: int) -> ImageData | None:
    """:func:`aligned_sample` of the victim's training split (the test split scores the clone)."""
    if size is None:
        return None
    return aligned_sample(
        load_dataset(scenario.victim_dataset, scenario.data_root).train, size, seed
    )


class WatermarkSet(BaseModel):
    """The behaviour set {(x_w, y_w)} of GRAD²'s ``watermark`` target (docs/design.md
    §verification): the first ``size`` training images of class ``source_class``, each labelled
    ``target_class``. ``mirage verify`` tests a suspect for the same set from the same numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_class: int = Field(1, ge=0)
    target_class: int = Field(8, ge=0)
    size: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _another_class(self) -> WatermarkSet:
        if self.source_class == self.target_class:
            raise ValueError("a watermark labels source_class images as another class")
        return self


def behaviour_set(data: DatasetSplits, watermark: WatermarkSet) -> ImageData:
    """The watermark's images, from ``data``'s training split, with their watermark labels."""
    for which in ("source_class", "target_class"):
        if getattr(watermark, which) >= data.num_classes:
            raise ValueError(
                f"watermark {which} {getattr(watermark, which)} is not one of the "
                f"{data.num_classes} classes"
            )
    images = data.train.images[data.train.labels == watermark.source_class][: watermark.size]
    return ImageData(images, torch.full((len(images),), watermark.target_class, dtype=torch.int64))


def defender_watermark(scenario: Scenario, watermark: WatermarkSet) -> ImageData:
    """The watermark's behaviour set, drawn from the defender's own training data."""
    return behaviour_set(load_dataset(scenario.victim_dataset, scenario.data_root), watermark)


def get_scenario(name: str, **overrides) -> Scenario:
    if name not in SCENARIOS:
        raise UnknownNameError("scenario", name, SCENARIOS)
    scenario = SCENARIOS[name]
    return scenario.model_copy(update=overrides) if overrides else scenario


def query_pool(scenario: Scenario) -> ImageData:
    """The scenario's query pool (images in [0, 1], labels kept only for coarse groups)."""
    pool = load_dataset(scenario.pool_dataset, scenario.pool_root)
    same_data = scenario.pool_dataset == scenario.victim_dataset
    if scenario.pool_split == "train" or (same_data and scenario.pool_split == "all"):
        if same_data and scenario.pool_split == "all":
            log.info(
                "pool %s is the victim's dataset: using its training split only",
                scenario.pool_dataset,
            )
        return pool.train
    if scenario.pool_split == "test":
        if same_data:
            raise ValueError(
                "the pool cannot be the victim's own test split (it is the evaluation set)"
            )
        return pool.test
    return ImageData(
        torch.cat([pool.train.images, pool.test.images]),
        torch.cat([pool.train.labels, pool.test.labels]),
    )


def seed_source(scenario: Scenario) -> ImageData:
    """Where JBDA-style attacks draw their seed set: the victim dataset's test images."""
    return load_dataset(scenario.victim_dataset, scenario.data_root).test
