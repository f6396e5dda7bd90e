"""The service's configuration file (docs/design.md §service): model, defense, limits, storage,
clients.

One TOML or JSON file; relative paths are resolved against the file's directory. API keys are
stored only as SHA-256 hex digests (``mirage serve-key`` prints a fresh key and its digest)::

    [model]
    name = "fmnist"
    scenario = "fmnist"              # or checkpoint = "path/to/checkpoint-dir"

    [defense]
    name = "grad2"
    params = { epsilon = 0.5, target = "all-ones" }
    surrogate = "path/to/surrogate-checkpoint-dir"   # loaded into params["surrogate"]

    [limits]
    max_payload_bytes = 20_000_000
    max_batch = 256

    [storage]
    database = "serve.sqlite"

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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mirage.scenarios import ReferenceSet


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="name in /v2/models/{name}")
    checkpoint: Path | None = Field(None, description="a save_checkpoint directory")
    scenario: str | None = Field(None, description="serve this scenario's cached victim instead")
    classes: list[str] | None = Field(None, description="class names (default: the dataset's)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.checkpoint is None) == (self.scenario is None):
            raise ValueError("give exactly one of model.checkpoint and model.scenario")
        return self


class DefenseConfig(_Strict):
    name: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)
    surrogate: Path | list[Path] | None = Field(
        None, description="checkpoint dir(s) loaded into params[surrogate_param] (an ensemble if a list)")
    surrogate_training: dict[str, Any] | None = Field(
        None, description="instead of a path: train or reuse the cached surrogate of model.scenario "
                          "(SurrogateConfig fields; {} = distilled, early-stopped defaults)")
    surrogate_param: str = "surrogate"
    reference_set: ReferenceSet | None = Field(
        None, description="grad2 target='unlearn': {size, seed} images of model.scenario's training "
                          "data with their labels, loaded into params.reference_x / reference_y")
    per_client: bool = Field(True, description="one defense instance (and its state) per client")
    seed_per_client: bool = Field(
        False, description="derive params.seed from the client name (a per-client coordinated target)")


class LimitsConfig(_Strict):
    max_payload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_batch: int = Field(256, ge=1, description="images per request")
    microbatch_images: int = Field(256, ge=1, description="images the worker joins into one batch")
    microbatch_wait_ms: float = Field(2.0, ge=0, description="how long the worker waits for more requests")


class StorageConfig(_Strict):
    database: Path = Path("mirage-serve.sqlite")
    audit: Path | None = Field(None, description="SQLite file of the audit log (default: the database)")


class ClientConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 hex digest of the API key")
    quota: int | None = Field(None, ge=0, description="total queries (images) ever answered")
    rate: float | None = Field(None, gt=0, description="token-bucket refill, queries per second")
    burst: int | None = Field(None, ge=1, description="token-bucket capacity (default: max(rate, 1))")

    @property
    def bucket_capacity(self) -> float | None:
        if self.rate is None:
            return None
        return float(self.burst if self.burst is not None else max(self.rate, 1.0))


class ServeConfig(_Strict):
    model: ModelConfig
    defense: DefenseConfig = DefenseConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig = StorageConfig()
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
    def _surrogate_source(self) -> ServeConfig:
        if self.defense.surrogate_training is not None:
            if self.defense.surrogate is not None:
                raise ValueError("give at most one of defense.surrogate and defense.surrogate_training")
            if self.model.scenario is None:
                raise ValueError("defense.surrogate_training needs model.scenario")
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

        surrogate = self.defense.surrogate
        surrogate = [fix(p) for p in surrogate] if isinstance(surrogate, list) else fix(surrogate)
        return self.model_copy(update={
            "model": self.model.model_copy(update={"checkpoint": fix(self.model.checkpoint)}),
            "defense": self.defense.model_copy(update={"surrogate": surrogate}),
            "storage": self.storage.model_copy(update={"database": fix(self.storage.database),
                                                       "audit": fix(self.storage.audit)}),
        })


def load_config(path: str | Path) -> ServeConfig:
    """Read a TOML (``.toml``) or JSON config file; relative paths resolve against its folder."""
    path = Path(path)
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix != ".json" else json.loads(text)
    return ServeConfig.model_validate(raw).resolve(path.resolve().parent)
