"""RobustBench-style evaluation (docs/design.md §protect, §evaluate).

:func:`evaluate_model` judges anything a user brings — their own model and labelled images, with
a defense built from their data — against the attacker suite, and gives the worst-case verdict of
the sweeps (:func:`mirage.bench.summary.verdict`) from the same kind of run records::

    report = mirage.evaluate(
        net,
        "my-images/",
        "grad2",
        params={"epsilon": 0.5, "target": "unlearn", "preserve_top1": True},
    )
    print(report.advice)

:func:`evaluate` is one run of the protocol (docs/design.md §protocol) on a scenario's victim
behind a defense *instance*, without a sweep, a run id or a cache of answers::

    import mirage

    defense = mirage.create_defense("grad2", epsilon=0.5, surrogate=surrogate)
    result = mirage.bench.evaluate(defense, scenario="fmnist", attack="knockoff", budget=10_000)
    result.clone_accuracy, result.defender_accuracy

The victim is the scenario's (trained or loaded from the cache) unless ``victim`` is given; the
attacker's data, clone and recipe are the protocol's (:func:`mirage.attacks.pools.attack_data`,
:meth:`mirage.attacks.CloneSpec.like`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

import torch
from torch import Tensor, nn

from mirage.attacks import ATTACKS, CloneSpec
from mirage.bench.config import UserScenario
from mirage.bench.protocol import (
    RunContext,
    RunMetrics,
    Stores,
    plain_params,
    run_attack,
    scenario_context,
)
from mirage.data import ImageData
from mirage.data.base import channel_stats
from mirage.defenses import Defense
from mirage.models import ModelCard
from mirage.models.fit import TrainConfig
from mirage.scenarios import Scenario, get_scenario

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """What one run measured: the clone's and the defended API's test accuracy (``eval_size``
    test images for the defender), the undefended victim's, and what the answers cost in L1."""

    clone_accuracy: float
    defender_accuracy: float
    victim_accuracy: float
    defender_l1: float
    effective_l1: float | None
    queries: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    defense: Defense | None,
    *,
    scenario: str | Scenario = "digits",
    attack: str = "knockoff",
    budget: int = 1000,
    seed: int = 0,
    attack_params: dict[str, Any] | None = None,
    clone_training: TrainConfig | str = "grad2",
    eval_size: int | None = None,
    victim: nn.Module | None = None,
    card: ModelCard | None = None,
) -> Evaluation:
    """Attack ``scenario``'s victim behind ``defense`` (``None``: undefended) with ``attack`` and
    ``budget`` queries, seeded by ``seed``, by the run protocol
    (:func:`~mirage.bench.protocol.run_attack`); the defender's accuracy is measured on a copy of
    the defense as it was before the attack (a stateful defense's answers do not depend on it)."""

    scenario = get_scenario(scenario) if isinstance(scenario, str) else scenario
    stores = Stores.models_only()
    if victim is not None and card is None:
        raise ValueError("a given victim needs its card (the clone is built like it)")
    context = scenario_context(
        scenario,
        "none",
        {},
        stores,
        clone_training=clone_training,
        victim=None if victim is None or card is None else (victim, card),
    )
    context = dataclasses.replace(
        context,
        defense=defense,
        defense_name="none" if defense is None else defense.name,
        public_params=plain_params(defense),
    )
    stolen = run_attack(context, attack, attack_params or {}, budget, seed)
    defender = context.defender_metrics(eval_size)
    return Evaluation(
        clone_accuracy=stolen.clone["clone_accuracy"],
        defender_accuracy=defender["defender_accuracy"],
        victim_accuracy=defender["victim_accuracy"],
        defender_l1=defender["defender_l1"],
        effective_l1=stolen.result.effective_l1,
        queries=stolen.result.queries,
    )


# -- anything a user brings ----------------------------------------------------------------------

