"""Knockoff Nets, random strategy (Orekondy, Schiele & Fritz, CVPR 2019, section 4.1.1).

Sample the attacker's query pool uniformly *without replacement* up to the budget, query the API,
and train the clone on the transfer set {(x_i, ỹ_i)} with soft-label cross-entropy. The pool's
labels are never used. If the pool holds fewer images than the budget, the whole pool is used
and the rest of the budget is left unspent (logged).

Example::

    result = create_attack("knockoff").run(api, 10_000, pool, CloneSpec.like(card), seed=0)
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import Tensor

from mirage.attacks.base import Attack, AttackParams, QueryClient, StolenModel, register_attack
from mirage.attacks.clone import CloneSpec
from mirage.data.base import ImageData
from mirage.progress import progress_bar

log = logging.getLogger(__name__)


class KnockoffParams(AttackParams):
    query_batch_size: int = Field(256, ge=1, description="images per API request")


def query_all(client: QueryClient, images: Tensor, batch_size: int, description: str) -> Tensor:
    """Ask ``images`` (N, C, H, W) in requests of ``batch_size``; returns the (N, K) answers."""
    answers = []
    with progress_bar(description, total=len(images)) as advance:
        for chunk in images.split(batch_size):
            answers.append(client.query(chunk))
            advance(len(chunk))
    return torch.cat(answers) if answers else torch.empty(0, client.num_classes)


@register_attack("knockoff", params=KnockoffParams)
class Knockoff(Attack):
    """Knockoff Nets (random): a pool sampled without replacement, soft-label clone."""

    params: KnockoffParams

    def steal(
        self, client: QueryClient, data: ImageData, clone: CloneSpec, generator: torch.Generator
    ) -> StolenModel:
        n = min(client.remaining, len(data))
        if n < client.remaining:
            log.warning(
                "knockoff: pool of %d images is smaller than the %d images the budget allows; "
                "using the whole pool",
                len(data),
                client.remaining,
            )
        if n == 0:
            raise ValueError("knockoff: the budget does not cover a single query")
        index = torch.randperm(len(data), generator=generator)[:n]
        images = data.images[index]
        answers = query_all(client, images, self.params.query_batch_size, "knockoff queries")
        model, stats = self.train_final_clone(
            clone, images, answers, client.num_classes, description="knockoff clone"
        )
        return StolenModel(model, transfer_size=n, history=[{"images": n, **stats}])
