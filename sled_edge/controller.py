"""Adaptive draft length: each round pick the k that maximises expected committed tokens per second.

With per-position acceptance a_j (the chance that draft token j is accepted given tokens 1..j-1 were),
a round of k draft tokens commits E(k) = 1 + sum_{i=1..k} prod_{j<=i} a_j tokens (for a constant a this
is (1 - a^(k+1)) / (1 - a)), and takes T(k) = k * t_draft + t_round (drafting, then publish + verify +
verdict). The controller measures a_j (smoothed counts), t_draft and t_round as it goes and returns
argmax_k E(k) / T(k). A position rarely tested (k seldom reaches it) borrows the pooled acceptance of
all positions, and every ``explore_every``-th round drafts one token more than the best k, so a
position's estimate keeps being revised even when it looks unprofitable (else two unlucky early
rounds could keep a good draft short for ever).

The server's price (issue 22, items 3 and 4): a verifier announces its step cost (``StepPrice``: seconds a step
costs whatever it holds, per draft, per scored token, and its recent drafts per step). A round of k drafts then
costs the server about fixed / drafts_per_step + per_draft + (k + 1) x per_token and commits E(k) tokens; with a
price the controller picks the k (0 included: the server decodes one token, as server-only would) that costs the
server least per committed token, among the k that keep the device at least as fast as k = 0 would (its own
pace: a slow draft never makes its user wait longer than server-only), preferring the faster of near-equal ones.
A memory-bound server (per-token price ~0) gets long drafts; a compute-bound one short drafts or none. Without a
price (a verifier that announces none) it maximises the device's own tokens per second, as before.
Pure: the caller passes measurements in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEAR_EQUAL = 0.03  # server costs per token within this fraction of the cheapest count as equal: then the faster k


@dataclass(frozen=True)
class StepPrice:
    """What a verifier's step costs it now, as it announces (``Status.step_cost``)."""

    fixed_s: float
    per_draft_s: float
    per_token_s: float
    drafts_per_step: float = 1.0

    @classmethod
    def from_wire(cls, step_cost) -> StepPrice | None:
        """From ``Status.step_cost`` (fixed, per draft, per token, drafts per step), or None when not announced."""
        if not step_cost or len(step_cost) < 4:
            return None
        return cls(*(max(0.0, float(v)) for v in step_cost[:4]))

    def round_s(self, k: int) -> float:
        """The server's seconds for one round of k drafts: its share of a step."""
        return self.fixed_s / max(1.0, self.drafts_per_step) + self.per_draft_s + (k + 1) * self.per_token_s


@dataclass
class RoundTiming:
    """A device's round as it measures it, exponential moving averages with the newest sample weighted
    ``smoothing``: seconds to draft one token, and a round trip (publish -> verdict, drafting excluded). The one
    timing the draft-length controller and the proactive-drafting policy (``sled_edge.ahead``) both keep."""

    draft_s: float = 0.002             # time to draft one token
    round_s: float = 0.010             # publish -> verdict, drafting excluded
    smoothing: float = 0.05            # weight of the newest sample

    def time_round(self, k: int, draft_s: float, round_s: float) -> None:
        """One round of ``k`` draft tokens drafted in ``draft_s`` and verified in ``round_s``."""
        decay = 1 - self.smoothing
        if k > 0 and draft_s > 0:
            self.draft_s = decay * self.draft_s + self.smoothing * (draft_s / k)
        self.round_s = decay * self.round_s + self.smoothing * round_s


def expected_tokens(acceptance: list[float], k: int) -> float:
    """Expected tokens committed by one round of k draft tokens (accepted prefix + recovered/bonus)."""
    total, survive = 1.0, 1.0
    for j in range(k):
        survive *= acceptance[j]
        total += survive
    return total


@dataclass
class DraftLengthController(RoundTiming):
    k_max: int = 8
    prior_acceptance: float = 0.6
    prior_weight: float = 2.0          # pseudo-observations behind the prior, per position
    explore_every: int = 16
    rounds: int = 0
    offered: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offered = [0.0] * self.k_max
        self.accepted = [0.0] * self.k_max

    def acceptance(self) -> list[float]:
        """Per-position estimates, each shrunk towards the pooled acceptance of all positions."""
        pooled = (sum(self.accepted) + self.prior_weight * self.prior_acceptance) / (sum(self.offered) + self.prior_weight)
        return [(a + self.prior_weight * pooled) / (o + self.prior_weight) for a, o in zip(self.accepted, self.offered)]

    def best(self, limit: int | None = None, price: StepPrice | None = None) -> int:
        """Without ``price``: the k in [1, min(k_max, limit)] with the most expected tokens per second. With it: the
        k in [0, ...] that costs the server least per committed token within the device's pace (module doc)."""
        upper = self.k_max if limit is None else max(0, min(self.k_max, limit))
        if upper == 0:
            return 0
        acceptance = self.acceptance()

        def rate(k: int) -> float:
            return expected_tokens(acceptance, k) / (k * self.draft_s + self.round_s)

        if price is None:
            return max(range(1, upper + 1), key=rate)
        paced = [k for k in range(upper + 1) if rate(k) >= rate(0)]  # never slower than the server decoding alone
        cost = {k: price.round_s(k) / expected_tokens(acceptance, k) for k in paced}
        cheapest = min(cost.values())
        return max((k for k in paced if cost[k] <= cheapest * (1 + NEAR_EQUAL)), key=rate)

    def choose(self, limit: int | None = None, price: StepPrice | None = None) -> int:
        """This round's k: the best one, or one more on exploration rounds (so a k of 0 keeps measuring)."""
        best = self.best(limit, price)
        upper = self.k_max if limit is None else min(self.k_max, limit)
        if upper > 0 and self.rounds % self.explore_every == self.explore_every - 1:
            return min(best + 1, upper)
        return best

    def observe(self, k: int, accepted: int, draft_s: float, round_s: float) -> None:
        """One verified round: k offered, ``accepted`` of them, drafting and round-trip times."""
        self.rounds += 1
        # Position j was tested only if j-1 was accepted: positions 0..accepted (capped at k-1).
        for j in range(min(k, accepted + 1)):
            self.offered[j] += 1
            if j < accepted:
                self.accepted[j] += 1
        self.time_round(k, draft_s, round_s)
