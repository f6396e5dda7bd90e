"""Slow, faithful re-implementations of the original methods, as test oracles.

They follow the authors' code operation for operation (per-sample loops, one ``autograd.grad``
per class), so mirage's vectorised defenses are checked against what the papers ran, not against
a second copy of mirage's own algebra. ``benchmarks/`` times them against mirage's defenses.
On ``sys.path`` through ``tests/conftest.py`` (pytest's rootdir-relative import); import as
``from oracles.mad_original import original_mad``.
"""
