"""One typed specification of a defense, and the one step that turns it into a live defense
(docs/design.md §defense-spec). Sweeps, the service, the command line and the Python API all go
through it.

A :class:`DefenseSpec` is a registered defense's name, its parameters, and the **parts** the
defender brings, named declaratively because they cost training or sampling:

- ``surrogate``: ``"distilled"`` | ``"random"`` | ``"defender"`` (trained for the scenario, or
  loaded from the cache; ``surrogate_config`` holds the other
  :class:`~mirage.training.surrogate.SurrogateConfig` fields), or checkpoint directories (a list
  is an ensemble). GRAD² cannot go without one and gets ``"distilled"`` by default; MAD's default
  is its own random initialisation;
- ``reference``: GRAD²'s ``unlearn`` reference set, a :class:`~mirage.scenarios.ReferenceSet`
  of the defender's labelled training data (512 images, seed 0, by default);
- ``watermark``: GRAD²'s ``watermark`` behaviour set, a :class:`~mirage.scenarios.WatermarkSet`
  (the same numbers ``mirage verify`` tests for; class 1 → 8, 20 images, by default);
- ``models_config``: adaptive misinformation's outlier-exposure detector and misinformation model,
  trained for the scenario and cached (:class:`~mirage.training.misinformation_models.
  MisinformationConfig`), or ``oe_model`` / ``misinformation_model`` checkpoint directories;
- ``gate``: ``grad2_gated``'s out-of-distribution gate (:class:`GateSpec`): the score, and the
  benign false-positive rate that sets its threshold τ on a sample of the defender's own data.

Parts may be written beside ``params`` or among them, as a sweep's ``[[defenses]]`` entry does,
so the same lines configure a sweep, the service's ``[defense]`` and ``mirage attack --param``::

    name = "grad2"
    params = {epsilon = 0.5, target = "watermark", watermark = {source_class = 1, target_class = 8}}

A training-time defense (``ini``, ``dpsgd``) names a victim instead (:func:`resolve_victims`); its
query-time defense is ``none``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mirage.data.base import ImageData
from mirage.defenses import DEFENSES, Defense, create_defense
from mirage.models import ModelCard, load_checkpoint
from mirage.registry import UnknownNameError
from mirage.scenarios import (
    ReferenceSet,
    Scenario,
    WatermarkSet,
    defender_sample,
    defender_watermark,
)
from mirage.training.misinformation_models import MisinformationConfig, get_misinformation_models
from mirage.training.registry import (
    TRAINING_DEFENSES,
    get_defended_victim,
    is_training_time,
    resolve_config,
)
from mirage.training.surrogate import SurrogateConfig, get_surrogate
from mirage.training.victim import get_victim

SurrogateKind = Literal["distilled", "random", "defender"]
Checkpoints = Path | list[Path]

FILLS = {
    "surrogate": "surrogate",
    "surrogate_config": "surrogate",
    "reference": "reference_x",
    "watermark": "watermark_x",
    "models_config": "oe_model",
    "oe_model": "oe_model",
    "misinformation_model": "misinformation_model",
    "gate": "gate_score",
}
"""Each part, and the defense parameter it fills: a defense takes the parts of its parameters.
Declarative values under these keys among the parameters are lifted into the spec's parts."""
PART_KEYS = tuple(FILLS)

DEFAULT_SURROGATE: dict[str, SurrogateKind] = {"grad2": "distilled", "grad2_gated": "distilled"}
"""Defenses that cannot go without a surrogate, and the kind they get when none is named."""


def _declarative(value: Any) -> bool:
    """A part named by configuration (a kind, a path, a table), not a live model or tensor."""
    if isinstance(value, list | tuple):
        return bool(value) and all(isinstance(v, str | Path) for v in value)
    return isinstance(value, str | Path | dict | BaseModel)


