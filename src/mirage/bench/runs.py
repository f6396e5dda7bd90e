"""A sweep expands into runs; a run is identified by the hash of everything that defines it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from mirage.bench.config import SweepConfig, UserScenario
from mirage.models.fit import TrainConfig


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: str
    defense: str
    defense_label: str
    defense_params: dict[str, Any]
    attack: str
    attack_label: str
    attack_params: dict[str, Any]
    budget: int
    seed: int
    clone_training: TrainConfig
    eval_size: int | None = None
    victim_epochs: int | None = None
    attack_family: str | None = None
    attacker: str | None = None
    user_scenario: UserScenario | None = None
    data_roots: dict[str, str] | None = None  # where this machine keeps the data: not identity

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunSpec:
        """The spec of a recorded run (a record holds the spec's fields beside its metrics)."""
        return cls(**{k: record[k] for k in cls.model_fields if k in record})

    @property
    def run_id(self) -> str:
        # labels name a run, they do not define it: a run keeps its id when relabelled (the soft
        # attacker of a suite is the plain attack of an earlier sweep)
        fields = self.model_dump(
            mode="json",
            exclude={"defense_label", "attack_label", "attack_family", "attacker", "data_roots"},
        )
        for optional in ("victim_epochs", "user_scenario"):
            if fields[optional] is None:  # runs recorded before the field existed keep their id
                del fields[optional]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in sorted(self.defense_params.items()))
        return (
            f"{self.scenario} | {self.defense_label}({params}) | {self.attack_label}"
            f"@{self.budget} | seed {self.seed}"
        )


def expand(config: SweepConfig) -> list[RunSpec]:
    runs = []
    for scenario in config.scenarios:
        allowed = config.scenario_attacks.get(scenario)
        for attack in config.attacks:
            if allowed is not None and attack.display not in allowed:
                continue
            for label, attack_params, attacker in attack.expanded():
                for defense in config.defenses:
                    if not attack.runs_against(attacker, defense.display):
                        continue
                    for params in defense.points(scenario):
                        for seed in config.seeds:
                            runs.append(
                                RunSpec(
                                    scenario=scenario,
                                    defense=defense.name,
                                    defense_label=defense.display,
                                    defense_params=params,
                                    attack=attack.name,
                                    attack_label=label,
                                    attack_params=attack_params,
                                    budget=attack.budget,
                                    seed=seed,
                                    clone_training=config.clone_training.model_copy(
                                        update={"seed": seed}
                                    ),
                                    eval_size=config.eval_size,
                                    victim_epochs=config.victim_epochs.get(scenario),
                                    attack_family=attack.display if attacker else None,
                                    attacker=attacker,
                                    user_scenario=config.user_scenarios.get(scenario),
                                    data_roots=config.data_roots or None,
                                )
                            )
    return runs
