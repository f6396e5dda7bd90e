"""One call from a model to a defended predictor (docs/design.md §protect)::

    import mirage

    api = mirage.protect(model, "grad2", epsilon=0.5, surrogate=surrogate)
    served = api.predict(x)          # (B, K) defended probabilities; api(x) is the same

``model`` is anything that maps a batch of images (B, C, H, W) to logits (B, K): any
``nn.Module`` (docs/design.md §any-module), or a plain callable such as an ONNX session wrapper.
The defense's parameters go through the one resolver (docs/design.md §defense-spec), so a part
may be live (an ``nn.Module``, tensors) or declarative: a checkpoint path for ``surrogate``, or,
with ``scenario=`` (and the model's ``card``), a surrogate kind such as ``"distilled"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mirage.defenses import Defense, create_defense
from mirage.models import ModelCard
from mirage.scenarios import Scenario, get_scenario
from mirage.training.resolve import DefenseSpec, resolve_params

Model = Callable[[Tensor], Tensor]


class Protected:
    """A model behind a defense: :meth:`predict` (and ``__call__``) answers
    ``defense(x, softmax(model(preprocess(x))))``; the defense (and its surrogate) sees the
    preprocessed batch, the model's own input."""

    def __init__(
        self,
        model: Model,
        defense: Defense,
        *,
        preprocess: Callable[[Any], Tensor] | None = None,
        batch_size: int = 256,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model.eval() if isinstance(model, nn.Module) else model
        self.defense = defense
        self.preprocess = preprocess
        self.batch_size = batch_size

    def _inputs(self, x: Any) -> Tensor:
        x = self.preprocess(x) if self.preprocess is not None else x
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(
                f"the model's input must be a (B, C, H, W) tensor, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        return x

    @torch.no_grad()
    def _clean(self, x: Tensor) -> Tensor:
        return torch.cat(
            [torch.softmax(self.model(chunk), dim=1) for chunk in x.split(self.batch_size)]
        )

    def clean(self, x: Any) -> Tensor:
        """The undefended probabilities softmax(model(preprocess(x))), (B, K)."""
        return self._clean(self._inputs(x))

    def predict(self, x: Any) -> Tensor:
        """Defended probabilities (B, K), in chunks of ``batch_size`` (each chunk is one
        request to the defense, as an API's batch would be)."""
        x = self._inputs(x)
        return torch.cat(
            [self.defense(chunk, self._clean(chunk)) for chunk in x.split(self.batch_size)]
        )

    __call__ = predict

    def __repr__(self) -> str:
        return f"Protected({type(self.model).__name__}, {self.defense!r})"


def protect(
    model: Model,
    defense: str | Defense = "grad2",
    *,
    preprocess: Callable[[Any], Tensor] | None = None,
    scenario: str | Scenario | None = None,
    card: ModelCard | None = None,
    batch_size: int = 256,
    **params: Any,
) -> Protected:
    """``model`` behind ``defense`` (a registered name with its ``params``, or a built
    :class:`~mirage.defenses.Defense`). Parts among ``params`` may be declarative
    (docs/design.md §defense-spec): ``surrogate="path/to/checkpoint"``; with ``scenario`` (and
    ``card``, the model's :class:`~mirage.models.ModelCard`) also ``surrogate="distilled"``,
    ``reference={...}``, ``watermark={...}``."""
    if isinstance(defense, Defense):
        if params:
            raise TypeError("pass either a built defense or a name with parameters, not both")
        return Protected(model, defense, preprocess=preprocess, batch_size=batch_size)
    if defense == "grad2" and params.get("surrogate") is None and scenario is None:
        raise ValueError(
            "grad2 needs a surrogate: surrogate=<nn.Module>, a checkpoint path, or with "
            "scenario= a kind such as 'distilled' (surrogate=model uses the model itself)"
        )
    spec = DefenseSpec.from_params(defense, params)  # live parts stay among the parameters
    if spec.training_time:
        raise ValueError(
            f"{defense} is a training-time defense: it trains a victim, it cannot protect a "
            "given model"
        )
    if isinstance(scenario, str):
        scenario = get_scenario(scenario)
    victim = model if isinstance(model, nn.Module) else None
    resolved = resolve_params(spec, scenario, victim, card)
    return Protected(
        model, create_defense(defense, **resolved), preprocess=preprocess, batch_size=batch_size
    )
