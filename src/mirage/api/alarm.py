"""What happens to a client once its query stream raised a detector's alarm (docs/design.md
§detection), one policy for :class:`~mirage.api.InProcessAPI` and the service alike:

* ``"flag"``: answer as before; the alarm is only recorded;
* ``"refuse"``: refuse every later request before anything is spent (:class:`QueryRefused`);
* ``"switch"``: answer every later request with the alarm defense instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mirage.api.base import QueryRefused

AlarmAction = Literal["flag", "refuse", "switch"]


@dataclass(frozen=True)
class AlarmPolicy:
    """``action`` on an alarmed client; ``has_alarm_defense``: whether a defense to switch to is
    there (``"switch"`` needs one; the others never use it)."""

    action: AlarmAction = "flag"
    has_alarm_defense: bool = False

    def __post_init__(self) -> None:
        if self.action not in ("flag", "refuse", "switch"):
            raise ValueError(f"on_alarm must be flag, refuse or switch, got {self.action!r}")
        if self.action == "switch" and not self.has_alarm_defense:
            raise ValueError("on_alarm = 'switch' needs an alarm defense (alarm_defense)")

    def admit(self, client: str, alarmed: bool) -> None:
        """Before a request is answered or charged: raise :class:`QueryRefused` for an alarmed
        client when the policy refuses."""
        if alarmed and self.action == "refuse":
            raise QueryRefused(f"client {client!r} is refused: its query stream raised an alarm")

    def switched(self, alarmed: bool) -> bool:
        """Whether the alarm defense answers (instead of the usual one)."""
        return alarmed and self.action == "switch"
