"""Answered transfer sets, cached on disk: a defended API that replays what it served before.

A clone costs minutes; answering its queries costs seconds for most defenses and much more for
MAD. Runs that ask the same queries of the same defended model — the same Knockoff transfer set
trained with another clone recipe (Adam, augmentation, another architecture), the hard-label
attacker beside the soft-label one, a rerun after a crash — get the answers from disk instead.

Keys are exact, never approximate:

* the **server**: the served model's weights, the defense's name, its parameters with every model
  and tensor they hold fingerprinted by value, the torch and numpy versions, mirage's version and
  the source of the packages that turn a query into an answer (a fixed bug invalidates old
  answers);
* the **query stream**: a hash chain over every request so far, ``h_i = sha256(h_{i-1} ‖ x_i)``.
  A defense may keep state between requests (its random generator), so an answer is reusable only
  when every earlier request was the same too.

Where a stream diverges from everything cached, it goes live. A stateless defense (most of them:
``defense.contract.stateful``) simply answers from there on, so adaptive attacks (JBDA, adaptive
Knockoff) keep the prefix their runs share. A stateful one first re-answers the
replayed requests, discarding the answers, so it is in exactly the state an uncached run would
have left it in. Either way the served answers are those of an uncached run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor, nn

import mirage
from mirage.api.base import QueryLedger, check_images
from mirage.api.inprocess import InProcessAPI
from mirage.models import tensor_digest as _tensor_digest
from mirage.models import weights_fingerprint
from mirage.paths import optional_cache

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def answers_dir() -> Path | None:
    """``$MIRAGE_ANSWERS`` (``off`` disables the cache), else ``$MIRAGE_CACHE/answers``."""
    return optional_cache("MIRAGE_ANSWERS", "answers")


def _describe(value: Any) -> Any:
    """A JSON-able description of a parameter value, with models and tensors replaced by hashes."""
    if isinstance(value, nn.Module):
        return {"module": type(value).__name__, "weights": weights_fingerprint(value)}
    if isinstance(value, Tensor):
        return {"tensor": _tensor_digest(value)}
    if isinstance(value, np.ndarray):
        return {"tensor": _tensor_digest(torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, Enum)):
        return str(value)
    if isinstance(value, BaseModel):
        return {name: _describe(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot fingerprint a {type(value).__name__} defense parameter")


ANSWERING_PACKAGES = ("api", "defenses", "models")
"""The mirage packages whose source turns a query into an answer: serving, defenses, networks
and the losses GRAD²'s targets use (:mod:`mirage.models.fit`)."""


@cache
def _code_fingerprint() -> str:
    root = Path(mirage.__file__).parent
    digest = hashlib.sha256(mirage.__version__.encode())
    for package in ANSWERING_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def server_fingerprint(api: InProcessAPI) -> str:
    """Who answers: model weights, defense and its parameters by value, request chunking, code."""
    defense = api.defense
    description = {
        "format": FORMAT_VERSION,
        "model": weights_fingerprint(api.model),
        "defense": None if defense is None else type(defense).__name__,
        "params": None if defense is None else _describe(defense.params),
        "batch_size": api.batch_size,
        "code": _code_fingerprint(),
        "versions": [torch.__version__, np.__version__],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class Stream:
    """One attack's requests as answered: chain hashes, answers and their ledger entries."""

    chain: list[str] = field(default_factory=list)
    answers: list[Tensor] = field(default_factory=list)
    ledgers: list[tuple[int, float, int]] = field(
        default_factory=list
    )  # (queries, l1 sum, top-1 kept)

    def to_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "chain": self.chain,
            "answers": self.answers,
            "ledgers": self.ledgers,
        }
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
        try:
            torch.save(payload, temporary)
            temporary.chmod(0o644)
            os.replace(temporary, path)  # atomic: a parallel reader never sees half a file
        finally:
            temporary.unlink(missing_ok=True)

    @classmethod
    def from_file(cls, path: Path) -> Stream:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT_VERSION}")
        stream = cls(
            list(payload["chain"]), list(payload["answers"]), [tuple(e) for e in payload["ledgers"]]
        )
        if not len(stream.chain) == len(stream.answers) == len(stream.ledgers):
            raise ValueError("chain, answers and ledgers differ in length")
        return stream