DEFAULT_ATTACKERS = ("soft", "hard-label", "averaging", "restorer", "noise-robust")
"""The attackers :func:`evaluate_model` runs unless told: the ``worst_case`` sweep's suite."""
USER_SCENARIO = "yours"


@dataclass(frozen=True)
class UserSplit:
    """A user's labelled images split reproducibly (docs/design.md §evaluate): the defender's test
    set (accuracy, clones judged on it), the attacker's in-distribution pool (its labels are the
    label-aligning attacker's only) and the defender's own sample (GRAD²'s reference set, the
    surrogate's distillation images)."""

    test: ImageData
    pool: ImageData
    sample: ImageData
    classes: int
    labelled: ImageData | None = None  # what the label-aligning attacker holds (default: the pool)

    @property
    def attacker_labelled(self) -> ImageData:
        return self.pool if self.labelled is None else self.labelled

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.test.input_shape


def split_user_data(
    data: Any, *, seed: int = 0, test_fraction: float = 0.2, sample_fraction: float = 0.1
) -> UserSplit:
    """``data`` as a :class:`UserSplit`: an image folder (``root/<class>/<image>``, loaded at its
    own size and channels), an :class:`~mirage.data.ImageData`, a
    :class:`~mirage.data.DatasetSplits` (its splits joined), ``(images, labels)`` as tensors or
    arrays (images (N, C, H, W) in [0, 1], or uint8), or a torch ``Dataset`` of (image, label)."""
    images, labels = _labelled(data)
    if images.ndim != 4 or labels.shape != (len(images),):
        raise ValueError(
            f"need images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("pixel values must be finite and in [0, 1]")
    if len(images) < 50:
        raise ValueError(f"{len(images)} images are too few to split into test, pool and sample")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test, n_sample = round(test_fraction * len(images)), round(sample_fraction * len(images))
    part = {
        "test": order[:n_test],
        "sample": order[n_test : n_test + n_sample],
        "pool": order[n_test + n_sample :],
    }
    whole = ImageData(images.float().contiguous(), labels.long())
    return UserSplit(
        test=whole.subset(part["test"]),
        pool=whole.subset(part["pool"]),
        sample=whole.subset(part["sample"]),
        classes=int(labels.max()) + 1,
    )


def _labelled(data: Any) -> tuple[Tensor, Tensor]:
    import numpy as np

    from mirage.data import DatasetSplits
    from mirage.data.folders import load_image_folder

    if isinstance(data, str | Path):
        data = load_image_folder(Path(data), test_fraction=0.0)
    if isinstance(data, DatasetSplits):
        return torch.cat([data.train.images, data.test.images]), torch.cat(
            [data.train.labels, data.test.labels]
        )
    if isinstance(data, ImageData):
        return data.images, data.labels
    if isinstance(data, tuple) and len(data) == 2:
        images, labels = (
            torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v for v in data
        )
        if images.dtype == torch.uint8:
            images = images.float() / 255
        return images.float(), labels.long()
    if isinstance(data, torch.utils.data.Dataset):
        pairs = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        return torch.stack([torch.as_tensor(x) for x, _ in pairs]).float(), torch.tensor(
            [int(y) for _, y in pairs]
        )
    raise TypeError(
        f"cannot read labelled images from {type(data).__name__}: give an image folder, ImageData, "
        "DatasetSplits, (images, labels) or a torch Dataset"
    )


@dataclass
class ModelEvaluation:
    """What :func:`evaluate_model` measured: one run record per (defense, attacker, seed) in the
    sweeps' format, the worst-case points, the verdict row and its words, the clones, and the runs
    whose clone collapsed or diverged (flagged, never counted as protection)."""

    records: list[dict[str, Any]]
    points: list[Any]
    verdict: dict[str, Any]
    advice: str
    clones: dict[tuple[str, str, int], nn.Module]
    failed: list[dict[str, Any]]

    def report(self) -> str:
        """The result as Markdown: each attacker's clone per defense, the worst case, the cost and
        the verdict in words."""
        lines = [
            "| defense | attacker | seed | clone accuracy | defender accuracy | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.records:
            note = (
                "collapsed"
                if r.get("clone_collapsed")
                else "diverged"
                if r.get("clone_diverged")
                else ""
            )
            lines.append(
                f"| {r['defense']} | {r['attacker']} | {r['seed']} | {r['clone_accuracy']:.4f} | "
                f"{r['defender_accuracy']:.4f} | {note} |"
            )
        worst = [
            f"- {p.defense}: worst case {p.worst:.4f} ({p.worst_attacker}), defender cost "
            f"{100 * p.drop:.2f} points"
            + (f", overhead {p.overhead_ratio:.2f}×" if p.overhead_ratio else "")
            for p in self.points
        ]
        return "\n".join(
            [
                "## Runs",
                "",
                *lines,
                "",
                "## Worst case",
                "",
                *worst,
                "",
                "## Verdict",
                "",
                self.advice,
                "",
            ]
        )


def evaluate_model(
    model: nn.Module | Any,
    data: Any,
    defense: str | None = None,
    *,
    params: dict[str, Any] | None = None,
    attack: str = "knockoff",
    attackers: tuple[str, ...] = DEFAULT_ATTACKERS,
    budget: int = 2000,
    seeds: tuple[int, ...] = (0, 1, 2),
    clone_training: TrainConfig | str = "grad2",
    surrogate: nn.Module | None = None,
    baseline: nn.Module | None = None,
    pool: Any = None,
    split_seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> ModelEvaluation:
    """Judge ``model`` behind ``defense`` against the attacker suite on the user's own ``data``
    (docs/design.md §evaluate); also the undefended model, against the same attackers and seeds,
    so the verdict compares them (:func:`mirage.bench.summary.verdict`).

    ``model``: any module mapping images (the data's shape) to logits; a
    :class:`~mirage.protection.Protected` (its model and defense; ``defense`` then stays None); or
    a prediction API such as :class:`~mirage.serve.HTTPPredictionAPI` for a served endpoint
    (black-box: every query and the defender's accuracy are charged to its key; the undefended
    comparison is ``baseline``, the model itself, when given). ``defense`` with ``params`` is
    built from the user's data: a missing ``surrogate`` is distilled from the model on the
    defender's sample (:func:`mirage.training.surrogate.distil_surrogate`), a missing GRAD²
    reference set is that sample. The clone is
    :func:`~mirage.training.surrogate.architecture_for` the input, normalised by the pool's
    statistics, trained with ``clone_training``. ``pool``: the attacker's own unlabelled images
    (a folder or ``.npy`` file for :func:`~mirage.data.folders.load_images`, or a tensor), an
    out-of-distribution attacker, instead of the in-distribution share of ``data``. Every
    parameter is checked before anything
    trains; a clone that collapsed or diverged is flagged in ``failed`` and left out of the
    worst case, as in the sweeps. Clones and the surrogate train on ``device``
    (:func:`mirage.devices.resolve_device`: the argument, ``$MIRAGE_DEVICE`` or the CPU); the
    model and the defense answer on the CPU."""
    from mirage.attacks.countermeasures import variant_params
    from mirage.bench.summary import verdict, verdict_advice, worst_case_points
    from mirage.devices import resolve_device
    from mirage.progress import progress_bar

    remote = not isinstance(model, nn.Module) and callable(getattr(model, "query", None))
    given = None
    if isinstance(getattr(model, "defense", None), Defense) and hasattr(
        model, "predict"
    ):  # a Protected model
        if defense is not None or model.preprocess is not None:
            raise ValueError(
                "a Protected model brings its own defense (and no preprocess): pass defense=None"
            )
        model, given = model.model, model.defense
    if remote and defense is not None:
        raise ValueError("a served endpoint answers with its own defense: pass defense=None")
    served_defense = (
        (model.defense or {}).get("name") if remote and not isinstance(model, nn.Module) else None
    )  # disclosed by the server, or None
    for attacker in attackers:
        if "restorer" in variant_params(attacker) and remote and served_defense is None:
            raise ValueError(
                f"the {attacker} attacker simulates the served defense, which this endpoint "
                "does not disclose: leave it out, or serve with access.disclose_defense = true"
            )
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {sorted(ATTACKS)}")
    if budget < 1 or not seeds:
        raise ValueError("budget must be at least 1 and seeds not empty")
    params = dict(params or {})
    if defense is not None:
        _check_params(defense, params)
    device = resolve_device(device)
    split = split_user_data(data, seed=split_seed)
    if pool is not None:
        if attack == "knockoff-adaptive":
            raise ValueError(
                "knockoff-adaptive groups the pool by its labels: an unlabelled pool cannot "
                "serve it"
            )
        split = _with_pool(split, pool)
    clone_spec = split_clone(split, clone_training, device=str(device))
    contexts = _contexts(
        model,
        remote,
        given,
        defense,
        params,
        split,
        surrogate,
        baseline,
        served_defense,
        device,
        clone_spec,
    )
    plan = len(contexts) * len(attackers) * len(seeds)
    log.info(
        "evaluate: %d clones to train (%s attack, %d queries each, %s on %s)",
        plan,
        attack,
        budget,
        clone_spec.architecture,
        split.input_shape,
    )
    records, clones, failed = [], {}, []
    with progress_bar("clones", plan, enabled=progress) as advance:
        for context in contexts:
            overhead = context.overhead(context.pool.images[:256])
            for attacker in attackers:
                for seed in seeds:
                    record, clone = _one_run(context, attack, attacker, seed, budget, overhead)
                    records.append(record)
                    clones[(context.defense_name, attacker, seed)] = clone
                    if record["clone_collapsed"] or record["clone_diverged"]:
                        failed.append(record)
                        log.warning(
                            "the %s clone against %s (seed %d) %s: flagged, not counted",
                            attacker,
                            context.defense_name,
                            seed,
                            "diverged" if record["clone_diverged"] else "collapsed",
                        )
                    advance(1, clone=record["clone_accuracy"])
    panels = worst_case_points(records, {attack: tuple(attackers)})
    (row,) = verdict(panels) if panels else ({"deploy": "none"},)
    advice = (
        verdict_advice(row)
        if panels
        else "No attacker produced a healthy clone: nothing can be judged."
    )
    return ModelEvaluation(
        records=records,
        points=panels.get((USER_SCENARIO, attack), []),
        verdict=row,
        advice=advice,
        clones=clones,
        failed=failed,
    )


def split_clone(
    split: UserSplit, clone_training: TrainConfig | str, device: str = "cpu"
) -> CloneSpec:
    """The clone an attacker trains on a user's data (docs/design.md §evaluate): the standard
    family sized to the input (:func:`~mirage.training.surrogate.architecture_for`), normalised by
    the attacker's pool's own statistics, trained with ``clone_training`` on ``device``."""
    from mirage.attacks.clone import recipe
    from mirage.training.surrogate import architecture_for

    mean, std = channel_stats(split.pool.images)
    return CloneSpec(
        architecture=architecture_for(split.input_shape),
        mean=mean,
        std=std,
        training=recipe(clone_training),
        device=device,
    )


def split_context(
    scenario: str, split: UserSplit, clone: CloneSpec, stores: Stores, **target: Any
) -> RunContext:
    """A run context on a user's split: its test set, its attacker pool (also the seed images),
    the labelled images the label-aligning attacker holds, and ``target`` (the served model or
    endpoint, the defense and what the attacker is told of it)."""
    return RunContext(
        scenario=scenario,
        test=split.test,
        pool=split.pool,
        seeds=split.pool,
        labelled=split.attacker_labelled,
        clone=clone,
        stores=stores,
        **target,
    )


def _contexts(
    model: Any,
    remote: bool,
    given: Defense | None,
    defense: str | None,
    params: dict[str, Any],
    split: UserSplit,
    surrogate: nn.Module | None,
    baseline: nn.Module | None,
    served_defense: str | None,
    device: torch.device,
    clone: CloneSpec,
) -> list[RunContext]:
    """The run contexts of an evaluation: the undefended model (when the model, or a baseline, is
    at hand) and the defended one, all on the user's split."""

    def context(**target: Any) -> RunContext:
        return split_context(USER_SCENARIO, split, clone, Stores.models_only(), **target)

    plain = _as_classifier(baseline if remote else model, split)
    contexts = [] if plain is None else [context(served=plain, plain=plain)]
    if remote:
        public = {
            k: v for k, v in ((model.defense or {}).get("params") or {}).items() if _public(v)
        }
        contexts.append(
            context(
                endpoint=model,
                plain=plain,
                defense_name=served_defense or "served",
                public_params=public,
            )
        )
    elif given is not None:
        contexts.append(
            context(
                served=plain,
                plain=plain,
                defense=given,
                defense_name=given.name,
                public_params=plain_params(given),
            )
        )
    elif defense is not None:
        if plain is None:
            raise ValueError(f"defense {defense} is built for a model: give one")
        built = _build_defense(plain, defense, params, split, surrogate, device)
        contexts.append(
            context(
                served=plain,
                plain=plain,
                defense=built,
                defense_name=defense,
                public_params={k: v for k, v in params.items() if _public(v)},
            )
        )
    return contexts


def _with_pool(split: UserSplit, pool: Any) -> UserSplit:
    """``split`` with the attacker's own unlabelled images as its pool (labels unknown: -1)."""
    from mirage.data.folders import load_images

    images = load_images(pool) if isinstance(pool, str | Path) else torch.as_tensor(pool).float()
    if images.ndim != 4 or tuple(images.shape[1:]) != split.input_shape:
        raise ValueError(
            f"the attacker's pool must be images {split.input_shape} like the data's, got "
            f"{tuple(images.shape[1:])}"
        )
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("the attacker's pool must hold pixel values in [0, 1]")
    unlabelled = ImageData(images.contiguous(), torch.full((len(images),), -1, dtype=torch.int64))
    return UserSplit(
        test=split.test,
        pool=unlabelled,
        sample=split.sample,
        classes=split.classes,
        labelled=split.pool,
    )


@overload
def _as_classifier(model: nn.Module, split: UserSplit) -> nn.Module: ...
@overload
def _as_classifier(model: None, split: UserSplit) -> None: ...
def _as_classifier(model: nn.Module | None, split: UserSplit) -> nn.Module | None:
    """A user's module in eval mode, knowing its input shape, checked against the data's classes."""
    if model is None:
        return None
    if getattr(model, "input_shape", None) is None:  # any module: it learns its shape from the data
        from mirage.models.formats import ExternalModel

        model = ExternalModel(model, split.input_shape)
    model = model.eval()
    with torch.no_grad():
        logits = model(split.test.images[:2])
    if logits.ndim != 2 or logits.shape[1] < split.classes:
        raise ValueError(
            f"the model answers shape {tuple(logits.shape)} for 2 images of {split.classes} classes"
        )
    return model


def _one_run(
    context: RunContext, attack: str, attacker: str, seed: int, budget: int, overhead: float | None
) -> tuple[dict[str, Any], nn.Module]:
    """One attacker at one seed against one context: the run record (the sweeps' fields) and the
    clone."""
    from mirage.attacks.countermeasures import variant_params

    attack_params = variant_params(attacker)
    stolen = run_attack(context, attack, attack_params, budget, seed)
    metrics = RunMetrics(
        **context.defender_metrics(),
        **stolen.clone,
        effective_l1=stolen.result.effective_l1,
        overhead_ratio=overhead,
    )
    record = {
        "scenario": USER_SCENARIO,
        "attack_label": attack,
        "attack_family": attack,
        "attacker": attacker,
        "attack_params": context.told(attack_params),
        "defense": context.defense_name,
        "defense_label": context.defense_name,
        "defense_params": context.public_params,
        "seed": seed,
        "budget": budget,
        **metrics.as_record(),
    }
    return record, stolen.result.clone


def _public(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _check_params(defense: str, params: dict[str, Any]) -> None:
    """Each given parameter against its typed field (type and range), before anything trains;
    the parts the user's data fills (a surrogate, a reference set) may be missing."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from mirage.defenses import DEFENSES

    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; known: {sorted(DEFENSES)}")
    fields = DEFENSES[defense].params.model_fields
    if unknown := sorted(set(params) - set(fields)):
        raise ValueError(
            f"defense {defense} has no parameter {', '.join(unknown)}; it has {sorted(fields)}"
        )
    for key, value in params.items():
        try:
            annotated: Any = Annotated[fields[key].annotation, fields[key]]  # built at run time
            TypeAdapter(annotated).validate_python(value)
        except ValidationError as error:
            raise ValueError(
                f"defense {defense}: {key} = {value!r}: {error.errors()[0]['msg']}"
            ) from None


def _build_defense(
    model: nn.Module,
    defense: str,
    params: dict[str, Any],
    split: UserSplit,
    surrogate: nn.Module | None,
    device: torch.device,
) -> Defense:
    """``defense`` with ``params``, its parts from the user's data (docs/design.md §evaluate)."""
    from mirage.defenses import DEFENSES, create_defense
    from mirage.training.surrogate import distil_surrogate

    fields = DEFENSES[defense].params.model_fields
    params = dict(params)
    if "reference_x" in fields and params.get("reference_x") is None:
        params["reference_x"], params["reference_y"] = split.sample.images, split.sample.labels
    if "surrogate" in fields and params.get("surrogate") is None:
        if surrogate is None:
            log.info(
                "distilling a surrogate from the model on the defender's %d sample images",
                len(split.sample),
            )
            ((surrogate, _),) = distil_surrogate(model, split.sample.images, device=device)
        params["surrogate"] = surrogate
    return create_defense(defense, **params)


# -- a user's scenario in a sweep ----------------------------------------------------------------


def user_context(
    name: str,
    user: UserScenario,
    defense: str,
    params: dict[str, Any],
    stores: Stores,
    *,
    clone_training: TrainConfig | str = "grad2",
) -> RunContext:
    """The run context of a sweep's user scenario (docs/design.md §evaluate): the user's data split
    as :func:`evaluate_model` splits it, their model (or a victim of the standard family trained
    on the data's non-test share and kept in ``stores.models``), ``defense`` with ``params``, its
    parts built from the defender's sample (a distilled surrogate, the reference set), and the
    clone :func:`~mirage.training.surrogate.architecture_for` the input."""
    from mirage.defenses import create_defense
    from mirage.training.registry import is_training_time
    from mirage.training.resolve import DefenseSpec

    if is_training_time(defense):
        raise ValueError(
            f"{name}: the training-time defense {defense} retrains a victim mirage trains; "
            "a user scenario serves the user's own model"
        )
    spec = DefenseSpec.from_params(defense, params)
    parts = spec.parts()
    for part in ("watermark", "misinformation", "gate"):
        if getattr(parts, part) is not None:
            raise ValueError(
                f"{name}: {defense}'s {part} is not built from a user scenario's data yet; "
                "give it as checkpoints or use a built-in scenario"
            )
    split = split_user_data(_user_data(user.path(user.data)), seed=user.split_seed)
    if user.pool is not None:
        split = _with_pool(split, user.path(user.pool))
    model = user_model(user, split) if user.model is not None else user_victim(name, split, stores)
    plain_values = dict(spec.params)
    if parts.reference is not None:
        reference = split.sample.sample(parts.reference.size, parts.reference.seed)
        plain_values["reference_x"], plain_values["reference_y"] = (
            reference.images,
            reference.labels,
        )
    surrogate = None
    if isinstance(parts.surrogate, str) and parts.surrogate != "distilled":
        raise ValueError(
            f"{name}: a {parts.surrogate} surrogate needs a built-in scenario; a user scenario "
            'distils one from the model (surrogate = "distilled") or loads a checkpoint'
        )
    if parts.surrogate is not None and not isinstance(parts.surrogate, str):
        from mirage.training.resolve import resolve_params

        surrogate = resolve_params(
            DefenseSpec.from_params(defense, {"surrogate": params["surrogate"]}), None
        )["surrogate"]
    built = (
        create_defense("none")
        if defense == "none"
        else _build_defense(model, defense, plain_values, split, surrogate, torch.device("cpu"))
    )
    return split_context(
        name,
        split,
        split_clone(split, clone_training),
        stores,
        served=model,
        plain=model,
        defense=built,
        defense_name=defense,
        public_params={k: v for k, v in spec.params.items() if _public(v)},
    )


def _user_data(path: Path) -> Any:
    """A folder as it is; a ``.npz`` as its ``images`` and ``labels`` arrays."""
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as arrays:
            return arrays["images"], arrays["labels"]
    return path


def user_model(user: UserScenario, split: UserSplit) -> nn.Module:
    """The user's model file, in eval mode, checked against the data's shape and classes."""
    from mirage.models.formats import format_of, load_model_file

    if user.model is None:
        raise ValueError("this user scenario names no model file")
    path = user.path(user.model)
    model, _ = load_model_file(
        format_of(path), path, input_shape=split.input_shape, class_path=user.model_class
    )
    return _as_classifier(model, split)


def user_victim(name: str, split: UserSplit, stores: Stores) -> nn.Module:
    """A victim of the standard family for the input, trained with the built-in scenarios' LeNet
    recipe (:data:`~mirage.scenarios.LENET_VICTIM`) on the data's non-test share (the defender's
    sample and the in-distribution pool), kept in ``stores.models`` by the data's digest and the
    recipe."""
    from mirage.data import DatasetSplits
    from mirage.models import has_checkpoint, load_checkpoint, save_checkpoint, tensor_digest
    from mirage.scenarios import LENET_VICTIM
    from mirage.training.surrogate import architecture_for
    from mirage.training.victim import config_key, train_classifier

    train = ImageData(
        torch.cat([split.sample.images, split.attacker_labelled.images]),
        torch.cat([split.sample.labels, split.attacker_labelled.labels]),
    )
    architecture = architecture_for(split.input_shape)
    key = config_key(
        "user-victim",
        {
            "images": tensor_digest(train.images),
            "labels": tensor_digest(train.labels),
            "architecture": architecture,
            "training": LENET_VICTIM.model_dump(),
        },
    )
    directory = stores.models / "victims" / f"user-{name}-{architecture}-{key}"
    if has_checkpoint(directory):
        return load_checkpoint(directory)[0].eval()
    log.warning(
        "no model given for scenario %s: training a %s victim on its %d non-test images "
        "(%d epochs), kept in %s",
        name,
        architecture,
        len(train),
        LENET_VICTIM.epochs,
        directory,
    )
    mean, std = channel_stats(train.images)
    data = DatasetSplits(
        name=f"user:{name}",
        train=train,
        test=split.test,
        classes=[str(k) for k in range(split.classes)],
        mean=mean,
        std=std,
    )
    model, card = train_classifier(
        architecture, {}, data, LENET_VICTIM, dataset=data.name, description=f"victim {name}"
    )
    save_checkpoint(model, card, directory)
    return model
