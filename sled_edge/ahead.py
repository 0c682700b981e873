"""Whether proactive drafting pays on this device: the policy behind ``Drafter.draft_ahead`` (pure; the caller
passes measurements in), beside the draft-length controller whose round timing it shares."""

from __future__ import annotations

from dataclasses import dataclass

from sled_edge.controller import RoundTiming

__all__ = ["AheadPolicy"]


@dataclass
class AheadPolicy(RoundTiming):
    """Whether drafting the next round ahead pays, per device, from what it measures (pure: callers pass
    measurements in). Drafted ahead, the next round takes k+1 forward passes (one finds the guessed token)
    from the moment the round goes out; drafted after the verdict, k passes one round trip later. When the
    round trip covers the k+1 passes, a guess that holds saves k passes and one that fails costs nothing but
    device CPU; when it does not, a failed guess delays the fresh draft by the pass under way and a held one
    saves less (``bench/proactive.py`` measures both cases; its figures are in the README). So: draft ahead
    when t_round >= (k+1) t_draft and at least ``min_hit_rate`` of guesses hold (below that the CPU and energy
    go mostly to drafts thrown away); every ``explore_every``-th round regardless, so the hit rate stays
    measured."""

    hit_rate: float = 0.5        # prior, then a moving average over guesses (weighted as the timing)
    min_hit_rate: float = 0.1
    explore_every: int = 16
    rounds: int = 0

    def pays(self, k: int) -> bool:
        pays = self.hit_rate >= self.min_hit_rate and self.round_s >= (k + 1) * self.draft_s
        return pays or self.rounds % self.explore_every == self.explore_every - 1

    def observe_round(self, k: int, draft_s: float, round_s: float) -> None:
        self.rounds += 1
        self.time_round(k, draft_s, round_s)

    def observe_guess(self, held: bool) -> None:
        self.hit_rate += self.smoothing * (float(held) - self.hit_rate)
