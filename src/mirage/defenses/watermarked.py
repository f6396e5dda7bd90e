"""Any query-time defense with a keyed hard-label watermark on top (docs/design.md §ownership):
``ỹ = W_key(x, inner(x, y))``, where ``W_key`` moves the top-1 of a small keyed,
jitter-stable set of queries to a keyed label (:class:`mirage.ownership.KeyedWatermark`), and
records those queries as evidence for :func:`mirage.ownership.name_the_thief`. ``config`` may be a
list of layers (a top-1 layer under a keyed runner-up, say), each with its own key and evidence
set (:func:`mirage.ownership.layered_watermarks`).

The inner defense runs through its own :meth:`Defense.__call__`, so its contract is checked on
every row; this wrapper promises the simplex and what the inner defense promises about state,
but no budget and no top-1 (on carried rows it changes the label on purpose). Its answers are a
function of the query, so it is stateless when the inner defense is and ``template`` is off in
every layer (templates are kept from earlier answers); the evidence it records is a side effect
of each call, which an answer cache that replays answers (the benchmark's) skips.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense
from mirage.ownership import KeyedWatermark, WatermarkConfig, layered_watermarks, watermark_layers
from mirage.ownership.watermark import capped_layers, reference_features


class WatermarkedParams(DefenseParams):
    inner: Any = Field(None, description="the defense underneath (a Defense; None: clean answers)")
    key: bytes = Field(description="this client's watermark key (mirage.ownership.derive_key)")
    client: str = Field("default", description="whose queries these are, in the evidence")
    config: tuple[WatermarkConfig, ...] = Field(
        (WatermarkConfig(),),
        description="the watermark, or its layers in the order they are applied",
    )
    evidence: Any = Field(None, description="an Evidence that records the carried queries")
    benign_reference: Any = Field(
        None,
        description="the defender's benign images (B, C, H, W) or their "
        "fourier_features (B, F), for config.density_cap",
    )

    @field_validator("config", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> tuple[WatermarkConfig, ...]:
        return watermark_layers(value)

    @model_validator(mode="after")
    def _benign_reference(self) -> WatermarkedParams:
        capped = capped_layers(self.config)
        if self.benign_reference is None:
            if capped:
                raise ValueError(
                    "config.density_cap needs benign_reference (the defender's benign images)"
                )
            return self
        value = self.benign_reference
        for layer in capped:  # checks, on one row
            reference_features(value[:1] if isinstance(value, Tensor) else value, layer)
        return self

    @field_validator("inner")
    @classmethod
    def _defense(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, Defense):
            raise ValueError("inner must be a Defense (or None)")
        return value

    @field_validator("evidence")
    @classmethod
    def _evidence(cls, value: Any) -> Any:
        if value is not None and not callable(getattr(value, "add", None)):
            raise ValueError(
                "evidence must have add(client, x, marks), like mirage.ownership.Evidence"
            )
        return value


@register_defense("watermarked", params=WatermarkedParams)
class Watermarked(Defense[WatermarkedParams]):
    """``inner`` with the keyed watermark of ``key`` on top."""

    def __init__(self, params: WatermarkedParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._watermarks: dict[int, dict[str, KeyedWatermark]] = {}

    @classmethod
    def contract_for(cls, params: WatermarkedParams) -> DefenseContract:
        inner = (
            params.inner.contract
            if isinstance(params.inner, Defense)
            else DefenseContract(stateful=False)
        )
        # templates are answers kept from earlier queries: then an answer depends on them
        stateful = inner.stateful or any(layer.template is not None for layer in params.config)
        return DefenseContract(needs_input=True, truncating=inner.truncating, stateful=stateful)

    def watermarks(self, num_classes: int) -> dict[str, KeyedWatermark]:
        """The layers for ``num_classes``-way answers, by evidence set, in the order applied."""
        if num_classes not in self._watermarks:
            p = self.params
            self._watermarks[num_classes] = layered_watermarks(
                p.key, p.client, p.config, num_classes, p.benign_reference
            )
        return self._watermarks[num_classes]

    @property
    def stream_alarm(self) -> int | None:
        return None if self.params.inner is None else self.params.inner.stream_alarm

    def for_new_client(self) -> Watermarked:
        """The same watermark over the inner defense's instance for a new stream (this one when the
        inner defense judges no stream)."""
        inner = self.params.inner
        fresh = None if inner is None else inner.for_new_client()
        if fresh is inner:
            return self
        return type(self)(self.params.model_copy(update={"inner": fresh}))

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        x = self._input(x)
        inner = self.params.inner
        served = probs if inner is None else inner(x, probs)
        for evidence_set, watermark in self.watermarks(probs.shape[1]).items():
            served, marks = watermark.apply(x, served)
            if self.params.evidence is not None:
                self.params.evidence.add(evidence_set, x, marks)
        return served

    def __repr__(self) -> str:
        return (
            f"Watermarked(inner={self.params.inner!r}, client={self.params.client!r}, "
            f"config={self.params.config!r})"
        )
