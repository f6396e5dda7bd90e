"""DP-SGD victim training (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) with
Opacus — the training-time baseline of the MAD paper (Orekondy et al., ICLR 2020, section 6);
docs/design.md §dpsgd.

Each step clips every per-sample gradient to L2 norm ``max_grad_norm`` (C), sums them, adds
Gaussian noise N(0, σ²C²) with σ = ``noise_multiplier`` and averages; batches are Poisson
sampled. The privacy spent, ε at ``delta``, comes from Opacus's accountant (RDP by default) and
is written into the model card's ``training`` dict. The checkpoint is the plain mirage model
(the weights are copied out of Opacus's ``GradSampleModule`` into a freshly built network), so
it loads and serves like any other victim.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, TensorDataset

from mirage.api.evaluate import accuracy
from mirage.data import load_dataset
from mirage.models import ImageClassifier, ModelCard, create_model
from mirage.models.fit import TrainConfig, make_optimizer, make_schedule
from mirage.progress import progress_bar
from mirage.scenarios import Scenario

log = logging.getLogger(__name__)

DPSGD_TRAINING = TrainConfig(
    epochs=10,
    batch_size=256,
    lr=0.5,
    momentum=0.9,
    nesterov=False,
    weight_decay=0.0,
    schedule="cosine",
    seed=0,
)


class DpsgdConfig(BaseModel):
    """DP-SGD recipe. ``training.batch_size`` is the expected (Poisson) batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(1.0, gt=0, description="σ: noise std as a multiple of C")
    max_grad_norm: float = Field(1.0, gt=0, description="C: per-sample gradient clipping norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ)")
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    training: TrainConfig = DPSGD_TRAINING
    num_train: int | None = Field(
        None, ge=1, description="subsample of the training set (all if None)"
    )


def train_dpsgd(
    model: ImageClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: DpsgdConfig,
    *,
    show_progress: bool = True,
) -> dict:
    """Train ``model`` in place with DP-SGD; returns ε, δ, steps and wall time."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-SGD compatible: {errors}")
    tc = config.training
    generator = torch.Generator().manual_seed(tc.seed)
    loader = DataLoader(
        TensorDataset(images, labels), batch_size=tc.batch_size, shuffle=True, generator=generator
    )
    optimizer = make_optimizer(model, tc)
    engine = PrivacyEngine(accountant=config.accountant)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        private, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(tc.seed + 1),
        )
    steps = len(dp_loader)
    schedule = make_schedule(optimizer, tc, tc.epochs * steps)
    start, last = time.perf_counter(), float("nan")
    private.train()
    with progress_bar("DP-SGD victim", total=tc.epochs * steps, enabled=show_progress) as advance:
        for epoch in range(tc.epochs):
            for x, y in dp_loader:
                dp_optimizer.zero_grad(set_to_none=True)
                if len(x) == 0:
                    continue
                loss = torch.nn.functional.cross_entropy(private(x), y)
                loss.backward()
                dp_optimizer.step()
                schedule.step()
                last = float(loss.detach())
                advance(1, loss=last)
            log.info(
                "DP-SGD epoch %d/%d: loss %.4f, ε = %.3f",
                epoch + 1,
                tc.epochs,
                last,
                engine.get_epsilon(config.delta),
            )
    epsilon = float(engine.get_epsilon(config.delta))
    if hasattr(private, "_close"):
        private._close()
    return {
        "epsilon": epsilon,
        "delta": config.delta,
        "steps": tc.epochs * steps,
        "sample_rate": 1 / steps,
        "final_loss": last,
        "seconds": time.perf_counter() - start,
    }


def train_dpsgd_victim(
    scenario: Scenario, config: DpsgdConfig, *, show_progress: bool = True
) -> tuple[ImageClassifier, ModelCard]:
    """Train the scenario's victim with DP-SGD (no caching; see :mod:`mirage.training.registry`)."""
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    train = data.train.sample(config.num_train, config.training.seed)

    def build() -> ImageClassifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.training.seed)
            return create_model(
                scenario.architecture,
                data.input_shape,
                data.num_classes,
                data.mean,
                data.std,
                **scenario.arch_kwargs,
            )

    working = build()
    stats = train_dpsgd(working, train.images, train.labels, config, show_progress=show_progress)
    model = build()
    model.load_state_dict({k: v.detach().clone() for k, v in working.state_dict().items()})
    model.eval()
    if not math.isfinite(stats["epsilon"]):
        raise RuntimeError(f"the accountant returned ε = {stats['epsilon']}")
    card = ModelCard(
        architecture=scenario.architecture,
        arch_kwargs=scenario.arch_kwargs,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        dataset=scenario.victim_dataset,
        test_accuracy=accuracy(model, data.test),
        seed=config.training.seed,
        train_seconds=stats["seconds"],
        training={"defense": "dpsgd", "config": config.model_dump(mode="json"), **stats},
    )
    return model, card
