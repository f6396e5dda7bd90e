"""The service's configuration file (docs/design.md §service): model, defense, limits, storage,
clients.

One TOML or JSON file; relative paths are resolved against the file's directory. API keys are
stored only as SHA-256 hex digests (``mirage serve-key`` prints a fresh key and its digest)::

    [model]
    name = "fmnist"
    scenario = "fmnist"              # or checkpoint = "path/to/checkpoint-dir",
                                     # or path = "model.onnx",
                                     # or a [model.upstream] table (docs/design.md §gateway)

    [defense]                        # a defense spec: the same lines as a sweep's
                                     # [[defenses]] point
    name = "grad2"
    params = { epsilon = 0.5, target = "all-ones" }
    surrogate = "path/to/surrogate-checkpoint-dir"   # or "distilled" (trained for model.scenario)

    [limits]
    max_payload_bytes = 20_000_000
    max_batch = 256

    [storage]
    database = "serve.sqlite"        # quotas and audit log; with backend = "redis"
                                     # the audit log only
    # backend = "redis"              # shared state for several replicas …
    # url = "redis://127.0.0.1:6379/0"

    [ownership]                      # a keyed hard-label watermark per client
                                     # (docs/design.md §ownership)
    secret_env = "MIRAGE_OWNERSHIP_SECRET"   # the server secret: an environment variable …
    # secret_file = "/run/secrets/mirage"    # … or a file; never in this config
    evidence = "evidence.sqlite"     # the carried queries, at most max_items per client
    watermark = { bucket_fraction = 0.1 }
    # watermark = { bucket_fraction = 1.0, density_cap = 1e-4 } # not in buckets benign data fills …
    # reference = "fmnist"           # … judged on this dataset's training images
    # layers: a top-1 … and a keyed runner-up
    # watermark = [{ bucket_fraction = 1.0, density_cap = 1e-4 },
    #              { buckets = "answer", bucket_fraction = 1.0, place = "second", sharpen = 0.1 }]

    [detection]                      # per-client query-stream detection (docs/design.md §detection)
    prada = { delta = 0.9 }          # PRADA's knobs (mirage.api.PradaConfig)
    on_alarm = "switch"              # "flag" (default), "refuse" or "switch" …
    alarm_defense = { name = "argmax" }   # … to this defense spec (switch only)

    [access]
    metrics_key_sha256 = "…"         # /metrics with per-client series needs this bearer token
    disclose_defense = false         # metadata names the defense only when true
    auth_failures = 10               # per source address and window, then 429 …
    auth_window_s = 60.0             # … until the window ends

    [[clients]]
    name = "alice"
    key_sha256 = "…64 hex digits…"
    quota = 10_000
    rate = 500.0                     # queries per second (token bucket) …
    burst = 1_000                    # … holding at most this many
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mirage.api.detection import PradaConfig
from mirage.defenses import DEFENSES
from mirage.models.formats import Format, format_of
from mirage.ownership import WatermarkConfig, watermark_layers
from mirage.ownership.watermark import capped_layers
from mirage.training.resolve import DefenseSpec

# HTTP/2 headers that gRPC sets itself or drops, never call metadata
GRPC_HEADERS = frozenset(
    {
        "te",
        "user-agent",
        "connection",
        "keep-alive",
        "upgrade",
        "transfer-encoding",
        "proxy-connection",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    """The victim as an upstream Open Inference Protocol V2 endpoint (Triton, KServe, MLServer),
    over REST or gRPC: mirage forwards the images, reads the upstream's output and defends it
    (docs/design.md §gateway)::

        [model]
        name = "fmnist"

        [model.upstream]
        url = "http://127.0.0.1:8080"    # REST; or "grpc://127.0.0.1:8081" for its gRPC port
        model = "fmnist"                 # and version = "1" for its /versions/1 paths
        input_name = "images"
        input_shape = [1, 28, 28]
        output = "probabilities"         # or "logits"
        timeout_s = 2.0                  # per attempt, to the answer's last byte
        retries = 2                      # deadline_s bounds the whole call
        headers_env = { Authorization = "UPSTREAM_AUTH" }   # the value comes from $UPSTREAM_AUTH

    The URL's scheme picks the protocol: ``http``/``https`` for REST, ``grpc`` for the
    protocol's ``inference.GRPCInferenceService`` (plaintext, ``host:port``, no path), which always
    gets raw FP32 tensors (``binary`` is REST's choice) and the headers as call metadata under
    lower-cased names. No secret belongs here: a header the upstream needs (a token) is read at
    start from the environment variable ``headers_env`` names, and a URL carrying credentials is
    refused."""

    url: str = Field(
        description="the upstream's base URL, http(s)://host:port[/prefix] or grpc://host:port"
    )
    model: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="the upstream's model name"
    )
    version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the upstream model's version (its /versions/{v} paths)",
    )
    input_name: str = Field(
        min_length=1, max_length=256, description="the name of the upstream's input tensor"
    )
    input_shape: tuple[int, int, int] = Field(description="(C, H, W) of the images")
    output: Literal["probabilities", "logits"] = Field(
        "probabilities",
        description="what the upstream answers: probabilities (checked) or logits (softmaxed)",
    )
    output_name: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="the upstream output to read (default: its only one)",
    )
    num_classes: int | None = Field(
        None, ge=2, description="K; default: read from one probe at start"
    )
    binary: bool = Field(
        False,
        description="send and ask for binary tensor data (the REST extension) upstream; "
        "a grpc:// upstream always gets raw tensors",
    )
    timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="seconds one attempt may take, from connecting to the answer's last byte",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="seconds the whole call may take, retries "
        "included (default: timeout_s × (retries + 1))",
    )
    retries: int = Field(
        2, ge=0, le=10, description="retries after a connection error, a timeout or a 5xx"
    )
    backoff_s: float = Field(
        0.05, ge=0, le=5, description="wait before the first retry, doubled at each"
    )
    max_batch: int | None = Field(
        None, ge=1, description="images per upstream request (default: the micro-batch)"
    )
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="header name -> the environment variable holding its value",
    )
    ready_cache_s: float = Field(
        1.0, ge=0, le=60, description="how long an upstream readiness probe is reused"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme == "grpcs":
            raise ValueError(
                "model.upstream.url: grpcs:// (gRPC over TLS) is not supported; use grpc:// "
                "on a private network, or https:// for REST over TLS"
            )
        if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
            raise ValueError(
                "model.upstream.url must be http(s)://host[:port][/prefix] or grpc://host:port, "
                f"got {url[:80]!r}"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "model.upstream.url must not carry credentials: read them from the environment "
                "with model.upstream.headers_env"
            )
        if parts.query or parts.fragment:
            raise ValueError("model.upstream.url takes no query string or fragment")
        if parts.scheme == "grpc":
            try:
                port = parts.port
            except ValueError:
                port = None
            if port is None or parts.path.strip("/"):
                raise ValueError(
                    f"model.upstream.url must be grpc://host:port (no path), got {url[:80]!r}"
                )
        return url.rstrip("/")

    @field_validator("headers_env")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        import re

        for name, variable in headers.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}", name):
                raise ValueError(
                    f"model.upstream.headers_env: {name[:64]!r} is not an HTTP header name"
                )
            if name.lower() in (
                "content-type",
                "content-length",
                "inference-header-content-length",
                "host",
            ):
                raise ValueError(f"model.upstream.headers_env: the gateway sets {name} itself")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", variable):
                raise ValueError(
                    f"model.upstream.headers_env[{name!r}] must name an environment variable, "
                    f"got {variable[:64]!r} (never the secret itself)"
                )
        return headers

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(shape) < 1:
            raise ValueError(
                f"model.upstream.input_shape must be positive (C, H, W), got {list(shape)}"
            )
        return shape

    @model_validator(mode="after")
    def _grpc_metadata(self) -> UpstreamConfig:
        """A gRPC upstream gets the headers as call metadata: names gRPC reserves (``grpc-…``),
        binary ones (``…-bin``) and those its HTTP/2 transport sets or drops are refused."""
        if self.protocol == "grpc":
            for name in self.headers_env:
                lower = name.lower()
                if lower.startswith("grpc-") or lower.endswith("-bin") or lower in GRPC_HEADERS:
                    raise ValueError(
                        f"model.upstream.headers_env: {name} cannot be sent as gRPC metadata"
                    )
        return self

    @property
    def protocol(self) -> Literal["rest", "grpc"]:
        """How the upstream is called: ``grpc`` for a grpc:// URL, else ``rest``."""
        return "grpc" if self.url.startswith("grpc://") else "rest"

    @property
    def grpc_target(self) -> str:
        """The ``host:port`` a gRPC channel connects to (a grpc:// URL's network location)."""
        return self.url.removeprefix("grpc://")

    @property
    def call_deadline_s(self) -> float:
        """Seconds one upstream call may take, retries included."""
        return (
            self.deadline_s if self.deadline_s is not None else self.timeout_s * (self.retries + 1)
        )

    def headers(self) -> dict[str, str]:
        """The configured headers with their values from the environment, or ``ValueError``
        naming the variable that is not set."""
        import os

        values = {}
        for name, variable in self.headers_env.items():
            value = os.environ.get(variable)
            if not value:
                raise ValueError(
                    f"model.upstream.headers_env: the environment variable {variable} "
                    f"(header {name}) is not set"
                )
            values[name] = value
        return values


class ModelConfig(_Strict):
    """Where the served model comes from: a mirage checkpoint, a scenario's victim, a file
    ``path`` in another ``format`` (docs/design.md §model-formats), or an ``upstream`` OIP V2
    server that mirage fronts as a defended gateway (:class:`UpstreamConfig`)::

        [model]
        name = "mine"
        path = "model.onnx"              # or .pt2 (torch.export), or .safetensors with class = …
        input_shape = [1, 28, 28]        # when the file does not fix it
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="name in /v2/models/{name}"
    )
    checkpoint: Path | None = Field(None, description="a save_checkpoint directory")
    scenario: str | None = Field(None, description="serve this scenario's cached victim instead")
    path: Path | None = Field(
        None, description="a model file: .pt2 (torch.export), .onnx, .safetensors (+ class)"
    )
    format: Format | None = Field(None, description="the format of path (default: from its suffix)")
    class_path: str | None = Field(
        None, alias="class", description="state_dict: 'package.module:Class'"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="state_dict: the class's constructor arguments"
    )
    input_shape: tuple[int, int, int] | None = Field(
        None, description="(C, H, W), when the file does not fix it"
    )
    dataset: str = Field(
        "", description="the dataset the model was trained on (for its class names)"
    )
    classes: list[str] | None = Field(None, description="class names (default: the dataset's)")
    upstream: UpstreamConfig | None = Field(
        None, description="an upstream OIP V2 endpoint (a gateway)"
    )
    device: str | None = Field(
        None,
        description="where the model's forward pass runs: cpu, cuda (cuda:N) or mps "
        "(docs/design.md §devices; default $MIRAGE_DEVICE, else the CPU); "
        "answers and the defense stay on the CPU",
    )

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, name: str | None) -> str | None:
        from mirage.scenarios import SCENARIOS

        if name is not None and name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        sources = (self.checkpoint, self.scenario, self.path, self.upstream)
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "give exactly one of model.checkpoint, model.scenario, model.path and "
                "model.upstream"
            )
        if self.path is None and (
            self.format not in (None, "checkpoint")
            or self.class_path
            or self.kwargs
            or self.input_shape
            or self.dataset
        ):
            raise ValueError("format, class, kwargs, input_shape and dataset describe model.path")
        fmt = self.file_format
        if (fmt == "state_dict") != (self.class_path is not None):
            raise ValueError("a state_dict (.safetensors) needs model.class, and only it takes one")
        if self.kwargs and fmt != "state_dict":
            raise ValueError("model.kwargs are the state_dict class's constructor arguments")
        if self.device is not None and self.upstream is not None:
            raise ValueError("model.device places a model mirage runs; an upstream runs its own")
        return self

    @property
    def file_format(self) -> Format | None:
        """The format of ``path``: given, or from its suffix (``None`` without a path)."""
        if self.path is None:
            return None
        return self.format or format_of(self.path)


class DefenseConfig(DefenseSpec):
    """The served defense: a :class:`~mirage.training.resolve.DefenseSpec` (docs/design.md
    §defense-spec), so any point of a sweep serves from the same lines, plus how clients share
    it. Keys of earlier configs still read: ``surrogate_training = {...}`` (a surrogate trained
    for ``model.scenario``: ``kind`` and the other SurrogateConfig fields) and ``reference_set``."""

    per_client: bool = Field(True, description="one defense instance (and its state) per client")
    seed_per_client: bool = Field(
        False,
        description="derive params.seed from the client name (a per-client coordinated target)",
    )

    @model_validator(mode="before")
    @classmethod
    def _earlier_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "surrogate_training" in data:
            training = dict(data.pop("surrogate_training") or {})
            if data.get("surrogate") is not None:
                raise ValueError(
                    "give at most one of defense.surrogate and defense.surrogate_training"
                )
            data["surrogate"], data["surrogate_config"] = (
                training.pop("kind", "distilled"),
                training,
            )
        if "reference_set" in data:
            data["reference"] = data.pop("reference_set")
        if data.pop("surrogate_param", "surrogate") != "surrogate":
            raise ValueError(
                "surrogate_param is gone: the surrogate is the defense's `surrogate` parameter"
            )
        return data

    @model_validator(mode="after")
    def _seeded(self) -> DefenseConfig:
        if self.seed_per_client and (
            self.training_time or "seed" not in DEFENSES[self.name].params.model_fields
        ):
            raise ValueError(f"seed_per_client: defense {self.name!r} has no seed")
        if self.params.get("alarm_rate") is not None and not self.per_client:
            raise ValueError(
                "params.alarm_rate judges each client's stream: it needs per_client = true"
            )
        return self


class LimitsConfig(_Strict):
    """What one request and one connection may cost the server (docs/design.md §service-errors,
    §connections). The connection limits are enforced by the server's HTTP protocol
    (:mod:`mirage.serve.runner`) however the bytes arrive; in production a reverse proxy in front
    adds its own (README, "In production")."""

    max_payload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_batch: int = Field(256, ge=1, description="images per request")
    microbatch_images: int = Field(256, ge=1, description="images the worker joins into one batch")
    microbatch_wait_ms: float = Field(
        2.0, ge=0, description="how long the worker waits for more requests"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="seconds a request body may take to arrive"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds the request line and headers may take "
        "to arrive, from the connection's start or its previous response",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="open connections; more are closed at once (also "
        "capped below the process's file-descriptor limit)",
    )
    max_connections_per_address: int = Field(
        64,
        ge=1,
        description="open connections from one client address (trusted proxies are exempt: they "
        "limit their own clients); more are closed at once",
    )
    max_headers: int = Field(100, ge=8, le=10_000, description="header fields per request")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1 << 20, description="bytes of the request line and headers"
    )
    min_chunk_bytes: int = Field(
        256,
        ge=0,
        description="a body arriving in more than 256 pieces must average at least this many bytes "
        "per piece (a body of 1-byte chunks costs the server a parse per byte)",
    )
    model_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="threads that run the model's forward passes at once (default: 1 for a "
        "local model, 4 for an upstream, whose calls wait on the network)",
    )


class StorageConfig(_Strict):
    """Where quotas, rate limits, reservations and failed-authentication counts live: the
    embedded SQLite ``database`` (default), or Redis for several replicas (docs/design.md
    §shared-state). The audit log is SQLite either way."""

    backend: Literal["sqlite", "redis"] = "sqlite"
    url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix)://",
        description="the Redis server, for backend = 'redis'",
    )
    prefix: str = Field("mirage:", max_length=64, description="prefix of every Redis key")
    database: Path = Path("mirage-serve.sqlite")
    audit: Path | None = Field(
        None, description="SQLite file of the audit log (default: the database)"
    )
    reservation_lease_s: float = Field(
        300.0,
        gt=0,
        description="a reservation older than this is an orphan even if its owner's pid runs",
    )
    timeout_s: float = Field(
        5.0,
        gt=0,
        le=120,
        description="seconds one storage call may take (a locked SQLite "
        "file, a stalled Redis); then the request is a 503 and readiness says why",
    )
    require_persistence: bool = Field(
        False,
        description="backend = 'redis': refuse to start when the server persists nothing "
        "(neither AOF nor RDB snapshots), since a restart would give every quota back; else a "
        "warning",
    )
    events_retention_days: float | None = Field(
        30.0,
        gt=0,
        description="security events (failed logins, alarms) older than this are deleted; "
        "None keeps them. Answered requests are billing records and are kept",
    )

    @model_validator(mode="after")
    def _backend(self) -> StorageConfig:
        if self.backend == "redis" and self.url is None:
            raise ValueError("storage.backend = 'redis' needs storage.url (redis://host:port/db)")
        return self


class AccessConfig(_Strict):
    """What needs a key, and how failed authentication is throttled (docs/design.md §access)."""

    metrics_key_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the bearer token /metrics asks for; without one, /metrics is "
        "aggregate-only",
    )
    disclose_defense: bool = Field(
        False,
        description="model metadata names the defense, its scalar "
        "parameters (never seeds or keys) and its contract",
    )
    auth_failures: int = Field(
        10, ge=1, description="failed authentications per source address and window"
    )
    auth_window_s: float = Field(
        60.0, gt=0, description="the window, in seconds; then 429 until it ends"
    )
    trusted_proxies: tuple[str, ...] = Field(
        (),
        description="addresses (or CIDR networks) of reverse proxies whose X-Forwarded-For names "
        "the client; from anybody else the header is ignored (default: nobody)",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(
                    f"access.trusted_proxies: {proxy[:64]!r} is not an address or network"
                ) from None
        return proxies


class OwnershipConfig(_Strict):
    """The per-client keyed watermark (docs/design.md §ownership). The server secret each
    client's key is derived from is read at start from ``secret_file`` or the environment
    variable ``secret_env`` — never from this file, never served, at least 16 bytes."""

    secret_env: str | None = Field("MIRAGE_OWNERSHIP_SECRET", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secret_file: Path | None = Field(
        None, description="a file holding the secret (read as bytes, stripped)"
    )
    evidence: Path = Field(
        Path("mirage-evidence.sqlite"), description="SQLite file of the carried queries"
    )
    max_items: int = Field(4096, ge=1, le=1_000_000, description="evidence kept per client")
    watermark: tuple[WatermarkConfig, ...] = Field(
        (WatermarkConfig(),),
        description="the watermark (a table), or its layers in the order applied "
        "(an array of tables), each with its own key and evidence set",
    )
    reference: str | None = Field(
        None,
        description="the dataset whose training images stand for benign "
        "queries, for watermark.density_cap (a mirage dataset name)",
    )

    @field_validator("watermark", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> tuple[WatermarkConfig, ...]:
        return watermark_layers(value)

    @model_validator(mode="after")
    def _cap_needs_reference(self) -> OwnershipConfig:
        if capped_layers(self.watermark) and self.reference is None:
            raise ValueError(
                "ownership.watermark.density_cap needs ownership.reference, the dataset of "
                "benign images it keeps the watermark away from"
            )
        return self

    def secret(self) -> bytes:
        """The server secret, or ``ValueError`` saying where it was looked for."""
        import os

        if self.secret_file is not None:
            try:
                secret = self.secret_file.read_bytes().strip()
            except OSError as error:
                raise ValueError(
                    f"ownership.secret_file: cannot read {self.secret_file} ({error.strerror})"
                ) from error
            where = f"the file {self.secret_file}"
        elif self.secret_env is not None:
            secret = os.environ.get(self.secret_env, "").encode()
            where = f"the environment variable {self.secret_env}"
        else:
            raise ValueError("ownership needs secret_file or secret_env")
        if len(secret) < 16:
            raise ValueError(
                f"ownership: the secret in {where} is missing or shorter than 16 bytes"
            )
        return secret


class DetectionConfig(_Strict):
    """Per-client query-stream detection in the service (docs/design.md §detection): a PRADA
    detector per client, and what follows its alarm: ``flag`` (recorded only), ``refuse`` (every
    later request of that client is a 403 ``query_stream_refused``, charged nothing) or
    ``switch`` (later requests are answered by ``alarm_defense``, a defense spec like
    ``[defense]``'s, resolved by the same resolver)."""

    prada: PradaConfig = PradaConfig()
    on_alarm: Literal["flag", "refuse", "switch"] = "flag"
    alarm_defense: DefenseConfig | None = Field(
        None, description="on_alarm = 'switch': the alarmed client's defense"
    )

    @model_validator(mode="after")
    def _action(self) -> DetectionConfig:
        if self.on_alarm == "switch" and self.alarm_defense is None:
            raise ValueError(
                "detection.on_alarm = 'switch' needs detection.alarm_defense (a defense spec)"
            )
        if self.on_alarm != "switch" and self.alarm_defense is not None:
            raise ValueError(
                f"detection.alarm_defense is the defense of on_alarm = 'switch', "
                f"not of {self.on_alarm!r}"
            )
        if self.alarm_defense is not None and self.alarm_defense.training_time:
            raise ValueError(
                f"detection.alarm_defense {self.alarm_defense.name!r} is a training-time defense; "
                "an alarm can only switch to a query-time one"
            )
        return self


class ClientConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 hex digest of the API key"
    )
    quota: int | None = Field(None, ge=0, description="total queries (images) ever answered")
    rate: float | None = Field(None, gt=0, description="token-bucket refill, queries per second")
    burst: int | None = Field(
        None, ge=1, description="token-bucket capacity (default: max(rate, 1))"
    )

    @property
    def bucket_capacity(self) -> float | None:
        if self.rate is None:
            return None
        return float(self.burst if self.burst is not None else max(self.rate, 1.0))


class GrpcConfig(_Strict):
    """The Open Inference Protocol over gRPC beside REST (docs/design.md §grpc)::

    [grpc]
    port = 8001
    """

    port: int = Field(ge=1, le=65535, description="TCP port of the gRPC endpoint")
    host: str = Field("127.0.0.1", description="address to bind (mirage serve --host sets both)")


class ServeConfig(_Strict):
    model: ModelConfig
    grpc: GrpcConfig | None = Field(
        None, description="also serve OIP V2 over gRPC (mirage serve --grpc-port)"
    )
    defense: DefenseConfig = DefenseConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig = StorageConfig()
    access: AccessConfig = AccessConfig()
    ownership: OwnershipConfig | None = None
    detection: DetectionConfig | None = None
    clients: list[ClientConfig] = Field(min_length=1)

    @field_validator("clients")
    @classmethod
    def _unique(cls, clients: list[ClientConfig]) -> list[ClientConfig]:
        names = [c.name for c in clients]
        keys = [c.key_sha256 for c in clients]
        if len(set(names)) != len(names):
            raise ValueError("client names must be unique")
        if len(set(keys)) != len(keys):
            raise ValueError("two clients share an API key")
        return clients

    @model_validator(mode="after")
    def _scenario_for_the_parts(self) -> ServeConfig:
        if self.model.scenario is None:
            if self.defense.training_time:
                raise ValueError(
                    f"training-time defense {self.defense.name!r} needs model.scenario "
                    "(whose victim it retrains); or serve its checkpoint with defense none"
                )
            if needed := self.defense.parts().needing_a_scenario():
                raise ValueError(
                    f"defense {', '.join(needed)} {'needs' if len(needed) == 1 else 'need'} "
                    "model.scenario, whose data and victim they come from (or give checkpoints)"
                )
            alarm = self.detection.alarm_defense if self.detection is not None else None
            if alarm is not None and (needed := alarm.parts().needing_a_scenario()):
                raise ValueError(
                    f"detection.alarm_defense {', '.join(needed)} "
                    f"{'needs' if len(needed) == 1 else 'need'} model.scenario, whose data and "
                    "victim they come from (or give checkpoints)"
                )
        return self

    @property
    def audit_path(self) -> Path:
        return self.storage.audit or self.storage.database

    def resolve(self, base: Path) -> ServeConfig:
        """Return a copy with relative paths taken relative to ``base``."""

        def fix(path: Path | None) -> Path | None:
            if path is None:
                return None
            path = path.expanduser()
            return path if path.is_absolute() else (base / path)

        detection = self.detection
        if detection is not None and detection.alarm_defense is not None:
            detection = detection.model_copy(
                update={"alarm_defense": detection.alarm_defense.anchored(base)}
            )
        return self.model_copy(
            update={
                "detection": detection,
                "model": self.model.model_copy(
                    update={"checkpoint": fix(self.model.checkpoint), "path": fix(self.model.path)}
                ),
                "defense": self.defense.anchored(base),
                "storage": self.storage.model_copy(
                    update={
                        "database": fix(self.storage.database),
                        "audit": fix(self.storage.audit),
                    }
                ),
                "ownership": None
                if self.ownership is None
                else self.ownership.model_copy(
                    update={
                        "evidence": fix(self.ownership.evidence),
                        "secret_file": fix(self.ownership.secret_file),
                    }
                ),
            }
        )


def load_config(path: str | Path) -> ServeConfig:
    """Read a TOML (``.toml``) or JSON config file; relative paths resolve against its folder."""
    path = Path(path)
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix != ".json" else json.loads(text)
    return ServeConfig.model_validate(raw).resolve(path.resolve().parent)
