"""A sweep, described in one typed config file (TOML): scenarios × defenses × budget grids ×
attacks × seeds. Built-in profiles live in ``profiles/`` (``quick`` and ``full``)."""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mirage.models.fit import TrainConfig

PROFILES_DIR = Path(__file__).parent / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DefenseGrid(_Strict):
    """One defense with fixed ``params`` and a ``grid`` of values swept (their product);
    ``scenario_grid`` replaces the grid in the scenarios it names (e.g. a smaller grid there)."""

    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    scenario_grid: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)

    def points(self, scenario: str | None = None) -> list[dict[str, Any]]:
        grid = self.scenario_grid.get(scenario, self.grid) if scenario is not None else self.grid
        keys = sorted(grid)
        combos = itertools.product(*(grid[k] for k in keys)) if keys else [()]
        return [{**self.params, **dict(zip(keys, combo))} for combo in combos]

    @property
    def display(self) -> str:
        return self.label or self.name


class AttackSpec(_Strict):
    name: str
    label: str | None = None
    budget: int = Field(gt=0)
    params: dict[str, Any] = Field(default_factory=dict)
    defenses: list[str] | None = Field(
        None, description="defense labels this attack runs against (default: all)"
    )
    reference_for: str | None = Field(
        None,
        description="draw this attack's undefended clone as a reference line on the plots "
        "of the named attack (e.g. the hard-label attacker for knockoff)",
    )
    variants: list[str] = Field(
        default_factory=list,
        description="attackers of the suite (mirage.attacks.ATTACKER_SUITE) to run, each as its "
        "own attack labelled '<label>/<variant>' with its switches added to ``params``; the "
        "report judges each defense by the worst case over them. Empty: this attack "
        "as given",
    )
    extra_variants: list[str] = Field(
        default_factory=list,
        description="attackers beyond the suite, each labelled '<label>/<variant>' like a variant: "
        "a sweep runs them where told to (e.g. `--attack knockoff/aligned --defense …`, "
        "against the defenses they answer); a point's worst case counts them where "
        "they ran but never waits for them",
    )
    extra_defenses: dict[str, list[str]] = Field(
        default_factory=dict,
        description="attacker beyond the suite -> the defense labels it runs against (the defenses "
        "it answers); an extra not named here runs against every defense",
    )

    @property
    def display(self) -> str:
        return self.label or self.name

    @model_validator(mode="after")
    def _known_variants(self) -> AttackSpec:
        from mirage.attacks.countermeasures import ATTACKER_SUITE

        unknown = [v for v in [*self.variants, *self.extra_variants] if v not in ATTACKER_SUITE]
        if unknown:
            raise ValueError(
                f"unknown attacker variants {unknown}; known: {sorted(ATTACKER_SUITE)}"
            )
        stray = sorted(set(self.extra_defenses) - set(self.extra_variants))
        if stray:
            raise ValueError(f"extra_defenses names attackers that are not extra_variants: {stray}")
        return self

    def runs_against(self, attacker: str | None, defense_label: str) -> bool:
        """Whether this attack's ``attacker`` (a variant, or None for the plain attack) runs
        against the defense labelled ``defense_label``."""
        if self.defenses is not None and defense_label not in self.defenses:
            return False
        only = self.extra_defenses.get(attacker) if attacker is not None else None
        return only is None or defense_label in only

    def expanded(self) -> list[tuple[str, dict[str, Any], str | None]]:
        """(label, params, attacker variant) of each attack this entry runs."""
        if not self.variants:
            return [(self.display, dict(self.params), None)]
        from mirage.attacks.countermeasures import variant_params

        return [
            (f"{self.display}/{v}", {**self.params, **variant_params(v)}, v)
            for v in [*self.variants, *self.extra_variants]
        ]


