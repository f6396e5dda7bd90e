"""The shared state of several replicas in Redis (docs/design.md §shared-state): quotas, rate
limits, reservations, failed-authentication throttling and the per-client counters, each
check-and-charge one server-side Lua script, so it is atomic across every replica.

The same interface as :class:`~mirage.serve.quotas.QuotaStore` (the embedded SQLite default).
Keys, under ``prefix``: ``usage:{client}`` (hash: queries, requests, tokens, updated),
``reservations`` (hash: id → JSON), ``authfail:{source}`` (a counter that expires with its
window). Time is Redis's ``TIME``, the same clock for every replica.
"""

from __future__ import annotations

import json
import math
import time
import uuid

import redis

from mirage.serve.config import ClientConfig
from mirage.serve.errors import QuotaExceeded, RateLimited
from mirage.serve.quotas import new_owner, owner_gone, room_for

RESERVE = """
local n, quota, capacity, rate =
  tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local used = tonumber(redis.call('HGET', KEYS[1], 'queries') or '0')
if quota >= 0 and used + n > quota then return {1, used, '0'} end
if capacity >= 0 then
  if n > capacity then return {2, used, '0'} end
  local stored = redis.call('HGET', KEYS[1], 'tokens')
  local tokens = capacity
  if stored then
    local updated = tonumber(redis.call('HGET', KEYS[1], 'updated'))
    tokens = math.min(capacity, tonumber(stored) + math.max(0, now - updated) * rate)
  end
  if tokens < n then return {3, used, tostring((n - tokens) / rate)} end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - n), 'updated', tostring(now))
end
redis.call('HINCRBY', KEYS[1], 'queries', n)
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('HSET', KEYS[2], ARGV[5],
  cjson.encode({client = ARGV[7], queries = n, owner = ARGV[6], created = now}))
return {0, used + n, tostring(now)}
"""

# Undo a reservation once: KEYS = usage hash, reservations; ARGV = id, token capacity (-1: none).
RELEASE = """
local record = redis.call('HGET', KEYS[2], ARGV[1])
if not record then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local r = cjson.decode(record)
redis.call('HINCRBY', KEYS[1], 'queries', -r.queries)
redis.call('HINCRBY', KEYS[1], 'requests', -1)
local capacity = tonumber(ARGV[2])
if capacity >= 0 then
  local tokens = redis.call('HGET', KEYS[1], 'tokens')
  if tokens then
    redis.call('HSET', KEYS[1], 'tokens',
      tostring(math.min(capacity, tonumber(tokens) + r.queries)))
  end
end
return 1
"""

