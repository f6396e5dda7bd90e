"""InI — Isolation and Induction (Guo et al., "Isolation and Induction: Training Robust Deep Neural
Networks against Model Stealing Attacks", ACM MM 2023, arXiv:2308.00958); docs/design.md §ini.

The victim V (parameters θ_V) is trained jointly against a student clone S (parameters θ_S) on
in-distribution data D_in = {(x, y)} and attacker-like out-of-distribution data D_ood = {x̃}::

    L(θ_V) = CE(V(x), y)                                            benign
           − β   · dist(V(x), S(x))                                 isolation on D_in
           + γ   · dist(V(x̃), S(x̃))                                 induction on D_ood
           + δ   · cos(∇_θS KL(S‖V)(x), ∇_θS CE(S(x), y))           gradient direction on D_in
           + ε_g · ‖∇_θS KL(S‖V)(x̃)‖                                gradient size on D_ood

S's outputs are constants in the two distance terms; the two gradient terms are differentiated
*through* ∇_θS (a double backward, ``torch.autograd.grad(create_graph=True)``): V learns answers
whose distillation gradient points away from the true-label gradient in distribution and is
small out of distribution. The CE-gradient in the cosine is a constant (as in the official code).
Per query the defended model is an ordinary network: zero inference cost.

Where mirage (docs/design.md §ini) and the official code (github.com/DIG-Beihang/
InI-Model-Stealing-Defense, ``src/defenses/ini/ini.py`` and ``src/run.sh``) differ:

* **Weights.** Defaults are the official run script's: β = 0, γ = 0.3, δ = 1, ε_g = 1000,
  PCGrad on. ε_g = 1000 pairs with the official gradient "norm", the *mean absolute* entry of
  ∇_θS (``grad_norm="mean-abs"``); ``"l2"`` gives the Euclidean norm.
* **dist.** Official default ``l1``: mean |S's logits − V's centred log-probabilities|. Ours
  centres both sides' log-probabilities (S's raw logits carry an arbitrary shift that the
  official form penalises); ``kl`` = KL(V‖S) is the alternative.
* **Student.** The official loop never updates S (``train_S`` is commented out; S is the random
  init or a loaded checkpoint). mirage wants a student that imitates V *as an attacker would*:
  after every victim step S takes ``student_steps`` SGD steps of soft-label cross-entropy to V's
  posteriors on D_ood batches (0 = the official frozen student).
* **PCGrad** (Yu et al., NeurIPS 2020): per-term victim gradients, each projected off the others
  it conflicts with (negative inner product), then averaged — the official ``reduction="mean"``.
  Without PCGrad the summed gradient is clipped to ``max_grad_norm`` (official: 10).
* **D_ood.** The official code uses a separate natural dataset (Tiny ImageNet for CIFAR-10). For
  ``fmnist`` the attacker's pool is MNIST digits, which must not be the training OOD set, so the
  default is ``patch-shuffle``: the victim's own training images cut into a 4×4 grid of patches
  that are randomly permuted per image — real pixel statistics (strokes, textures, edges, the
  same intensity range) without the class semantics, disjoint from every attacker pool by
  construction and needing no extra data. ``digits-upsampled`` (scikit-learn's 8×8 digits
  resized to the victim's input size) is offered too, but for ``fmnist`` it is digit data close
  to the attacker's MNIST pool, so it would flatter the defense against Knockoff-MNIST.
* **Initialisation.** ``init="scratch"`` trains V from a random init (the paper, 50 epochs for
  Fashion-MNIST); ``init="victim"`` fine-tunes the scenario's cached plain victim, a cheaper
  setting for a CPU budget (documented in the card when used).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mirage.api.evaluate import accuracy
from mirage.data import load_dataset
from mirage.data.base import ImageData
from mirage.models import ImageClassifier, ModelCard, create_model
from mirage.models.fit import TrainConfig, make_optimizer, make_schedule, soft_cross_entropy
from mirage.progress import progress_bar
from mirage.scenarios import Scenario

log = logging.getLogger(__name__)

INI_VICTIM_TRAINING = TrainConfig(
    epochs=50,
    batch_size=128,
    lr=0.1,
    momentum=0.5,
    nesterov=False,
    weight_decay=1e-3,
    schedule="step",
    seed=0,
)
INI_STUDENT_TRAINING = TrainConfig(
    epochs=50,
    batch_size=128,
    lr=0.1,
    momentum=0.5,
    nesterov=False,
    weight_decay=5e-4,
    schedule="constant",
    seed=1,
)

TERMS = ("benign", "dist_in", "dist_ood", "grad_cos", "grad_norm")


class IniConfig(BaseModel):
    """Weights and recipe of InI training; defaults follow the official ``run.sh``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(0.0, ge=0, description="β: push V away from S on D_in (isolation)")
    gamma: float = Field(0.3, ge=0, description="γ: pull V towards S on D_ood (induction)")
    delta: float = Field(1.0, ge=0, description="δ: cosine of KL(S‖V)- and CE-gradients on D_in")
    epsilon_g: float = Field(1000.0, ge=0, description="ε_g: size of the KL(S‖V)-gradient on D_ood")
    distance: Literal["l1", "kl"] = "l1"
    grad_norm: Literal["mean-abs", "l2"] = "mean-abs"
    pcgrad: bool = True
    max_grad_norm: float | None = Field(
        10.0, gt=0, description="clip V's summed gradient (no PCGrad)"
    )
    student_steps: int = Field(1, ge=0, description="student updates per victim step (0: frozen)")
    training: TrainConfig = INI_VICTIM_TRAINING
    student_training: TrainConfig = INI_STUDENT_TRAINING
    ood: Literal["patch-shuffle", "digits-upsampled"] = "patch-shuffle"
    patch_grid: int = Field(4, ge=2, description="patch-shuffle: g×g grid of patches")
    init: Literal["scratch", "victim"] = "scratch"
    num_train: int | None = Field(None, ge=1, description="subsample of D_in (all if None)")


