"""``HTTPPredictionAPI``: the :class:`~mirage.api.PredictionAPI` interface over HTTP, so every
attack runs unchanged against a live mirage server.

Example::

    api = HTTPPredictionAPI("http://127.0.0.1:8000", "fmnist", api_key="mk_…")
    result = create_attack("knockoff").run(api, 1_000, pool, CloneSpec.like(card), seed=0)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Self

import httpx
import numpy as np
import torch
from torch import Tensor

from mirage.api.base import QueryBudgetExceeded, QueryRefused, check_images

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server refused a request (4xx other than quota) or failed (5xx)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} ({reason}): {message}")
        self.status, self.reason, self.message = status, reason, message


class HTTPPredictionAPI:
    """Query a mirage server's ``/v2/models/{model}/infer`` endpoint.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000``.
        model: the served model's name.
        api_key: this client's key (sent as ``Authorization: Bearer``).
        batch_size: images per HTTP request (default: the server's ``max_batch``).
        max_rate_retries: how often a rate-limited request is retried after ``Retry-After``.
        transport: an optional ``httpx`` transport (tests).

    A request larger than the remaining quota raises :class:`QueryBudgetExceeded` before
    anything is sent (as :class:`~mirage.api.InProcessAPI` does); a quota refusal by the server
    raises it too. A client the server refuses for its query stream (docs/design.md §detection)
    gets :class:`~mirage.api.QueryRefused`, as from ``InProcessAPI``. A query larger than
    ``batch_size`` is sent as several requests, each charged on its own: if another user of the
    same key drains the quota meanwhile, the chunks answered before the refusal stay charged.

    One object is one key. The multi-key attacker (``api_keys``, docs/design.md §countermeasures)
    holds one per key: ``attack.run([api_a, api_b], ...)`` sends its requests round-robin over
    them, and the server's per-key quotas and detectors each see one key's share.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str,
        *,
        batch_size: int | None = None,
        timeout: float = 120.0,
        max_rate_retries: int = 20,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.model = model
        self.max_rate_retries = max_rate_retries
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        meta = self.metadata()
        params = meta["parameters"]
        self.num_classes: int = int(params["num_classes"])
        self.input_shape: tuple[int, int, int] = tuple(meta["inputs"][0]["shape"][1:])
        self.classes: list[str] = list(params["classes"])
        self.defense: dict[str, Any] | None = params.get(
            "defense"
        )  # None unless the server discloses it
        self.batch_size = min(
            batch_size or params["limits"]["max_batch"], params["limits"]["max_batch"]
        )
        self._budget: int | None = params["client"]["quota"]
        self._used: int = int(params["client"]["queries_used"])
        self.queries_sent = 0

    def _raise_for(self, response: httpx.Response) -> None:
        try:
            body = response.json()
            reason, message = body.get("reason", "error"), body.get("error", response.text)
        except ValueError:
            reason, message = "error", response.text
        if reason == "quota_exceeded":
            raise QueryBudgetExceeded(message)
        if reason == "query_stream_refused":
            raise QueryRefused(message)
        raise ServerError(response.status_code, reason, message)

    def metadata(self) -> dict[str, Any]:
        response = self._http.get(f"/v2/models/{self.model}")
        if response.status_code != 200:
            self._raise_for(response)
        return response.json()

    @property
    def queries_used(self) -> int:
        """Queries charged to this key on the server (as of the last answer)."""
        return self._used

    @property
    def query_budget(self) -> int | None:
        return self._budget

    @property
    def queries_left(self) -> int | None:
        return None if self._budget is None else self._budget - self._used

    def _post(self, chunk: Tensor) -> Tensor:
        body = {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(chunk.shape),
                    "datatype": "FP32",
                    "data": chunk.reshape(-1).tolist(),
                }
            ]
        }
        for attempt in range(self.max_rate_retries + 1):
            response = self._http.post(f"/v2/models/{self.model}/infer", json=body)
            if response.status_code == 429 and attempt < self.max_rate_retries:
                reason = response.json().get("reason")
                if reason == "rate_limited" and "retry-after" in response.headers:
                    time.sleep(float(response.headers["retry-after"]))
                    continue
            if response.status_code != 200:
                self._raise_for(response)
            answer = response.json()
            self._used = int(answer["parameters"]["queries_used"])
            output = answer["outputs"][0]
            return torch.from_numpy(
                np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
            )
        raise AssertionError("unreachable")

    def query(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) in [0, 1] → (B, K) served probabilities (float32, CPU)."""
        check_images(x, self.input_shape)
        left = self.queries_left
        if left is not None and x.shape[0] > left:
            raise QueryBudgetExceeded(
                f"request of {x.shape[0]} queries exceeds the remaining budget of {left}"
            )
        x = x.detach().float().cpu().contiguous()
        answers = [self._post(chunk) for chunk in x.split(self.batch_size)]
        self.queries_sent += x.shape[0]
        return torch.cat(answers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