AUTH_FAILED = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class RedisQuotaStore:
    """Quotas, rate limits, reservations and failed-authentication counts in Redis."""

    def __init__(self, url: str, *, prefix: str = "mirage:", timeout: float = 5.0) -> None:
        self.redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        self.redis.ping()
        self.prefix = prefix
        self.owner = new_owner()
        self._reserve = self.redis.register_script(RESERVE)
        self._release = self.redis.register_script(RELEASE)
        self._auth_failed = self.redis.register_script(AUTH_FAILED)

    def _usage_key(self, client: str) -> str:
        return f"{self.prefix}usage:{client}"

    @property
    def _reservations(self) -> str:
        return f"{self.prefix}reservations"

    def _now(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def headroom(self, client: ClientConfig) -> int | None:
        """As :meth:`QuotaStore.headroom <mirage.serve.quotas.QuotaStore.headroom>`."""
        queries, tokens, updated = self.redis.hmget(
            self._usage_key(client.name), "queries", "tokens", "updated"
        )
        return room_for(
            client,
            int(queries or 0),
            None if tokens is None else float(tokens),
            None if updated is None else float(updated),
            self._now(),
        )

    def reserve(self, client: ClientConfig, n: int) -> tuple[int, str]:
        """As :meth:`QuotaStore.reserve <mirage.serve.quotas.QuotaStore.reserve>`, in one script."""
        if n < 1:
            raise ValueError("a charge needs at least one query")
        capacity = client.bucket_capacity
        reservation = uuid.uuid4().hex
        status, used, extra = self._reserve(
            keys=[self._usage_key(client.name), self._reservations],
            args=[
                n,
                -1 if client.quota is None else client.quota,
                -1 if capacity is None else capacity,
                client.rate or 0,
                reservation,
                self.owner,
                client.name,
            ],
        )
        used = int(used)
        if status == 1:
            raise QuotaExceeded(
                f"client {client.name!r}: {n} queries requested but only "
                f"{max(0, (client.quota or 0) - used)} of the quota of {client.quota} remain"
            )
        if status == 2:
            raise RateLimited(
                f"a request of {n} queries exceeds the rate-limit burst of {capacity:g}; "
                "send smaller batches"
            )
        if status == 3:
            wait = float(extra)
            raise RateLimited(
                f"client {client.name!r}: rate limit of {client.rate:g} queries/s reached; "
                f"retry in {wait:.3f}s",
                retry_after=wait,
            )
        return used, reservation

    def commit(self, reservation: str) -> None:
        self.redis.hdel(self._reservations, reservation)

    def release(self, client: ClientConfig, reservation: str) -> None:
        capacity = client.bucket_capacity
        self._release(
            keys=[self._usage_key(client.name), self._reservations],
            args=[reservation, -1 if capacity is None else capacity],
        )

    def charge(self, client: ClientConfig, n: int) -> int:
        used, reservation = self.reserve(client, n)
        self.commit(reservation)
        return used

    def reconcile(self, answered, *, lease: float) -> tuple[int, int]:
        """As :meth:`QuotaStore.reconcile <mirage.serve.quotas.QuotaStore.reconcile>`: kept if
        audited, else released by the script (which settles each reservation once, whichever
        replica gets there first)."""
        now = self._now()
        records = {
            rid: json.loads(raw) for rid, raw in self.redis.hgetall(self._reservations).items()
        }
        orphans = {
            rid: r
            for rid, r in records.items()
            if owner_gone(r["owner"], float(r["created"]), self.owner, lease=lease, now=now)
        }
        done = answered(list(orphans)) if orphans else set()
        kept = released = 0
        for rid, record in orphans.items():
            if rid in done:
                kept += self.redis.hdel(self._reservations, rid)
            else:
                released += int(
                    self._release(
                        keys=[self._usage_key(record["client"]), self._reservations], args=[rid, -1]
                    )
                )
        return kept, released

    def reservations(self) -> int:
        return int(self.redis.hlen(self._reservations))

    def ping(self, timeout: float) -> None:
        """Raise a :class:`redis.RedisError` unless the server answers PING within its socket
        timeout (a stalled or stopped server times out)."""
        self.redis.ping()

    def persistence(self) -> str | None:
        """How the server persists what it holds (``"aof"``, ``"rdb"``, both), or ``None`` when it
        keeps nothing across a restart (then every quota and charge is given back). Servers that
        refuse CONFIG (managed Redis) are taken as persistent."""
        try:
            config = self.redis.config_get("appendonly") | self.redis.config_get("save")
        except redis.ResponseError:
            return "unknown (CONFIG GET refused)"
        kinds = [
            kind
            for kind, on in (
                ("aof", config.get("appendonly") == "yes"),
                ("rdb", bool((config.get("save") or "").strip())),
            )
            if on
        ]
        return "+".join(kinds) or None

    def auth_throttled(self, source: str, window: float, limit: int) -> float | None:
        key = f"{self.prefix}authfail:{source}"
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            count, ttl = pipe.execute()
        if count is None or int(count) < limit or ttl is None or int(ttl) <= 0:
            return None
        return int(ttl) / 1000

    def auth_failed(self, source: str, window: float) -> int:
        return int(
            self._auth_failed(
                keys=[f"{self.prefix}authfail:{source}"], args=[math.ceil(window * 1000)]
            )
        )

    def used(self, client_name: str) -> int:
        return int(self.redis.hget(self._usage_key(client_name), "queries") or 0)

    def usage(self) -> dict[str, tuple[int, int]]:
        out = {}
        start = len(self.prefix) + len("usage:")
        for key in self.redis.scan_iter(match=f"{self.prefix}usage:*", count=500):
            queries, requests = self.redis.hmget(key, "queries", "requests")
            out[key[start:]] = (int(queries or 0), int(requests or 0))
        return out

    def close(self) -> None:
        self.redis.close()


def wait_for(url: str, timeout: float = 10.0) -> None:
    """Block until the Redis server at ``url`` answers PING."""
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()
