"""Interoperability with the adversarial-robustness-toolbox (ART): a mirage prediction API seen as
an ART ``BlackBoxClassifier``, so ART's extraction attacks (``KnockoffNets``, ``CopycatCNN``) can
steal a mirage-defended model, with mirage's query accounting and budget still in force::

    victim = as_art_classifier(InProcessAPI(model, create_defense("grad2", ...), query_budget=5000))
    thief = art_thief(create_model("lenet", ...))
    stolen = KnockoffNets(victim, nb_stolen=5000, use_probability=True).extract(
        x_pool, thieved_classifier=thief
    )

Note: ART's ``PyTorchClassifier.fit`` reduces probability targets to their argmax for
``CrossEntropyLoss``, so ART's extraction attacks train their thief on hard labels even with
``use_probability=True``; mirage's own attacks train on the full answers.
"""

from __future__ import annotations

import numpy as np
import torch
from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
from torch import nn

from mirage.api.base import PredictionAPI
from mirage.models.base import ImageClassifier


def as_art_classifier(api: PredictionAPI) -> BlackBoxClassifier:
    """Wrap ``api``: ART's ``predict(x)`` (numpy (N, C, H, W) in [0, 1]) -> numpy (N, K) answers.

    Every image ART predicts is one query to ``api`` (counted, and refused past its budget).
    """

    def predict(x: np.ndarray) -> np.ndarray:
        return api.query(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()

    return BlackBoxClassifier(
        predict, tuple(api.input_shape), int(api.num_classes), clip_values=(0.0, 1.0)
    )


def art_thief(
    model: ImageClassifier, *, lr: float = 0.01, momentum: float = 0.9
) -> PyTorchClassifier:
    """An untrained mirage model as ART's ``thieved_classifier`` (SGD, cross-entropy,
    inputs in [0, 1])."""
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        input_shape=tuple(model.input_shape),
        nb_classes=int(model.num_classes),
        clip_values=(0.0, 1.0),
    )
