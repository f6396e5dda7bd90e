"""The in-process prediction API: a victim model behind a defense, with query accounting."""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn

from mirage.api.alarm import AlarmAction, AlarmPolicy
from mirage.api.base import QueryBudgetExceeded, QueryLedger, check_images
from mirage.api.detection import PradaDetector
from mirage.defenses.base import Defense
from mirage.models.base import clean_posteriors

__all__ = ["InProcessAPI", "clean_posteriors"]


class InProcessAPI:
    """``api.query(x)`` answers with ``defense(x, softmax(model(x)))``.

    Args:
        model: the victim, taking images in [0, 1]: any module; one without ``input_shape``
            (C, H, W) needs ``input_shape=``, and one without ``num_classes`` is probed once.
        defense: any registered defense (``None`` serves clean posteriors).
        query_budget: maximum number of images answered in total; a request that would exceed it
            raises :class:`QueryBudgetExceeded` and spends nothing.
        batch_size: requests are answered in chunks of this many images (the defense sees chunks).
        detector: a :class:`~mirage.api.detection.PradaDetector` watching this API's stream as
            client ``client`` (several APIs may share one detector, one client each).
        on_alarm: once the detector has alarmed for this client: ``"flag"`` (answer as before;
            :attr:`alarmed` says so), ``"refuse"`` (raise :class:`QueryRefused`, nothing spent)
            or ``"switch"`` (answer with ``alarm_defense`` from then on): the service's
            :class:`~mirage.api.alarm.AlarmPolicy`.
    """

    def __init__(
        self,
        model: nn.Module,
        defense: Defense | None = None,
        *,
        query_budget: int | None = None,
        batch_size: int = 256,
        detector: PradaDetector | None = None,
        client: str = "default",
        on_alarm: AlarmAction = "flag",
        alarm_defense: Defense | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.alarm_policy = AlarmPolicy(on_alarm, has_alarm_defense=alarm_defense is not None)
        self.detector, self.client, self.on_alarm = detector, client, on_alarm
        self.alarm_defense = alarm_defense
        if query_budget is not None and query_budget < 0:
            raise ValueError("query_budget must be non-negative")
        self.model = model.eval()
        self.defense = defense
        self.batch_size = batch_size
        shape = input_shape or getattr(model, "input_shape", None)
        if shape is None:
            raise ValueError(
                f"{type(model).__name__} has no input_shape attribute: pass input_shape=(C, H, W)"
            )
        self.input_shape: tuple[int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        classes = getattr(model, "num_classes", None)
        if classes is None:  # any module: one probe forward (in eval mode) tells K
            with torch.no_grad():
                classes = model(torch.zeros(1, *self.input_shape)).shape[1]
        self.num_classes: int = int(classes)
        self.ledger = QueryLedger()
        self._budget = query_budget

    @property
    def queries_used(self) -> int:
        return self.ledger.queries

    @property
    def query_budget(self) -> int | None:
        return self._budget

    @property
    def queries_left(self) -> int | None:
        return None if self._budget is None else self._budget - self.ledger.queries

    def for_client(self, name: str) -> InProcessAPI:
        """A view of this API for another client (API key) ``name``: the same model, defense,
        detector and alarm action, its own ledger and its own budget of ``query_budget`` queries
        (a key of the same plan; ``None`` stays unlimited). How an attacker with several keys is
        simulated in process (the ``api_keys`` countermeasure, docs/design.md §countermeasures).

        The detector keeps one state per client, so it judges each view's stream alone: it cannot
        see that the views' queries come from one attacker. A defense that judges each client's
        stream gives the view a fresh one (``Defense.for_new_client``), as the service keeps one
        instance per client; any other defense is shared."""
        if name == self.client:
            raise ValueError(f"a view for client {name!r} would share this API's detector state")
        view = copy.copy(self)
        view.client = name
        view.ledger = QueryLedger()
        if self.defense is not None:
            view.defense = self.defense.for_new_client()
        return view

    @property
    def alarmed(self) -> bool:
        """Whether the detector has raised an alarm for this API's client."""
        return self.detector is not None and self.detector.state(self.client).alarmed

    def query(self, x: Tensor) -> Tensor:
        check_images(x, self.input_shape)
        if self._budget is not None and self.ledger.queries + x.shape[0] > self._budget:
            raise QueryBudgetExceeded(
                f"request of {x.shape[0]} queries exceeds the remaining budget of "
                f"{self.queries_left}"
            )
        self.alarm_policy.admit(self.client, self.alarmed)
        answers = []
        for chunk in x.split(self.batch_size):
            start = time.perf_counter()
            clean = clean_posteriors(self.model, chunk)
            mid = time.perf_counter()
            defense = (
                self.alarm_defense if self.alarm_policy.switched(self.alarmed) else self.defense
            )
            served = clean if defense is None else defense(chunk, clean)
            self.ledger.model_seconds += mid - start
            self.ledger.defense_seconds += time.perf_counter() - mid
            self.ledger.record(clean, served)
            answers.append(served.detach().cpu())
            if self.detector is not None:
                self.detector.observe(self.client, chunk, clean.argmax(1))
        return torch.cat(answers)
