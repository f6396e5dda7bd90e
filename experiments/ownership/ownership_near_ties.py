"""How often the victim hesitates, on benign data and on a thief's pool (no clone).

For ``tie_gap`` (docs/design.md §ownership): the share of each scenario's test set and of its
15k-image query pool whose victim answer has ``p₁ − p_m ≤ g`` (m = 2 and 3), and on the test set
an upper bound on what carrying all of those would cost benign users: the share of them the
victim gets right, less what the j-th class would get right on average (m = 3: ranks 2 and 3;
m = 2: the K − 2 classes outside the pair, never right when the victim is).

    python experiments/ownership/ownership_near_ties.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.data import load_dataset
from mirage.models.base import clean_posteriors
from mirage.scenarios import get_scenario, query_pool
from mirage.training.victim import get_victim

GAPS = (0.2, 0.3, 0.4, 0.5, 0.6)


def main() -> None:
    torch.set_num_threads(1)
    for name in ("mnist", "fmnist-id"):
        scenario = get_scenario(name)
        victim, _, _ = get_victim(scenario)
        test = load_dataset(scenario.victim_dataset).test
        labels = torch.as_tensor(test.labels)
        on_test = clean_posteriors(victim, test.images, batch_size=1024)
        on_pool = clean_posteriors(victim, query_pool(scenario).images[:15000], batch_size=1024)
        order = on_test.argsort(dim=1, descending=True)
        right = order[:, 0] == labels
        for m in (2, 3):
            alternative = (
                torch.zeros(len(labels))
                if m == 2
                else torch.stack([order[:, j] == labels for j in (1, 2)], 1).float().mean(1)
            )
            for gap in GAPS:
                test_top, pool_top = on_test.topk(m, dim=1).values, on_pool.topk(m, dim=1).values
                near = test_top[:, 0] - test_top[:, -1] <= gap
                pool_near = pool_top[:, 0] - pool_top[:, -1] <= gap
                cost = 100 * (right.float() - alternative)[near].sum() / len(labels)
                print(
                    f"{name} p1-p{m} <= {gap}: test {100 * near.float().mean():.2f} % "
                    f"(cost <= {cost:.2f} points if all carried), "
                    f"pool {100 * pool_near.float().mean():.2f} %"
                )


if __name__ == "__main__":
    main()
