import sys
from pathlib import Path

import pytest

from mirage.bench.config import SweepConfig

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def small_config():
    return SweepConfig.model_validate(
        {
            "name": "t",
            "scenarios": ["digits"],
            "defenses": [
                {"name": "none"},
                {"name": "fake", "label": "fake", "grid": {"epsilon": [0.1, 0.5, 1.0]}},
            ],
            "attacks": [
                {"name": "knockoff", "budget": 100},
                {
                    "name": "knockoff",
                    "label": "knockoff-hard",
                    "budget": 100,
                    "params": {"labels": "argmax"},
                    "defenses": ["none"],
                    "reference_for": "knockoff",
                },
            ],
            "seeds": [0, 1],
            "clone_training": {"epochs": 1},
        }
    )