class GateSpec(BaseModel):
    """``grad2_gated``'s gate as configuration: the score (``gate_model`` is the victim, or for
    ``oe-msp`` adaptive misinformation's outlier-exposure detector, trained as ``models_config``
    says) and τ, the ``benign_fpr`` quantile of the scores of ``calibration``, a sample of the
    defender's own training data (the victim has seen it, so its scores there run a little
    higher than on unseen benign queries: the benchmark measures the real cost on the test set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: Literal["msp", "oe-msp", "max-logit", "neg-energy"] = "neg-energy"
    benign_fpr: float = Field(0.005, ge=0, lt=1)
    calibration: ReferenceSet = ReferenceSet(size=4000, seed=1)
    models_config: MisinformationConfig | None = None


@dataclass(frozen=True)
class Parts:
    """What a spec resolves to, defaults included: ``None`` where the defense takes no such part
    or already holds the object in its parameters."""

    surrogate: SurrogateKind | Checkpoints | None
    reference: ReferenceSet | None
    watermark: WatermarkSet | None
    misinformation: MisinformationConfig | tuple[Path, Path] | None
    gate: GateSpec | None = None

    def needing_a_scenario(self) -> list[str]:
        """The parts drawn from a scenario's data or victim (not from checkpoints)."""
        return [
            name
            for name, value in (
                ("surrogate", self.surrogate),
                ("reference", self.reference),
                ("watermark", self.watermark),
                ("models_config", self.misinformation),
                ("gate", self.gate),
            )
            if value is not None and not isinstance(value, Path | list | tuple)
        ]


class DefenseSpec(BaseModel):
    """A defense as configuration: a registered name (query-time or training-time), its
    parameters, and the parts it needs (module docstring). Validated when built: unknown names,
    unknown parameters and parts the defense does not take are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "none"
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the defense's parameters (a training-time defense's config)",
    )
    surrogate: SurrogateKind | Checkpoints | None = Field(
        None,
        description="a surrogate kind trained for the scenario, or checkpoint dir(s) "
        "(a list: an ensemble)",
    )
    surrogate_config: dict[str, Any] = Field(
        default_factory=dict, description="SurrogateConfig fields besides the kind"
    )
    reference: ReferenceSet | None = Field(
        None, description="grad2 target='unlearn': its reference set"
    )
    watermark: WatermarkSet | None = Field(
        None, description="grad2 target='watermark': its behaviour set"
    )
    models_config: MisinformationConfig | None = Field(
        None,
        description="adaptive_misinformation: how its detector and misinformation model are "
        "trained",
    )
    oe_model: Path | None = Field(
        None, description="adaptive_misinformation: the detector's checkpoint dir"
    )
    misinformation_model: Path | None = Field(
        None, description="adaptive_misinformation: the misinformation model's checkpoint dir"
    )
    gate: GateSpec | None = Field(
        None, description="grad2_gated: its gate score and benign false-positive rate"
    )

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> DefenseSpec:
        """The spec of a sweep's defense point: ``name`` and its flat ``params``."""
        return cls(name=name, params=params)

    @model_validator(mode="before")
    @classmethod
    def _parts_among_params(cls, data: Any) -> Any:
        """Lift parts written among the parameters (a sweep's flat form) beside them."""
        if not isinstance(data, dict) or is_training_time(data.get("name", "none")):
            return data
        params = dict(data.get("params") or {})
        lifted = {
            key: params.pop(key) for key in PART_KEYS if key in params and _declarative(params[key])
        }
        if both := sorted(key for key in lifted if data.get(key) not in (None, {})):
            raise ValueError(f"{both} given both among params and beside them")
        return {**data, "params": params, **lifted} if lifted else data

    @model_validator(mode="after")
    def _valid(self) -> DefenseSpec:
        given = [key for key in PART_KEYS if getattr(self, key) not in (None, {})]
        if self.training_time:
            if given:
                raise ValueError(f"training-time defense {self.name!r} takes no parts, got {given}")
            resolve_config(self.name, self.params)
            return self
        if self.name not in DEFENSES:
            raise UnknownNameError("defense", self.name, {*DEFENSES, *TRAINING_DEFENSES})
        fields = DEFENSES[self.name].params.model_fields
        if unknown := sorted(set(self.params) - set(fields)):
            raise ValueError(f"{self.name} has no parameters {unknown}; it takes {sorted(fields)}")
        if refused := [key for key in given if FILLS[key] not in fields]:
            raise ValueError(f"{self.name} takes no {refused}")
        target = self._target()
        for part, wanted in (("reference", "unlearn"), ("watermark", "watermark")):
            if getattr(self, part) is not None and target != wanted:
                raise ValueError(f"{part} is the {part} set of target={wanted!r} only")
        if self.surrogate_config:
            if not isinstance(self.parts().surrogate, str):
                raise ValueError(
                    "surrogate_config configures a trained surrogate: name its kind "
                    "(surrogate = 'distilled' | 'random' | 'defender')"
                )
            SurrogateConfig(kind=self.parts().surrogate, **self.surrogate_config)
        if (self.oe_model is None) != (self.misinformation_model is None) or (
            self.oe_model is not None and self.models_config is not None
        ):
            raise ValueError(
                "give both oe_model and misinformation_model checkpoints, or models_config"
            )
        return self

    @property
    def training_time(self) -> bool:
        """A training-time defense: the victim differs, and nothing runs at query time."""
        return is_training_time(self.name)

    def parts(self) -> Parts:
        """The parts this spec resolves to, with the defaults a defense gets when none is named."""
        if self.training_time:
            return Parts(None, None, None, None)
        fields, params, target = (
            DEFENSES[self.name].params.model_fields,
            self.params,
            self._target(),
        )
        surrogate = self.surrogate
        if surrogate is None and params.get("surrogate") is None:
            surrogate = DEFAULT_SURROGATE.get(self.name)
        reference = watermark = misinformation = None
        if target == "unlearn" and params.get("reference_x") is None:
            reference = self.reference or ReferenceSet()
        if target == "watermark" and params.get("watermark_x") is None:
            watermark = self.watermark or WatermarkSet()
        if "oe_model" in fields and params.get("oe_model") is None:
            misinformation = (
                (self.oe_model, self.misinformation_model)
                if self.oe_model is not None and self.misinformation_model is not None
                else self.models_config or MisinformationConfig()
            )
        gate = None
        if "gate_score" in fields and params.get("tau") is None:
            gate = self.gate or GateSpec()
        return Parts(surrogate, reference, watermark, misinformation, gate)

    def _target(self) -> str | None:
        """GRAD²'s target (given or default); ``None`` for a defense without targets."""
        fields = DEFENSES[self.name].params.model_fields
        return self.params.get("target", fields["target"].default if "target" in fields else None)

    def anchored(self, base: Path) -> DefenseSpec:
        """A copy whose relative checkpoint paths are taken relative to ``base`` (``~``
        expanded)."""

        def fix(path: Any) -> Any:
            if isinstance(path, list):
                return [fix(p) for p in path]
            if not isinstance(path, Path):
                return path
            path = path.expanduser()
            return path if path.is_absolute() else base / path

        return self.model_copy(
            update={
                key: fix(getattr(self, key))
                for key in ("surrogate", "oe_model", "misinformation_model")
            }
        )


