"""MAD, maximising angular deviation (Orekondy et al., ICLR 2020, eq. 4–6; docs/design.md §mad),
and MAD-argmax (section 4.1; docs/design.md §mad-argmax).

Modules: :mod:`.defense` (``mad``), :mod:`.argmax` (``mad_argmax``), :mod:`.gram` (the per-query
Gram matrix M = G Gᵀ of the surrogate's log-likelihood Jacobian that both objectives use).
"""

from __future__ import annotations

from mirage.defenses.mad.argmax import MADArgmax, MADArgmaxParams
from mirage.defenses.mad.defense import MAD, MADParams

__all__ = ["MAD", "MADArgmax", "MADArgmaxParams", "MADParams"]
