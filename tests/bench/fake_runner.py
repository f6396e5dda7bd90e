"""A stand-in for ``execute_run`` in sweep tests: deterministic numbers from the spec, optional
delay."""

import os
import time


def fake_run(spec, stores=None):
    time.sleep(float(os.environ.get("FAKE_RUN_SECONDS", "0")))
    eps = float(spec.defense_params.get("epsilon", 0.0))
    return {
        "clone_accuracy": 0.8 - 0.3 * eps + 0.001 * spec.seed,
        "defender_accuracy": 0.9 - 0.04 * eps,
        "victim_accuracy": 0.9,
        "effective_l1": eps,
        "defender_l1": eps,
        "overhead_ratio": 1.0 + eps,
        "wall_seconds": 0.01,
        "angular_deviation": [30.0 * eps, 40.0 * eps],
    }