class AnswerCache:
    """Streams on disk under ``root/<server>/<first request hash>/<last request hash>.pt``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def candidates(self, server: str, head: str) -> list[Stream]:
        streams = []
        for path in sorted((self.root / server / head).glob("*.pt")):
            try:
                streams.append(Stream.from_file(path))
            except Exception as error:  # noqa: BLE001 — a bad cache file is skipped, never fatal
                log.warning("answer cache: ignoring unreadable %s (%s)", path, error)
        return streams

    def save(self, server: str, stream: Stream) -> Path:
        path = self.root / server / stream.chain[0] / f"{stream.chain[-1]}.pt"
        stream.to_file(path)
        return path


class ReplayingAPI:
    """``api`` with its answers recorded to, and replayed from, an :class:`AnswerCache`.

    Serves what ``api`` would (the same answers; ledger totals equal up to float rounding). Call
    :meth:`close` when the attack is done to store a stream that was not already cached.
    ``replayed`` counts the queries the defense did not have to answer.
    """

    def __init__(self, api: InProcessAPI, cache: AnswerCache) -> None:
        if api.query_budget is not None:
            raise ValueError(
                "ReplayingAPI wraps an API without a query budget "
                "(the attack's QueryClient enforces its own)"
            )
        self.api = api
        self.cache = cache
        self.server = server_fingerprint(api)
        self.input_shape = api.input_shape
        self.num_classes = api.num_classes
        self.ledger = QueryLedger()
        self.replayed = 0
        self._stream = Stream()
        self._candidates: list[Stream] | None = None  # None: not looked up yet; []: live
        self._replayed_images: list[Tensor] = []  # kept for a stateful defense's catch-up only
        self._stateful = api.defense is not None and api.defense.contract.stateful
        self._live = False

    @property
    def queries_used(self) -> int:
        return self.ledger.queries

    @property
    def query_budget(self) -> None:
        return None

    def query(self, x: Tensor) -> Tensor:
        check_images(x, self.input_shape)
        x = x.detach().cpu()
        previous = self._stream.chain[-1] if self._stream.chain else ""
        link = hashlib.sha256((previous + _tensor_digest(x)).encode()).hexdigest()
        step = len(self._stream.chain)
        answers, entry = None, None
        if not self._live:
            if self._candidates is None:
                self._candidates = self.cache.candidates(self.server, link)
            self._candidates = [
                s for s in self._candidates if len(s.chain) > step and s.chain[step] == link
            ]
            cached = self._candidates[0].answers[step] if self._candidates else None
            if cached is not None and cached.shape == (x.shape[0], self.num_classes):
                answers, entry = cached.clone(), self._candidates[0].ledgers[step]
                if self._stateful:
                    self._replayed_images.append(x)
                self.replayed += x.shape[0]
            else:
                if cached is not None:
                    log.warning(
                        "answer cache: a cached answer has shape %s for a request of %d "
                        "images; answering live",
                        tuple(cached.shape),
                        x.shape[0],
                    )
                self._go_live()
        if answers is None or entry is None:  # set together: both or neither
            before = (self.api.ledger.queries, self.api.ledger.l1_sum, self.api.ledger.top1_kept)
            answers = self.api.query(x)
            after = self.api.ledger
            entry = (
                after.queries - before[0],
                after.l1_sum - before[1],
                after.top1_kept - before[2],
            )
        self._stream.chain.append(link)
        self._stream.answers.append(answers.clone())
        self._stream.ledgers.append(entry)
        self.ledger.queries += entry[0]
        self.ledger.l1_sum += entry[1]
        self.ledger.top1_kept += entry[2]
        return answers

    def _go_live(self) -> None:
        """Bring a stateful defense to the state the replayed requests would have left it in."""
        self._live = True
        if self._replayed_images:
            log.info(
                "answer cache: stream diverged after %d cached requests; a stateful defense "
                "re-answers them",
                len(self._replayed_images),
            )
            for images in self._replayed_images:
                self.api.query(images)
            self.replayed = 0
        self._replayed_images.clear()

    def close(self) -> Path | None:
        """Store the stream if any of it was answered live; returns the file written."""
        if not self._live or not self._stream.chain:
            return None
        try:
            return self.cache.save(self.server, self._stream)
        except Exception as error:  # noqa: BLE001 — a cache that cannot be written costs a miss, not the run
            log.warning("answer cache: could not store the stream (%s)", error)
            return None
