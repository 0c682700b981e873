"""What a verifier tells devices a draft and a scored token cost it now (``Status.step_cost``, issue 22).

A device picks its draft length k to cost the server least per committed token (``sled_edge.controller``): a
round costs it ``fixed / drafts_per_step + per_draft + (k + 1) x per_token``, so what decides k is how a step's
time splits between the rounds it holds and the tokens they score *at the load the server runs now*. That
split is not one line: a step is memory bound at a few rows (a token costs almost nothing more) and compute
bound at many (every token costs what a decoded one does). A single least-squares line through every step
(the model the scheduler predicts step times with) put a draft at 0.5 tokens' cost where the step times said
1.3 (SmolLM2, N = 16, one Zen 5 core) and at 1.2 where they said 0.5 (N = 64): devices drafted too little at
one load and too much at the other.

So the price comes from a table instead: verification steps timed at start on a grid of batch sizes and widths
(tokens a draft, k + 1, up to 256 tokens a step; ``VerifierEngine.calibrate``), read at the load the service sees (its recent drafts per
step and tokens per draft). A token's price is the table's slope in width there, per draft (what one more
scored token adds to the step); the step's remainder, shared by its drafts, is the fixed part. The per-draft
term is the service's own work a round outside the model (receiving, scheduling, bookkeeping, publishing:
``VerifierService.step_cost``), which a device drafting nothing pays for every token. Live steps scale the
table's level (a moving ratio of measured to predicted), not its shape: the shape is what the grid measured, and steps at one
load cannot tell it apart (their tokens are all about (k + 1) x drafts).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LEVEL_SMOOTHING = 0.05   # weight of the newest step in the table's level
LEVEL_CLAMP = (0.2, 5.0)  # one step's measured / predicted counts within this range (a hiccup, a cold core)


def _between(points: Sequence[float], x: float) -> tuple[int, int]:
    """The two grid indices whose segment holds ``x`` (the end segment beyond the grid: extrapolated)."""
    if len(points) == 1:
        return 0, 0
    right = min(max(1, bisect_right(points, x)), len(points) - 1)
    return right - 1, right


def _linear(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    low, high = _between(xs, x)
    if low == high:
        return ys[low] * (x / xs[low] if xs[low] else 1.0)  # one point: proportional
    share = (x - xs[low]) / (xs[high] - xs[low])
    return ys[low] + share * (ys[high] - ys[low])


@dataclass
class StepTable:
    """Step seconds on a grid, ``seconds[i][j]`` for ``drafts[i]`` rows of ``widths[i][j]`` tokens each (each size
    its own widths: the calibration caps a step's tokens); read piecewise linear, linear beyond the grid's ends (a
    step past the largest batch timed is compute bound, linear in its rows), times ``level``: what live steps
    measured over what the table predicted."""

    drafts: list[int]
    widths: list[list[int]]
    seconds: list[list[float]]
    level: float = 1.0
    _steps: int = field(default=0, repr=False)

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[int, int, float]]) -> StepTable | None:
        """From calibration samples (drafts, tokens, seconds), the fastest of each shape's repeats (the least
        disturbed); the sizes timed at two widths or more; None without one."""
        fastest: dict[int, dict[int, float]] = {}
        for drafts, tokens, seconds in samples:
            if drafts > 0 and tokens % drafts == 0 and seconds > 0:
                row = fastest.setdefault(drafts, {})
                row[tokens // drafts] = min(seconds, row.get(tokens // drafts, seconds))
        sizes = sorted(d for d, row in fastest.items() if len(row) >= 2)
        if not sizes:
            return None
        return cls(sizes, [sorted(fastest[d]) for d in sizes], [[fastest[d][w] for w in sorted(fastest[d])] for d in sizes])

    def predict(self, drafts: float, width: float) -> float:
        """Seconds of a step of ``drafts`` rows of ``width`` tokens each, at the live level."""
        drafts, width = max(1.0, drafts), max(1.0, width)
        at_width = [_linear(widths, row, width) for widths, row in zip(self.widths, self.seconds)]
        return max(1e-6, self.level * _linear(self.drafts, at_width, drafts))

    def price(self, drafts_per_step: float, tokens_per_draft: float,
              per_draft_s: float = 0.0) -> tuple[float, float, float, float]:
        """``Status.step_cost`` at this load: (fixed, ``per_draft_s``, per scored token, drafts per step). A token's
        price is the slope in width over the grid's segment that holds this width, at the nearest size timed below;
        the per-draft term is the caller's (the table times forwards alone)."""
        drafts, width = max(1.0, drafts_per_step), max(1.0, tokens_per_draft)
        widths = self.widths[_between(self.drafts, drafts)[0]]
        low, high = _between(widths, width)
        narrow, wide = widths[low], widths[high]
        per_token = max(0.0, (self.predict(drafts, wide) - self.predict(drafts, narrow)) / (drafts * (wide - narrow)))
        fixed = max(0.0, self.predict(drafts, width) - drafts * width * per_token)
        return fixed, per_draft_s, per_token, drafts

    def observe(self, drafts: int, tokens: int, seconds: float) -> None:
        """A live verification step: move the level towards its measured / predicted (the first few steps count
        more, so the level leaves 1.0 quickly when the service runs unlike its calibration)."""
        if drafts <= 0 or tokens <= 0 or seconds <= 0:
            return
        self._steps += 1
        ratio = seconds / (self.predict(drafts, tokens / drafts) / self.level)
        weight = max(LEVEL_SMOOTHING, 1.0 / self._steps)
        self.level += weight * (min(max(ratio, LEVEL_CLAMP[0]), LEVEL_CLAMP[1]) - self.level)


@dataclass
class LivePrice:
    """What a service announces (``Status.step_cost``) and the load it is read at: its step table (None: no price),
    the recent drafts a verification step and scored tokens a draft (exponential means), and a verified draft's
    share of the service's own seconds outside the model (the per-draft term; at k = 0 a device pays it for every
    token, so the price must say so)."""

    table: StepTable | None = None
    drafts_per_step: float = 1.0
    tokens_per_draft: float = 1.0  # a verified draft's scored tokens (k + 1)
    overhead_s: float = 0.0
    _seen_s: float = field(default=0.0, repr=False)  # the service's outside-model seconds at the last step

    def start(self, outside_model_s: float) -> None:
        """The per-draft term counts the service's own seconds from here (not its start-up's)."""
        self._seen_s = outside_model_s

    def observe(self, verified: int, scored: int, rode_tokens: int, verify_s: float, outside_model_s: float) -> None:
        """A step that verified ``verified`` drafts (``scored`` tokens, ``rode_tokens`` of prefill riding in its
        forward of ``verify_s`` seconds), the service's outside-model seconds so far being ``outside_model_s``."""
        if self.table is not None:
            self.table.observe(verified, scored + rode_tokens, verify_s)
        self.drafts_per_step = 0.9 * self.drafts_per_step + 0.1 * verified
        self.tokens_per_draft = 0.9 * self.tokens_per_draft + 0.1 * scored / verified
        outside_s, self._seen_s = max(0.0, outside_model_s - self._seen_s), outside_model_s  # announced: >= 0
        self.overhead_s = 0.9 * self.overhead_s + 0.1 * outside_s / verified

    def announce(self) -> tuple[float, float, float, float] | None:
        """``Status.step_cost`` now: (fixed, per draft, per scored token, drafts per step); None without a table."""
        if self.table is None:
            return None
        return self.table.price(self.drafts_per_step, self.tokens_per_draft, self.overhead_s)
