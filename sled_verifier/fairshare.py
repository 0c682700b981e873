"""Each device's fair share of the verifier's time, for the work a step may leave out: prefill. Pure.

Every step is paid for by every row in it: a step that also prefills a 64-token chunk runs a second forward,
and on a CPU a forward's fixed cost is most of a step, so the rounds of every other device wait that much
longer. Deficit round robin over time (Shreedhar and Varghese 1995, with seconds for bytes): after each step
every device with work (queued, or a round expected back) is credited an equal part of the step's seconds,
up to ``cap_s``; the seconds of the prefill forward are debited to the devices whose chunks it ran, by their
tokens. A device in debt prefills only when no other device has work: a device that opens session after
session gets its 1/N of the verifier's time for prefill while others decode, and all of it when alone. Its
decoding rounds are not debited here: ``--device-step-tokens`` bounds those in every step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


@dataclass
class FairShare:
    cap_s: float = 0.5           # credit a quiet device may bank (a burst of its own prefill later)
    max_devices: int = 4096
    _credit_s: dict[str, float] = field(default_factory=dict)

    def may_prefill(self, device: str, active: Collection[str]) -> bool:
        """Whether ``device`` may add prefill to this step, ``active`` the devices with work now."""
        return self._credit_s.get(device, 0.0) >= 0.0 or not any(other != device for other in active)

    def credit(self, device: str) -> float:
        return self._credit_s.get(device, 0.0)

    def charge(self, active: Collection[str], step_s: float, prefill_s: Mapping[str, float]) -> None:
        """After a step of ``step_s`` seconds: credit each active device its share, debit the prefill it ran."""
        for device in active:
            self._credit_s[device] = min(self.cap_s, self._credit_s.get(device, 0.0) + step_s / len(active))
        for device, seconds in prefill_s.items():
            self._credit_s[device] = self._credit_s.get(device, 0.0) - seconds
        if len(self._credit_s) > self.max_devices:  # forget the quiet ones in credit first; debt is kept longest
            for device in sorted(self._credit_s, key=self._credit_s.__getitem__, reverse=True):
                if len(self._credit_s) <= self.max_devices:
                    break
                del self._credit_s[device]
