"""The label-aligning attacker (docs/design.md §countermeasures): a handful of labelled images of
the victim's task against a defense that relabels the attacker's queries consistently.

A defense that answers attacker-like queries with a *consistent* wrong behaviour — the victim's
posterior with its classes moved by a fixed permutation (``grad2_gated``'s
``attacker_answer="permute"``), or a misinformation model that prefers particular wrong classes —
teaches the clone a relabelled victim. An attacker holding ``n`` labelled images of the task
(never queried: they cost no budget) reads that relabelling off its clone's confusions on them:
σ = the class assignment maximising Σ_a C[a, σ(a)] over the confusion counts C[clone class,
true class] (the Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``). When σ is not the
identity it moves every answer's class a to σ(a), retrains, and keeps whichever clone is more
accurate on its labelled images (so the switch never costs it anything it can measure).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mirage.api.inprocess import clean_posteriors
from mirage.data.base import ImageData


def class_alignment(model: nn.Module, labelled: ImageData, num_classes: int) -> Tensor:
    """(K,) σ with σ[a] the true class the clone's class a stands for: the assignment that
    maximises the labelled images the clone gets right after relabelling."""
    predicted = clean_posteriors(model, labelled.images).argmax(1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((predicted, labelled.labels), torch.ones_like(predicted), accumulate=True)
    rows, columns = linear_sum_assignment(confusion.numpy(), maximize=True)
    sigma = torch.empty(num_classes, dtype=torch.long)
    sigma[torch.as_tensor(rows)] = torch.as_tensor(columns)
    return sigma


def realign(answers: Tensor, sigma: Tensor) -> Tensor:
    """(N, K) answers with class a's entry moved to class σ(a)."""
    moved = torch.empty_like(answers)
    moved[:, sigma] = answers
    return moved
