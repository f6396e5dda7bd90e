"""What the service serves (docs/design.md §service): the model, from a checkpoint, a scenario,
a file in another format (docs/design.md §model-formats) or an upstream OIP V2 server
(docs/design.md §gateway),
and the defense, built by the one resolver every front end uses (docs/design.md §defense-spec),
as one shared instance or one per client."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, NamedTuple

from torch import Tensor, nn

from mirage.data import load_dataset
from mirage.defenses import Defense, create_defense
from mirage.models import ModelCard, load_checkpoint
from mirage.models.formats import load_model_file
from mirage.ownership import derive_key, fourier_features
from mirage.ownership.watermark import capped_layers
from mirage.scenarios import Scenario, get_scenario
from mirage.serve.config import DefenseConfig, ModelConfig, OwnershipConfig, ServeConfig
from mirage.training.resolve import resolve_params, resolve_victims


class InstanceKey(NamedTuple):
    """Which defense instance answers a job (the micro-batcher's key): ``client``'s own, or
    ``SHARED`` for a defense every client shares; ``alarm``: of the alarm defense."""

    client: str
    alarm: bool = False


SHARED = "*"  # never a client name (the config's name pattern has no '*')


def load_model(
    config: ServeConfig, *, train: bool = False
) -> tuple[nn.Module, ModelCard, Scenario | None]:
    """The served model, its card, and the scenario it comes from (``None`` for a checkpoint, a
    file or an upstream). With a scenario, a training-time defense's victim is served in place of
    the plain one. The service never trains (``train=False``): a scenario's victim that is not
    kept yet is a :class:`~mirage.models.ModelNotPrepared` naming ``mirage prepare``
    (:func:`prepare`, docs/design.md §service)."""
    source = config.model
    model: nn.Module
    if source.upstream is not None:
        from mirage.serve.gateway import UpstreamModel

        upstream = UpstreamModel(source.upstream)
        return upstream.eval(), upstream.card(), None
    if source.checkpoint is not None:
        model, card = load_checkpoint(source.checkpoint)
        return model.eval(), card, None
    if source.path is not None:
        file_format = source.file_format
        assert file_format is not None  # that of the path
        model, card = load_model_file(
            file_format,
            source.path,
            input_shape=source.input_shape,
            class_path=source.class_path,
            kwargs=source.kwargs,
            dataset=source.dataset,
        )
        return model.eval(), card, None
    assert source.scenario is not None  # the one source left (ModelConfig checks there is one)
    scenario = get_scenario(source.scenario)
    victims = resolve_victims(config.defense, scenario, train=train, show_progress=train)
    return victims.served.eval(), victims.card, scenario


PLATFORMS = {
    "checkpoint": "pytorch",
    "export": "pytorch_torch_export",
    "onnx": "onnxruntime_onnx",
    "state_dict": "pytorch",
    "upstream": "mirage_gateway",
}


def platform(source: ModelConfig) -> str:
    """The model metadata's ``platform`` (OIP V2 REST §"Model Metadata"): what the served model
    really is. A mirage checkpoint, a scenario's victim and a state dict are ``nn.Module`` s run
    eagerly (``pytorch``), a ``.pt2`` file is a ``torch.export`` program
    (``pytorch_torch_export``), an ONNX file runs in onnxruntime (``onnxruntime_onnx``, Triton's
    name). None of them is TorchScript, so none claims ``pytorch_libtorch`` or
    ``pytorch_torchscript`` (docs/design.md §model-formats). A gateway cannot vouch for what its
    upstream runs, so it says what it is: ``mirage_gateway`` (docs/design.md §gateway)."""
    if source.upstream is not None:
        return PLATFORMS["upstream"]
    return PLATFORMS[source.file_format or "checkpoint"]


def class_names(config: ServeConfig, card: ModelCard) -> list[str]:
    """The configured class names, or the dataset's, or 0 … K−1."""
    if config.model.classes is not None:
        classes = list(config.model.classes)
    elif card.dataset == "fmnist":
        from mirage.data.fashion_mnist import CLASSES

        classes = list(CLASSES)
    else:
        classes = [str(k) for k in range(card.num_classes)]
    if len(classes) != card.num_classes:
        raise ValueError(f"{len(classes)} class names for a {card.num_classes}-class model")
    return classes


def client_seed(base: int, client: str) -> int:
    """A stable per-client seed (the same after a restart)."""
    return (base + zlib.crc32(client.encode())) % (2**31)


class ServedDefenses:
    """The configured defense: its parts resolved once (surrogates, reference and watermark sets,
    detectors), then one shared instance or, lazily, one per client (``per_client``), with a
    seed derived from the client's name if ``seed_per_client``. With ``ownership``, every
    client's answers also carry its own keyed watermark (:class:`~mirage.defenses.watermarked.
    Watermarked` over the defense; docs/design.md §ownership), recorded in ``evidence``.
    ``None`` when nothing runs at query time (``none`` or a training-time defense, whose victim
    is the served model, and no ownership).

    ``alarm``: the defense a client is switched to once its query stream raised the detector's
    alarm (``detection.on_alarm = "switch"``, docs/design.md §detection), held as a second
    ``ServedDefenses`` (resolved by the same resolver, watermarked the same way). Its instances
    are keyed ``key(client, alarmed=True)`` (an :class:`InstanceKey` with ``alarm`` set), so the
    micro-batcher never mixes an alarmed client's requests with anyone else's."""

    def __init__(
        self,
        spec: DefenseConfig,
        scenario: Scenario | None,
        model: nn.Module,
        card: ModelCard,
        *,
        ownership: OwnershipConfig | None = None,
        evidence: Any = None,
        alarm: DefenseConfig | None = None,
        benign_reference: Tensor | None = None,
        train: bool = False,
    ) -> None:
        self.spec, self.ownership, self.evidence = spec, ownership, evidence
        self._secret = ownership.secret() if ownership is not None else None
        # the reference's Fourier features do not depend on the key: computed once for all clients
        # (and for the alarm defense's instances)
        self._reference = benign_reference
        capped = [] if ownership is None else capped_layers(ownership.watermark)
        if self._reference is None and capped:
            assert ownership is not None and ownership.reference is not None  # OwnershipConfig
            self._reference = fourier_features(
                load_dataset(ownership.reference).train.images, capped[0]
            )
        self.query_time = spec.name != "none" and not spec.training_time
        self.enabled = self.query_time or ownership is not None
        self.params = (
            resolve_params(spec, scenario, model, card, train=train) if self.query_time else {}
        )
        self.prototype = self._inner(None) if self.query_time else None
        self._instances: dict[str, Defense | None] = {}
        self.alarm = (
            None
            if alarm is None
            else ServedDefenses(
                alarm,
                scenario,
                model,
                card,
                ownership=ownership,
                evidence=evidence,
                benign_reference=self._reference,
                train=train,
            )
        )

    def _inner(self, client: str | None) -> Defense | None:
        if not self.query_time:
            return None
        if client is not None and not self.spec.per_client:
            return self.prototype
        params = dict(self.params)
        if self.spec.seed_per_client and client is not None:
            params["seed"] = client_seed(int(params.get("seed", 0)), client)
        return create_defense(self.spec.name, **params)

    def _build(self, client: str) -> Defense | None:
        inner = self._inner(client)
        if self.ownership is None or self._secret is None:  # a secret with every ownership
            return inner
        return create_defense(
            "watermarked",
            inner=inner,
            key=derive_key(self._secret, client),
            client=client,
            config=self.ownership.watermark,
            evidence=self.evidence,
            benign_reference=self._reference,
        )

    def key(self, client: str, *, alarmed: bool = False) -> InstanceKey:
        """The micro-batcher's key of ``client``'s defense instance; ``alarmed``: of its alarm
        defense (when there is one)."""
        if alarmed and self.alarm is not None:
            return self.alarm.key(client)._replace(alarm=True)
        return InstanceKey(client if self.spec.per_client or self.ownership is not None else SHARED)

    def __call__(self, key: InstanceKey) -> Defense | None:
        if key.alarm:
            if self.alarm is None:
                raise ValueError(f"no alarm defense for {key}")
            return self.alarm(key._replace(alarm=False))
        if not self.enabled:
            return None
        if key.client == SHARED:
            return self.prototype
        if key.client not in self._instances:
            self._instances[key.client] = self._build(key.client)
        return self._instances[key.client]

    def describe(self) -> dict[str, Any]:
        """The defense as metadata shows it: name, scalar parameters, contract, client sharing."""
        defense = self.prototype or create_defense("none")
        params = {}
        for name in type(defense.params).model_fields:
            if "seed" in name or "key" in name:
                continue  # never disclosed: they would let a client predict the perturbation
            value = getattr(defense.params, name)
            params[name] = (
                value
                if isinstance(value, str | int | float | bool | None)
                else f"<{type(value).__name__}>"
            )
        if self.spec.training_time:
            params = {
                k: v for k, v in self.spec.params.items() if "seed" not in k and "key" not in k
            }
        return {
            "name": self.spec.name,
            "params": params,
            "contract": dataclasses.asdict(defense.contract),
            "training_time": self.spec.training_time,
            "per_client": self.spec.per_client,
            "seed_per_client": self.spec.seed_per_client,
            "watermarked": self.ownership is not None,
        }


def prepare(config: ServeConfig) -> list[str]:
    """Train (or load) everything ``config`` serves from a scenario — the victim, a training-time
    defense's victim, the defense's and the alarm defense's parts — and keep it in the model store,
    so the service, which never trains, starts from it; returns what it prepared, in words."""
    model, card, scenario = load_model(config, train=True)
    detection = config.detection
    ServedDefenses(
        config.defense,
        scenario,
        model,
        card,
        alarm=detection.alarm_defense if detection is not None else None,
        train=True,
    )
    prepared = [f"model {config.model.name}: {type(model).__name__}"]
    if scenario is not None:
        prepared.append(f"scenario {scenario.name}: victim and the parts of {config.defense.name}")
    return prepared