@dataclass(frozen=True)
class Victims:
    """The models behind a defended API. ``plain`` is the scenario's plain victim, the reference
    for "clean" answers; ``served`` answers the queries: the plain victim itself, or a
    training-time defense's (``training_time``), whose cost is measured against ``plain``.
    ``card`` is the served model's."""

    plain: nn.Module
    served: nn.Module
    card: ModelCard
    training_time: bool


def resolve_victims(
    spec: DefenseSpec,
    scenario: Scenario,
    *,
    show_progress: bool = False,
    models: Path | None = None,
    train: bool = True,
) -> Victims:
    """The plain victim and the served one for ``spec`` (trained, or loaded from ``models``:
    default :func:`mirage.paths.models_dir`; ``train=False``: loaded or refused)."""
    plain, plain_card, _ = get_victim(
        scenario, show_progress=show_progress, models=models, train=train
    )
    if not spec.training_time:
        return Victims(plain, plain, plain_card, training_time=False)
    served, card, _ = get_defended_victim(
        scenario, spec.name, spec.params, show_progress=show_progress, models=models, train=train
    )
    return Victims(plain, served, card, training_time=True)


def resolve_params(
    spec: DefenseSpec,
    scenario: Scenario | None,
    victim: nn.Module | None = None,
    card: ModelCard | None = None,
    *,
    models: Path | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """``spec.params`` with every part replaced by the object it names: trained or loaded from
    ``models`` (default :func:`mirage.paths.models_dir`) for ``scenario`` (whose victim is
    ``victim``, with ``card``), or loaded from checkpoints. ``scenario`` may be ``None`` when every
    part is a checkpoint. ``train=False`` loads and never trains
    (:class:`~mirage.models.ModelNotPrepared`)."""
    if spec.training_time:
        raise ValueError(f"{spec.name} is a training-time defense: resolve_victims builds it")
    parts = spec.parts()
    if scenario is None and (needed := parts.needing_a_scenario()):
        live = {
            "reference": "reference_x=<your labelled images (M, C, H, W)> and "
            "reference_y=<their labels (M,)>",
            "surrogate": "surrogate=<an nn.Module or a checkpoint path> "
            "(mirage distil-surrogate makes one)",
            "watermark": "watermark_x= and watermark_y=<your behaviour set>",
        }
        options = "; ".join(live[part] for part in needed if part in live)
        raise ValueError(
            f"{spec.name}: {', '.join(needed)} {'needs' if len(needed) == 1 else 'need'} a "
            "scenario, whose data and victim they come from, or give "
            + (options or "checkpoints")
            + " (mirage.evaluate builds them from your data)"
        )

    def drawn_from() -> Scenario:
        assert scenario is not None  # the parts needing one were checked above
        return scenario

    params = dict(spec.params)
    if parts.surrogate is not None:
        params["surrogate"] = _surrogate(
            spec, parts.surrogate, scenario, victim, card, models, train
        )
    if parts.reference is not None:
        params["reference_x"], params["reference_y"] = _labelled(
            defender_sample(drawn_from(), parts.reference)
        )
    if parts.watermark is not None:
        params["watermark_x"], params["watermark_y"] = _labelled(
            defender_watermark(drawn_from(), parts.watermark)
        )
    if isinstance(parts.misinformation, tuple):
        params["oe_model"], params["misinformation_model"] = (
            _load(p) for p in parts.misinformation
        )
    elif parts.misinformation is not None:
        params["oe_model"], params["misinformation_model"] = get_misinformation_models(
            drawn_from(), parts.misinformation, models=models, train=train
        )
    if parts.gate is not None:
        params.update(_gate(parts.gate, drawn_from(), victim, models, train))
    return params


def _gate(
    gate: GateSpec,
    scenario: Scenario,
    victim: nn.Module | None,
    models: Path | None,
    train: bool = True,
) -> dict[str, Any]:
    """``gate``, ``gate_model`` and ``tau`` of ``grad2_gated`` for ``scenario``'s victim."""
    import torch

    from mirage.defenses.grad2 import benign_threshold, gate_scores

    if victim is None:
        raise ValueError("a gate is calibrated on the victim's answers: pass the victim")
    model = (
        get_misinformation_models(
            scenario, gate.models_config or MisinformationConfig(), models=models, train=train
        )[0]
        if gate.score == "oe-msp"
        else victim
    )
    images = defender_sample(scenario, gate.calibration).images
    with torch.no_grad():
        probs = torch.cat([torch.softmax(victim.eval()(chunk), 1) for chunk in images.split(1024)])
    scores = gate_scores(gate.score, images, probs, model)
    return {
        "gate_score": gate.score,
        "gate_model": None if gate.score == "msp" else model,
        "tau": benign_threshold(scores, gate.benign_fpr),
    }


def resolve_defense(
    spec: DefenseSpec,
    scenario: Scenario | None,
    victim: nn.Module | None = None,
    card: ModelCard | None = None,
    *,
    models: Path | None = None,
) -> Defense:
    """The live query-time defense of ``spec`` (``none`` for a training-time defense), its parts
    from ``models`` (:func:`resolve_params`)."""
    if spec.training_time:
        return create_defense("none")
    return create_defense(spec.name, **resolve_params(spec, scenario, victim, card, models=models))


def _surrogate(
    spec: DefenseSpec,
    source: SurrogateKind | Checkpoints,
    scenario: Scenario | None,
    victim: nn.Module | None,
    card: ModelCard | None,
    models: Path | None,
    train: bool = True,
) -> nn.Module | list[nn.Module]:
    if isinstance(source, Path):
        return _load(source)
    if isinstance(source, Sequence) and not isinstance(source, str):
        return [_load(p) for p in source]
    if victim is None or card is None:
        raise ValueError(f"a {source} surrogate is trained for a victim: pass it and its card")
    if scenario is None:
        raise ValueError(f"a {source} surrogate is trained on a scenario's data: pass it")
    members, _, _ = get_surrogate(
        scenario,
        victim,
        card,
        SurrogateConfig(kind=source, **spec.surrogate_config),
        models=models,
        train=train,
    )
    return members if len(members) > 1 else members[0]


def _load(path: Path) -> nn.Module:
    return load_checkpoint(path)[0].eval()


def _labelled(data: ImageData) -> tuple[Tensor, Tensor]:
    return data.images, data.labels
