"""The attacker's own data for a scenario, by attack (docs/design.md §attack-data).

Pool attacks (Knockoff) query the scenario's :func:`~mirage.scenarios.query_pool`; seed attacks
(the JBDA family) start from :func:`~mirage.scenarios.seed_source`. The rules of both are the
scenario's, in :mod:`mirage.scenarios`.
"""

from __future__ import annotations

from mirage.data.base import ImageData
from mirage.scenarios import Scenario, query_pool, seed_source

SEED_ATTACKS = {"jbda", "jb-self", "jb-top3"}


def attack_data(scenario: Scenario, attack: str) -> ImageData:
    """The data an attack named ``attack`` brings to ``scenario``."""
    return seed_source(scenario) if attack in SEED_ATTACKS else query_pool(scenario)
