"""Each device's fair share of the verifier's time, for the work a step may leave out: prefill, extra drafts. Pure.

Every step is paid for by every row in it: a step that also prefills a 64-token chunk runs a second forward,
and on a CPU a forward's fixed cost is most of a step, so the rounds of every other device wait that much
longer. Deficit round robin over time (Shreedhar and Varghese 1995, with seconds for bytes): after each step
every device with work (queued, or a round expected back) is credited an equal part of the step's seconds,
up to ``cap_s``; what a device adds to a step beyond its first draft is debited: the seconds of the prefill
forward to the devices whose chunks it ran, by their tokens, and each further draft's part of the verification
forward, by its tokens. A device's first draft of a step is its round robin turn, never debited: a device
decoding one session at a time pays nothing. A device in debt, while another device has work, prefills
nothing and adds only its first draft to a step (``DraftQueue.over_share``): a device that opens session
after session, or decodes many at once, gets its 1/N of the verifier's time for that while others decode,
and all of it when alone. A device that spends in a step it has alone (credited the whole step, debited only
its chunks) banks none of the step's other costs, so it brings no bank into the time others arrive; beside
others, a device that spends less than its part of the steps banks the rest (an honest device decoding: its
next session's prefill goes at once, from its bank).
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

    def over_share(self, devices: Collection[str], active: Collection[str]) -> frozenset[str]:
        """Those of ``devices`` in debt while another device has work (``active``): one draft a step, no prefill.
        None while no active device is in credit: there is no one to ride along with, and holding everyone's
        drafts would only idle the verifier (``tests/test_quotas.py``; ``make load`` found it)."""
        if not any(self._credit_s.get(device, 0.0) >= 0.0 for device in active):
            return frozenset()
        return frozenset(device for device in devices if not self.may_prefill(device, active))

    def charge(self, active: Collection[str], step_s: float, spent_s: Mapping[str, float]) -> None:
        """After a step of ``step_s`` seconds: credit each active device its share, debit what it added to the
        step beyond its first draft (``spent_s``: prefill, further drafts)."""
        before = {device: self._credit_s.get(device, 0.0) for device in spent_s}
        for device in active:
            self._credit_s[device] = min(self.cap_s, self._credit_s.get(device, 0.0) + step_s / len(active))
        for device, seconds in spent_s.items():  # alone, the step was all its own: spending, it banks none of it
            credit = self._credit_s.get(device, 0.0) - seconds
            self._credit_s[device] = min(before[device], credit) if len(active) <= 1 else credit
        if len(self._credit_s) > self.max_devices:  # forget the quiet ones in credit first; debt is kept longest
            for device in sorted(self._credit_s, key=self._credit_s.__getitem__, reverse=True):
                if len(self._credit_s) <= self.max_devices:
                    break
                del self._credit_s[device]
