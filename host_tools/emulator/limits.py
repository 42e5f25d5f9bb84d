"""ThingsBoard's per-device transport rate limits (reference §8; docs/thingsboard-notes.md "Rate limits").

A tenant profile sets them as strings of `capacity:seconds` pairs, such as "200:1,6000:60": each pair is a token bucket
that starts full and refills `capacity` tokens every `seconds`, a token at a time as time passes (bucket4j's greedy
refill, TbRateLimits); a message passes only when every pair has the tokens it takes. Three limits apply to each
device (DefaultTransportRateLimitService.checkEntityRateLimit): a message that carries data points (telemetry, and
attributes with at least one key) takes one token of the telemetry-messages limit and then one token per data point
of the data-points limit; any other message takes one token of the messages limit. Unset limits (the default of a
self-hosted ThingsBoard CE) never refuse anything.
"""

from __future__ import annotations

import threading
import time

# The tenant profile's field -> the name getSessionLimits reports it under.
FIELDS = {
    "transportDeviceMsgRateLimit": "messages",
    "transportDeviceTelemetryMsgRateLimit": "telemetryMessages",
    "transportDeviceTelemetryDataPointsRateLimit": "telemetryDataPoints",
}


class LimitSyntaxError(ValueError):
    """A rate limit string that is not `capacity:seconds[,capacity:seconds...]` with positive integers."""


def parse(text: str) -> list[tuple[int, int]]:
    """[(capacity, seconds), ...] of a rate limit string; LimitSyntaxError naming the part that is wrong."""
    pairs = []
    for part in text.split(","):
        capacity, sep, seconds = part.partition(":")
        if not (sep and capacity.isdigit() and seconds.isdigit() and int(capacity) > 0 and int(seconds) > 0):
            raise LimitSyntaxError(f"{part!r} is not capacity:seconds with two positive integers")
        pairs.append((int(capacity), int(seconds)))
    return pairs


class Bucket:
    """One rate limit string: a token bucket per capacity:seconds pair, all consumed together."""

    def __init__(self, text: str, clock=time.monotonic) -> None:
        self._clock = clock
        self._pairs = parse(text)
        self._tokens = [float(capacity) for capacity, _ in self._pairs]
        self._at = clock()

    def try_consume(self, n: int = 1) -> bool:
        """Take `n` tokens from every pair if each has them; otherwise take none and return False."""
        now = self._clock()
        elapsed, self._at = now - self._at, now
        for i, (capacity, seconds) in enumerate(self._pairs):
            self._tokens[i] = min(capacity, self._tokens[i] + elapsed * capacity / seconds)
        if any(tokens < n for tokens in self._tokens):
            return False
        self._tokens = [tokens - n for tokens in self._tokens]
        return True


class RateLimits:
    """The three per-device limits of one tenant profile, with a set of buckets for each device."""

    def __init__(self, profile: dict[str, str | None], clock=time.monotonic) -> None:
        """`profile`: FIELDS' keys to rate limit strings; a missing, null or empty one is unlimited."""
        self.strings = {field: profile.get(field) or None for field in FIELDS}
        self._clock = clock
        self._devices: dict[str, dict[str, Bucket | None]] = {}
        self._lock = threading.Lock()

    def allow(self, device: str, data_points: int = 0) -> str | None:
        """Count one message of `device` carrying `data_points`; None when it passes, else the limit it hit."""
        with self._lock:
            buckets = self._devices.get(device)
            if buckets is None:
                buckets = self._devices[device] = {field: Bucket(text, self._clock) if text else None
                                                   for field, text in self.strings.items()}
            if data_points > 0:
                # Two steps as ThingsBoard takes them: a message refused on its data points has used its token.
                checks = (("transportDeviceTelemetryMsgRateLimit", 1),
                          ("transportDeviceTelemetryDataPointsRateLimit", data_points))
            else:
                checks = (("transportDeviceMsgRateLimit", 1),)
            for field, n in checks:
                bucket = buckets[field]
                if bucket is not None and not bucket.try_consume(n):
                    return FIELDS[field]
            return None

    def forget(self, device: str) -> None:
        """Drop a deleted device's buckets (a device made again with the same name starts full)."""
        with self._lock:
            self._devices.pop(device, None)

    def session_limits(self, max_payload_size: int, max_inflight_messages: int) -> dict:
        """The answer to the getSessionLimits RPC (MqttTransportHandler.onGetSessionLimitsRpc, SessionLimits)."""
        return {"maxPayloadSize": max_payload_size, "maxInflightMessages": max_inflight_messages,
                "rateLimits": {FIELDS[field]: text for field, text in self.strings.items()}}
