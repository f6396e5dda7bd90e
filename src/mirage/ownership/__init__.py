"""Ownership evidence that reaches hard-label clones and names the API key that leaked
(docs/design.md §ownership): a keyed watermark on a small, jitter-stable fraction of queries
(:mod:`.watermark`), the bounded evidence it leaves, in memory or in SQLite (:mod:`.evidence`),
and a test with an exact null (:mod:`.verification`); and the test of GRAD²'s reprogrammed
behaviour against clean models (:mod:`.behaviour`)."""

from mirage.ownership.evidence import Evidence, EvidenceStore
from mirage.ownership.verification import (
    OwnershipTest,
    match_pvalue,
    name_the_thief,
    verify_clients,
    verify_key,
    verify_keys,
)
from mirage.ownership.watermark import (
    KeyedWatermark,
    Marks,
    WatermarkConfig,
    derive_key,
    fourier_features,
    layer_key,
    layer_name,
    layered_watermarks,
    watermark_layers,
)

__all__ = [
    "Evidence",
    "EvidenceStore",
    "KeyedWatermark",
    "Marks",
    "OwnershipTest",
    "WatermarkConfig",
    "derive_key",
    "fourier_features",
    "layer_key",
    "layer_name",
    "layered_watermarks",
    "match_pvalue",
    "name_the_thief",
    "verify_clients",
    "verify_key",
    "verify_keys",
    "watermark_layers",
]