class UserScenario(_Strict):
    """A scenario of the user's own (docs/design.md §evaluate): their labelled images, split
    reproducibly into the defender's test set, the attacker's pool and the defender's sample;
    their model, or else a victim of the standard family trained on the data's non-test share;
    optionally the attacker's own unlabelled pool. Paths are relative to the config file."""

    data: str = Field(
        description="a labelled image folder (root/<class>/<image>) or a .npz of images, labels"
    )
    model: str | None = Field(
        None,
        description="the served model: .pt2, .onnx, a safetensors state dict "
        "(with model_class) or a mirage checkpoint folder",
    )
    model_class: str | None = Field(None, description="module:Class building a state dict's module")
    pool: str | None = Field(
        None, description="the attacker's own unlabelled images (a folder or .npy)"
    )
    split_seed: int = 0
    base: Path | None = Field(
        None, exclude=True, description="where relative paths start (the config's folder)"
    )

    def path(self, value: str) -> Path:
        """``value`` resolved against the config's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.base is None else self.base / path


class SweepConfig(_Strict):
    name: str
    scenarios: list[str]
    defenses: list[DefenseGrid]
    attacks: list[AttackSpec]
    seeds: list[int] = Field(default_factory=lambda: [0])
    clone_training: TrainConfig = TrainConfig(
        epochs=30, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, schedule="cosine"
    )
    scenario_attacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="optional: scenario -> attack labels to run there (default: all attacks)",
    )
    eval_size: int | None = Field(
        None, gt=0, description="defender accuracy on the first N test images"
    )
    models_dir: str | None = Field(
        None,
        description="keep the models this sweep trains (victims, surrogates, detectors) here, "
        "relative to the results file's directory, instead of $MIRAGE_MODELS: "
        "committed with the results, they let a resumed sweep on another machine use "
        "the very same weights (training is not bit-reproducible across CPUs)",
    )
    victim_epochs: dict[str, int] = Field(
        default_factory=dict,
        description="optional: scenario -> victim training epochs (a cheaper, separately cached "
        "victim)",
    )
    user_scenarios: dict[str, UserScenario] = Field(
        default_factory=dict,
        description="scenarios of the user's own, by name (listed in scenarios like the built-in "
        "ones): their images, their model, their attacker's pool",
    )
    data_roots: dict[str, str] = Field(
        default_factory=dict,
        description="optional: dataset -> the directory of your copy, for the datasets mirage "
        "cannot install (cifar10, cifar100: the python-version pickle batches); a machine's "
        "paths, not part of a run's identity",
    )

    @property
    def suites(self) -> dict[str, tuple[str, ...]]:
        """Attack family -> the attackers of its suite (the attacks with ``variants``), as
        :func:`mirage.bench.summary.worst_case_points` takes them; empty without a suite."""
        return {a.display: tuple(sorted(a.variants)) for a in self.attacks if a.variants}

    @model_validator(mode="after")
    def _unique_labels(self) -> SweepConfig:
        labels = [label for a in self.attacks for label, _, _ in a.expanded()]
        if len(labels) != len(set(labels)):
            raise ValueError(f"attack labels must be unique, got {labels}")
        unmapped = set(self.victim_epochs) - set(self.scenarios)
        if unmapped or any(e < 1 for e in self.victim_epochs.values()):
            raise ValueError(
                f"victim_epochs must map this sweep's scenarios to epochs ≥ 1, "
                f"got {self.victim_epochs}"
            )
        displays = {d.display for d in self.defenses}
        for attack in self.attacks:
            unknown = sorted({d for ds in attack.extra_defenses.values() for d in ds} - displays)
            if unknown:
                raise ValueError(
                    f"{attack.display}: extra_defenses names defenses not in this sweep: {unknown}"
                )
        from mirage.data import DATASETS
        from mirage.scenarios import SCENARIOS

        if unknown := sorted(set(self.data_roots) - set(DATASETS)):
            raise ValueError(f"data_roots names unknown datasets {unknown}: {sorted(DATASETS)}")
        if clash := sorted(set(self.user_scenarios) & set(SCENARIOS)):
            raise ValueError(
                f"user_scenarios {clash} would hide the built-in scenarios of the same name"
            )
        if unknown := sorted(set(self.scenarios) - set(SCENARIOS) - set(self.user_scenarios)):
            raise ValueError(
                f"unknown scenarios {unknown}: built-in ones are {sorted(SCENARIOS)}; "
                "define your own under [user_scenarios.<name>]"
            )
        for defense in self.defenses:
            outside = set(defense.scenario_grid) - set(self.scenarios)
            if outside:
                raise ValueError(
                    f"{defense.display}: scenario_grid names scenarios not in this sweep: "
                    f"{sorted(outside)}"
                )
        return self


def load_config(path_or_profile: str | Path) -> SweepConfig:
    """A TOML file path, or the name of a built-in profile (``quick``, ``full``)."""
    path = Path(path_or_profile)
    if not path.suffix and (PROFILES_DIR / f"{path_or_profile}.toml").is_file():
        path = PROFILES_DIR / f"{path_or_profile}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
        raise FileNotFoundError(f"no sweep config {path_or_profile!r} (built-in profiles: {known})")
    with open(path, "rb") as handle:
        config = SweepConfig.model_validate(tomllib.load(handle))
    base = path.resolve().parent
    return config.model_copy(
        update={
            "user_scenarios": {
                name: user.model_copy(update={"base": base})
                for name, user in config.user_scenarios.items()
            }
        }
    )
