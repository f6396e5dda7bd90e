"""Clone training (docs/design.md §clone): how the attacker builds and trains F_A on its transfer
set.

Recipes on top of :func:`mirage.models.fit.fit`, soft-label cross-entropy by default:

* ``mad``: SGD, lr 0.1, momentum 0.5, wd 5e-4, step decay — the MAD paper's attacker
  (Orekondy et al., ICLR 2020, section 5.1: "SGD (LR=0.1) with momentum (0.5) for 30 epochs").
* ``grad2``: SGD with Nesterov momentum 0.9, wd 5e-4, cosine schedule — the GRAD² attacker.

Answers of truncating defenses (top-k without renormalisation, rounding) are rows that sum to
less than 1, as a real API would serve them. The attacker renormalises each row before training
(:func:`training_targets`) — the natural reading of a truncated posterior, and what makes the
soft-label cross-entropy a proper cross-entropy again. A row that is all zeros (everything
rounded away) carries no information and becomes uniform.

``restarts = n`` trains n clones (training seeds s, s+1, …) and keeps the one that fits the
transfer set best (lowest soft cross-entropy on it) — what an attacker does when a training run
stalls, using nothing but its own data.

``loss`` picks the training loss: the soft-label cross-entropy, or a noise-robust one against
label-changing defenses (the ``robust_loss`` countermeasure): the generalized cross-entropy
Σ_k t_k (1 − p_k^q)/q (Zhang & Sabuncu, NeurIPS 2018; q → 0 is the cross-entropy, q = 1 the MAE),
or soft bootstrapping, the cross-entropy against β·t + (1 − β)·p_θ with p_θ held fixed (Reed et
al., ICLR 2015 workshop).

Training is deterministic given the data, the spec and the seed, so clones are cached exactly
(``CloneSpec.cache``: a folder, which the run protocol sets from its stores): the key is the digest
of the very images and targets trained on, the spec and the code that trains. Two runs whose
transfer sets are provably equal — the hard-label answers of a top-1-kept defense and of the
undefended API — train one clone, and the equality is the matching digest, recorded in the clone's
stats (``transfer_digest``), never assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import mirage
from mirage.models import ImageClassifier, ModelCard, create_model, tensor_digest
from mirage.models.fit import GRAD2_RECIPE, MAD_RECIPE, TrainConfig, fit, soft_cross_entropy
from mirage.registry import UnknownNameError

log = logging.getLogger(__name__)

RECIPES: dict[str, TrainConfig] = {"mad": MAD_RECIPE, "grad2": GRAD2_RECIPE}


class CloneSpec(BaseModel):
    """How to build and train the clone: architecture, its preprocessing, and the recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = "lenet"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    training: TrainConfig = GRAD2_RECIPE
    restarts: int = Field(
        1, ge=1, description="clones trained (seeds s, s+1, …); the best fit is kept"
    )
    loss: Literal["cross-entropy", "gce", "bootstrap"] = "cross-entropy"
    loss_param: float | None = Field(None, gt=0, le=1, description="q of gce, β of bootstrap")
    device: str = Field(
        "cpu",
        description="where the clone trains (docs/design.md §devices); it is returned on the CPU",
    )
    cache: Path | None = Field(
        None,
        exclude=True,
        description="a folder keeping trained clones by exact "
        "transfer set (None: none); not part of the recipe",
    )

    @classmethod
    def like(cls, card: ModelCard, *, training: TrainConfig | str = "grad2") -> CloneSpec:
        """Same architecture and preprocessing as the victim (the protocol's default attacker)."""
        return cls(
            architecture=card.architecture,
            arch_kwargs=dict(card.arch_kwargs),
            mean=tuple(card.mean),
            std=tuple(card.std),
            training=recipe(training),
        )

    def build(self, input_shape: Sequence[int], num_classes: int) -> ImageClassifier:
        """A freshly initialised clone, seeded by ``training.seed`` (global RNG left untouched)."""
        channels = input_shape[0]
        mean = self.mean if len(self.mean) == channels else (self.mean[0],) * channels
        std = self.std if len(self.std) == channels else (self.std[0],) * channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.training.seed)
            return create_model(
                self.architecture, input_shape, num_classes, mean, std, **self.arch_kwargs
            )


def recipe(name_or_config: TrainConfig | str) -> TrainConfig:
    if isinstance(name_or_config, TrainConfig):
        return name_or_config
    if name_or_config not in RECIPES:
        raise UnknownNameError("clone recipe", name_or_config, RECIPES)
    return RECIPES[name_or_config]


def generalized_cross_entropy(logits: Tensor, targets: Tensor, q: float = 0.7) -> Tensor:
    """Mean over the batch of Σ_k t_k (1 − p_k^q)/q (Zhang & Sabuncu 2018, eq. 6, for soft t)."""
    p_q = torch.exp(q * F.log_softmax(logits, dim=1))
    return (targets * (1 - p_q)).sum(dim=1).mean() / q


def bootstrapped_cross_entropy(logits: Tensor, targets: Tensor, beta: float = 0.8) -> Tensor:
    """Soft bootstrapping (Reed et al. 2015, eq. 5): cross-entropy against β·t + (1 − β)·p_θ,
    the model's own prediction held fixed."""
    mixed = beta * targets + (1 - beta) * torch.softmax(logits.detach(), dim=1)
    return soft_cross_entropy(logits, mixed)