def centred_log_probs(logits: Tensor) -> Tensor:
    """(B, K) -> log-softmax minus its row mean (invariant to a shift of the logits)."""
    log_p = F.log_softmax(logits, dim=1)
    return log_p - log_p.mean(dim=1, keepdim=True)


def distance(victim_logits: Tensor, student_logits: Tensor, kind: str) -> Tensor:
    """dist(V, S) on a batch, (B, K) logits each -> scalar.

    ``l1``: mean over batch and classes of |c(S) − c(V)|, c = centred log-probabilities;
    ``kl``: mean over the batch of KL(V‖S).
    """
    if kind == "l1":
        return (centred_log_probs(student_logits) - centred_log_probs(victim_logits)).abs().mean()
    if kind == "kl":
        return kl_divergence(victim_logits, student_logits)
    raise ValueError(f"unknown distance {kind!r}; use 'l1' or 'kl'")


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Mean over the batch of KL(p‖q) = Σ_k p_k (log p_k − log q_k); (B, K) logits each."""
    log_p = F.log_softmax(p_logits, dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(q_logits, dim=1))).sum(dim=1).mean()


def flat(tensors: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def ini_terms(
    victim: nn.Module,
    student: nn.Module,
    x_in: Tensor,
    y_in: Tensor,
    x_ood: Tensor,
    config: IniConfig,
) -> dict[str, Tensor]:
    """The five InI loss terms (unweighted, as scalars differentiable w.r.t. θ_V).

    x_in: (B, C, H, W), y_in: (B,), x_ood: (B', C, H, W). Returns ``benign`` = CE(V(x), y),
    ``dist_in`` = dist(V, S) on x, ``dist_ood`` = dist(V, S) on x̃, ``grad_cos`` =
    cos(∇_θS KL(S‖V)(x), ∇_θS CE(S(x), y)), ``grad_norm`` = ‖∇_θS KL(S‖V)(x̃)‖. Terms whose weight
    is 0 are still returned (cheap ones) except the gradient terms, which are skipped (value 0).
    """
    n = x_in.shape[0]
    v_logits = victim(torch.cat([x_in, x_ood]))
    v_in, v_ood = v_logits[:n], v_logits[n:]
    s_params = [p for p in student.parameters() if p.requires_grad]
    s_logits = student(torch.cat([x_in, x_ood]))
    s_in, s_ood = s_logits[:n], s_logits[n:]
    zero = v_logits.new_zeros(())
    terms = {
        "benign": F.cross_entropy(v_in, y_in),
        "dist_in": distance(v_in, s_in.detach(), config.distance),
        "dist_ood": distance(v_ood, s_ood.detach(), config.distance),
        "grad_cos": zero,
        "grad_norm": zero,
    }
    if config.delta > 0:
        g_kl = flat(torch.autograd.grad(kl_divergence(s_in, v_in), s_params, create_graph=True))
        g_ce = flat(torch.autograd.grad(F.cross_entropy(s_in, y_in), s_params, retain_graph=True))
        terms["grad_cos"] = F.cosine_similarity(g_kl, g_ce.detach(), dim=0)
    if config.epsilon_g > 0:
        g_ood = flat(torch.autograd.grad(kl_divergence(s_ood, v_ood), s_params, create_graph=True))
        terms["grad_norm"] = g_ood.abs().mean() if config.grad_norm == "mean-abs" else g_ood.norm()
    return terms


def weighted_terms(terms: dict[str, Tensor], config: IniConfig) -> dict[str, Tensor]:
    """The signed, weighted terms that sum to the InI loss (zero-weight terms dropped)."""
    weights = {
        "benign": 1.0,
        "dist_in": -config.beta,
        "dist_ood": config.gamma,
        "grad_cos": config.delta,
        "grad_norm": config.epsilon_g,
    }
    return {k: w * terms[k] for k, w in weights.items() if w != 0}


def pcgrad(grads: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1).

    grads: (T, D) one gradient per task -> (D,). Each g_i is projected, in a random order of the
    other tasks, off every *original* g_j it conflicts with (g_i·g_j < 0):
    g_i ← g_i − (g_i·g_j / ‖g_j‖²) g_j; the result is the mean of the projected gradients (the
    official InI code's ``reduction="mean"``). The loop is over tasks (T ≤ 5), not data.
    """
    if grads.ndim != 2:
        raise ValueError(f"grads must be (T, D), got {tuple(grads.shape)}")
    projected = grads.clone()
    sq_norms = grads.square().sum(dim=1).clamp_min(torch.finfo(grads.dtype).tiny)
    tasks = grads.shape[0]
    for i in range(tasks):
        for j in torch.randperm(tasks, generator=generator).tolist():
            if j == i:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= (dot / sq_norms[j]) * grads[j]
    return projected.mean(dim=0)


def patch_shuffle(x: Tensor, grid: int, generator: torch.Generator) -> Tensor:
    """x: (B, C, H, W) -> the same images with their grid×grid patches permuted per image.

    H and W must be multiples of ``grid``. Vectorised: one random permutation per row (argsort of
    uniform noise), applied with a gather.
    """
    b, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch grid {grid}")
    ph, pw = h // grid, w // grid
    patches = (
        x.reshape(b, c, grid, ph, grid, pw)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, grid * grid, c, ph, pw)
    )
    order = torch.rand(b, grid * grid, generator=generator).argsort(dim=1)
    shuffled = patches.gather(1, order.view(b, -1, 1, 1, 1).expand_as(patches))
    return shuffled.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def ood_source(config: IniConfig, train: ImageData) -> Tensor:
    """The fixed OOD image set (N, C, H, W) for ``digits-upsampled``; for ``patch-shuffle`` the
    in-distribution images, shuffled per batch by :func:`ood_batch`."""
    if config.ood == "patch-shuffle":
        return train.images
    digits = load_dataset("digits")
    images = torch.cat([digits.train.images, digits.test.images])
    c, h, w = train.input_shape
    resized = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return resized.expand(-1, c, -1, -1).contiguous()


