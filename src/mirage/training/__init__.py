"""Training: victims, defender-side surrogates and detectors, training-time defenses (InI, DP-SGD),
and the one resolver from a defense spec to a live defense (:mod:`mirage.training.resolve`).

The generic fit loop, :class:`~mirage.models.fit.TrainConfig` and the recipes live one layer
down, in :mod:`mirage.models.fit`.
"""