def clone_loss(spec: CloneSpec) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``fit`` minimises for ``spec``."""
    if spec.loss == "gce":
        q = 0.7 if spec.loss_param is None else spec.loss_param
        return lambda logits, targets: generalized_cross_entropy(logits, targets, q)
    if spec.loss == "bootstrap":
        beta = 0.8 if spec.loss_param is None else spec.loss_param
        return lambda logits, targets: bootstrapped_cross_entropy(logits, targets, beta)
    return soft_cross_entropy


@cache
def _training_code() -> str:
    """Digest of the source that builds and trains a clone (a fixed bug invalidates the cache)."""
    root = Path(mirage.__file__).parent
    digest = hashlib.sha256(mirage.__version__.encode())
    for path in [*sorted((root / "models").rglob("*.py")), Path(__file__)]:
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def transfer_digest(images: Tensor, targets: Tensor) -> str:
    """Exact digest of a transfer set: equal digests mean the clone trains on the same data."""
    return hashlib.sha256((tensor_digest(images) + tensor_digest(targets)).encode()).hexdigest()[
        :24
    ]


def _clone_key(spec: CloneSpec, data: str, num_classes: int) -> str:
    # a CPU clone keeps the key it had before devices existed; another device trains another clone
    dumped = spec.model_dump(mode="json", exclude={"device"} if spec.device == "cpu" else None)
    blob = json.dumps(
        {
            "spec": dumped,
            "data": data,
            "classes": num_classes,
            "code": _training_code(),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load_cached(
    root: Path, key: str, spec: CloneSpec, input_shape: Sequence[int], num_classes: int
) -> tuple[ImageClassifier, dict[str, Any]] | None:
    weights, stats = root / f"{key}.safetensors", root / f"{key}.json"
    if not (weights.is_file() and stats.is_file()):
        return None
    try:
        model = spec.build(input_shape, num_classes)
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), json.loads(stats.read_text())
    except Exception as error:  # noqa: BLE001 — a bad cache file costs a retraining, never the run
        log.warning("clone cache: ignoring unreadable %s (%s)", weights, error)
        return None


def _store(root: Path, key: str, model: nn.Module, stats: dict[str, Any]) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with tempfile.NamedTemporaryFile(dir=root, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
        save_file(state, str(temporary))
        os.replace(temporary, root / f"{key}.safetensors")
        (root / f"{key}.json.tmp").write_text(json.dumps(stats))
        os.replace(root / f"{key}.json.tmp", root / f"{key}.json")  # written last: marks complete
    except OSError as error:
        log.warning("clone cache: could not store %s (%s)", key, error)


def training_targets(answers: Tensor) -> Tensor:
    """answers: (N, K) served rows (possibly summing to < 1) -> (N, K) rows on the simplex.

    Negative entries (float noise) are clipped; each row is divided by its sum; an all-zero row
    becomes uniform.
    """
    if answers.ndim != 2:
        raise ValueError(f"answers must be (N, K), got {tuple(answers.shape)}")
    if not torch.isfinite(answers).all():
        raise ValueError("answers contain NaN or infinite values")
    rows = answers.clamp_min(0).float()
    sums = rows.sum(dim=1, keepdim=True)
    uniform = torch.full_like(rows, 1.0 / rows.shape[1])
    return torch.where(sums > 0, rows / sums.clamp_min(torch.finfo(rows.dtype).tiny), uniform)


def train_clone(
    spec: CloneSpec,
    images: Tensor,
    answers: Tensor,
    num_classes: int,
    *,
    epochs: int | None = None,
    description: str = "clone",
    show_progress: bool = True,
) -> tuple[ImageClassifier, dict[str, Any]]:
    """Build a fresh clone and fit it on (images (N, C, H, W), answers (N, K)).

    ``epochs`` overrides the recipe's (JBDA's per-round substitutes train shorter). With
    ``spec.restarts > 1`` the clone with the lowest ``transfer_loss`` (soft cross-entropy on the
    whole transfer set) is returned; its stats say which ``restart`` it was, the
    ``transfer_digest`` of the data and whether it came ``from_cache`` (``spec.cache``).
    """
    config = (
        spec.training if epochs is None else spec.training.model_copy(update={"epochs": epochs})
    )
    spec = spec.model_copy(update={"training": config})
    targets = training_targets(answers)
    data = transfer_digest(images, targets)
    root = spec.cache
    key = _clone_key(spec, data, num_classes) if root is not None else ""
    if root is not None and (hit := _load_cached(root, key, spec, images.shape[1:], num_classes)):
        model, stats = hit
        return model, {**stats, "from_cache": True}
    loss = clone_loss(spec)
    candidates = []
    for restart in range(spec.restarts):
        attempt = spec.model_copy(
            update={"training": config.model_copy(update={"seed": config.seed + restart})}
        )
        model = attempt.build(images.shape[1:], num_classes).to(spec.device)
        fitted: dict[str, Any] = fit(
            model,
            images,
            targets,
            attempt.training,
            loss=loss,
            description=description,
            show_progress=show_progress,
        )
        fitted.update(
            transfer_loss=transfer_loss(model, images, targets),
            restart=restart,
            transfer_digest=data,
        )
        candidates.append((model.cpu().eval(), fitted))
    model, stats = min(
        candidates,
        key=lambda c: c[1]["transfer_loss"] if math.isfinite(c[1]["transfer_loss"]) else math.inf,
    )
    if root is not None:
        _store(root, key, model, stats)
    return model, {**stats, "from_cache": False}


@torch.no_grad()
def transfer_loss(
    model: nn.Module, images: Tensor, targets: Tensor, batch_size: int = 1024
) -> float:
    """Mean soft cross-entropy of ``model`` on (images, target rows)."""
    device = next(model.parameters()).device
    total = 0.0
    for x, t in zip(images.split(batch_size), targets.split(batch_size), strict=True):
        total += float(soft_cross_entropy(model(x.to(device)), t.to(device))) * len(x)
    return total / len(images)