class _Cycle:
    """Endless shuffled batches of a tensor's rows."""

    def __init__(self, data: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self._batches: list[Tensor] = []

    def next(self) -> Tensor:
        if not self._batches:
            self._batches = list(
                torch.randperm(len(self.data), generator=self.generator).split(self.batch_size)
            )
        return self.data[self._batches.pop()]


def _save_progress(
    path: Path,
    parts: dict[str, Any],
    generator: torch.Generator,
    ood_batches: _Cycle,
    history: list[dict],
    seconds: float,
) -> None:
    """Write the training state atomically (a temporary file renamed over ``path``)."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(
        generator=generator.get_state(),
        ood_batches=list(ood_batches._batches),
        history=history,
        seconds=seconds,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    partial.replace(path)


def _load_progress(
    path: Path, parts: dict[str, Any], generator: torch.Generator, ood_batches: _Cycle
) -> tuple[list[dict], float]:
    """Restore the state :func:`_save_progress` wrote; returns the epoch history and seconds."""
    saved = torch.load(path, weights_only=True)
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    generator.set_state(saved["generator"])
    ood_batches._batches = list(saved["ood_batches"])
    return saved["history"], saved["seconds"]


def victim_step(
    victim: nn.Module,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_in: Tensor,
    y_in: Tensor,
    x_ood: Tensor,
    config: IniConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """One InI update of θ_V; returns the unweighted term values."""
    params = [p for p in victim.parameters() if p.requires_grad]
    terms = ini_terms(victim, student, x_in, y_in, x_ood, config)
    weighted = list(weighted_terms(terms, config).values())
    if config.pcgrad and len(weighted) > 1:
        grads = torch.stack(
            [
                flat(
                    torch.autograd.grad(
                        t, params, retain_graph=True, allow_unused=True, materialize_grads=True
                    )
                )
                for t in weighted
            ]
        )
        merged = pcgrad(grads, generator)
        offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0).tolist()
        for p, lo, hi in zip(params, offsets[:-1], offsets[1:], strict=True):
            p.grad = merged[lo:hi].view_as(p).clone()
    else:
        summed = torch.autograd.grad(torch.stack(weighted).sum(), params)
        for p, g in zip(params, summed, strict=True):
            p.grad = g
        if config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    for p in student.parameters():
        p.grad = None
    return {k: float(v.detach()) for k, v in terms.items()}


def student_step(
    victim: nn.Module, student: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor
) -> float:
    """The attacker's move: one soft-label CE step of S towards V's posteriors on x."""
    with torch.no_grad():
        targets = torch.softmax(victim(x), dim=1)
    loss = soft_cross_entropy(student(x), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_ini(
    victim: ImageClassifier,
    student: ImageClassifier,
    train: ImageData,
    ood: Tensor,
    config: IniConfig,
    *,
    ood_transform: bool,
    show_progress: bool = True,
    progress_file: Path | None = None,
) -> dict:
    """Run InI training in place on ``victim`` (and ``student``); returns per-epoch term means.

    With ``progress_file`` the whole training state (both models, both optimizers, the schedule,
    the random generator and the OOD cycle) is written there after every epoch, atomically, and a
    run that finds the file resumes after its last finished epoch: a killed run loses at most one
    epoch and ends with the weights an uninterrupted run would have had.
    """
    tc = config.training
    generator = torch.Generator().manual_seed(tc.seed)
    steps = math.ceil(len(train) / tc.batch_size)
    optimizer = make_optimizer(victim, tc)
    schedule = make_schedule(optimizer, tc, tc.epochs * steps)
    s_optimizer = make_optimizer(student, config.student_training)
    ood_batches = _Cycle(ood, tc.batch_size, generator)

    def draw_ood() -> Tensor:
        x = ood_batches.next()
        return patch_shuffle(x, config.patch_grid, generator) if ood_transform else x

    parts = {
        "victim": victim,
        "student": student,
        "optimizer": optimizer,
        "student_optimizer": s_optimizer,
        "schedule": schedule,
    }
    history: list[dict] = []
    earlier_seconds = 0.0
    if progress_file is not None and progress_file.exists():
        history, earlier_seconds = _load_progress(progress_file, parts, generator, ood_batches)
        log.info("InI: resuming after epoch %d/%d from %s", len(history), tc.epochs, progress_file)
    done_epochs = len(history)
    start = time.perf_counter()
    victim.train()
    student.train()
    with progress_bar("InI victim", total=tc.epochs * steps, enabled=show_progress) as advance:
        advance(done_epochs * steps)
        for epoch in range(done_epochs, tc.epochs):
            sums = dict.fromkeys(TERMS, 0.0)
            for index in torch.randperm(len(train), generator=generator).split(tc.batch_size):
                values = victim_step(
                    victim,
                    student,
                    optimizer,
                    train.images[index],
                    train.labels[index],
                    draw_ood(),
                    config,
                    generator,
                )
                schedule.step()
                for _ in range(config.student_steps):
                    student_step(victim, student, s_optimizer, draw_ood())
                for k in TERMS:
                    sums[k] += values[k] / steps
                advance(1, loss=values["benign"])
            history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in sums.items()}})
            log.info("InI epoch %d/%d: %s", epoch + 1, tc.epochs, history[-1])
            if progress_file is not None:
                seconds = earlier_seconds + time.perf_counter() - start
                _save_progress(progress_file, parts, generator, ood_batches, history, seconds)
    victim.eval()
    student.eval()
    return {"history": history, "seconds": earlier_seconds + time.perf_counter() - start}


def train_ini_victim(
    scenario: Scenario,
    config: IniConfig,
    *,
    show_progress: bool = True,
    models: Path | None = None,
    progress_file: Path | None = None,
) -> tuple[ImageClassifier, ModelCard]:
    """Train the scenario's victim with InI (no caching; see :mod:`mirage.training.registry`);
    with ``init = "victim"`` it starts from the plain victim kept under ``models``; a killed run
    resumes from ``progress_file`` (:func:`train_ini`)."""
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    train = data.train.sample(config.num_train, config.training.seed)

    def build(seed: int) -> ImageClassifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model(
                scenario.architecture,
                data.input_shape,
                data.num_classes,
                data.mean,
                data.std,
                **scenario.arch_kwargs,
            )

    victim = build(config.training.seed)
    if config.init == "victim":
        from mirage.training.victim import get_victim

        plain, _, _ = get_victim(scenario, show_progress=show_progress, models=models)
        victim.load_state_dict(plain.state_dict())
    student = build(config.student_training.seed)
    stats = train_ini(
        victim,
        student,
        train,
        ood_source(config, train),
        config,
        ood_transform=config.ood == "patch-shuffle",
        show_progress=show_progress,
        progress_file=progress_file,
    )
    card = ModelCard(
        architecture=scenario.architecture,
        arch_kwargs=scenario.arch_kwargs,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        dataset=scenario.victim_dataset,
        test_accuracy=accuracy(victim, data.test),
        seed=config.training.seed,
        train_seconds=stats["seconds"],
        training={
            "defense": "ini",
            "config": config.model_dump(mode="json"),
            "student_test_accuracy": accuracy(student, data.test),
            "history": stats["history"],
        },
    )
    return victim, card
