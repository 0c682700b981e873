"""Per-device token buckets: a device that floods the verifier is refused, everyone else is served. Pure.

The verifier keeps three: messages per second, bytes per second (a message costs its length, so a device
cannot spend the event loop's time decoding large messages at the message rate), and refusals per second
(answers and log lines beyond it are only counted).

At most ``max_devices`` buckets are kept (least recently seen dropped), so a stream of new device ids
cannot grow memory without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class RateLimiter:
    rate_per_s: float
    burst: float
    max_devices: int = 4096
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)  # device -> (tokens, at_s)

    def allow(self, device: str, now_s: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens (one message, or its bytes) from ``device``'s bucket; False when it holds fewer."""
        if self.rate_per_s <= 0:
            return True
        tokens, at_s = self._buckets.pop(device, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - at_s) * self.rate_per_s)
        allowed = tokens >= cost
        self._buckets[device] = (tokens - cost if allowed else tokens, now_s)
        while len(self._buckets) > self.max_devices:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
