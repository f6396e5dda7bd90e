"""Do jittered copies of a carried query stay in its bucket? The watermark's Fourier
cells against cells in the victim's log-posterior space (a design considered, not built).

For three keys, the carried queries of the first 15k of the scenario's pool (at most 300 per key)
are jittered once as the averaging thief does (``jitter_images``, σ = 0.02 and a one-pixel shift)
and we count the copies whose bucket is the original's. No training.

    python experiments/ownership/ownership_bucket_stability.py --scenario mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.attacks.base import jitter_images
from mirage.data import load_dataset
from mirage.models.base import clean_posteriors
from mirage.ownership import KeyedWatermark, WatermarkConfig, derive_key, fourier_features
from mirage.scenarios import get_scenario, query_pool
from mirage.training.victim import get_victim

SECRET = b"bucket-stability-probe-secret"
FLOOR = 1e-4


class PosteriorCells(KeyedWatermark):
    """The same keyed selection, projection and cells, over the victim's log-posteriors."""

    def __init__(
        self, key: bytes, victim, config: WatermarkConfig, reference: torch.Tensor
    ) -> None:
        self.victim = victim
        super().__init__(key, 10, config.model_copy(update={"density_cap": None}))
        generator = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
        projection = torch.randn(10, config.dims, generator=generator, dtype=torch.float64)
        self.projection = projection / projection.norm(dim=0, keepdim=True)
        self.dither = torch.rand(config.dims, generator=generator, dtype=torch.float64)
        self.config = config
        cells = self.cells(None, features=reference)[0]
        unique, counts = torch.unique(cells, dim=0, return_counts=True)
        self._dense = frozenset(
            row.tobytes()
            for row in unique[counts > config.density_cap * len(reference)].numpy().astype("<i8")
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return clean_posteriors(self.victim, x).double().clamp_min(FLOOR).log()


def stability(watermark: KeyedWatermark, pool: torch.Tensor) -> dict:
    marks = watermark.marks(pool)
    rows = torch.nonzero(marks.carried).flatten()[:300]
    copies = watermark.marks(jitter_images(pool[rows], 0.02, torch.Generator().manual_seed(0)))
    same = sum(copies.buckets[j] == marks.buckets[i] for j, i in enumerate(rows.tolist()))
    return {"carried": len(rows), "same_bucket": round(same / max(1, len(rows)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scenario", default="mnist")
    args = parser.parse_args()
    scenario = get_scenario(args.scenario)
    victim, _, _ = get_victim(scenario)
    train = load_dataset(scenario.victim_dataset).train.images
    pool = query_pool(scenario).images[:15000]
    fourier = WatermarkConfig(bucket_fraction=0.5, density_cap=1e-4)
    posterior = WatermarkConfig(bucket_fraction=0.5, density_cap=1e-4, dims=4, step=2.0)
    fourier_reference = fourier_features(train, fourier)
    posterior_reference = clean_posteriors(victim, train).double().clamp_min(FLOOR).log()
    out = {}
    for client in ("alice", "bob", "carol"):
        key = derive_key(SECRET, client)
        out[client] = {
            "fourier": stability(KeyedWatermark(key, 10, fourier, fourier_reference), pool),
            "posterior": stability(
                PosteriorCells(key, victim, posterior, posterior_reference), pool
            ),
        }
    print(json.dumps({"scenario": args.scenario, "keys": out}))


if __name__ == "__main__":
    main()
