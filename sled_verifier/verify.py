"""Greedy speculative verification over a padded ragged batch (Leviathan et al. 2023, arXiv 2211.17192).

(Sampled sessions use ``sled_verifier.sampling.rejection_sample``; both share ``apply_stops``, its ``Stops`` and
``NO_TOKEN``. ``sled_verifier.decide`` sends each row to exactly one of the two.)

For each session i the target scored ``[x[n-1], d_1..d_k]``, so ``target_ids[i, j]`` is the target's
argmax after ``d_1..d_j``. The longest prefix where ``d_j == target_ids[j-1]`` is accepted; the next
token is the target's argmax at the first mismatch (recovered) or after the last draft token (bonus).
No next token after an accepted EOS, nor once the session's length budget is spent.

Pure: torch tensors in, tensors out, no per-token Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Not a token id (ids are >= 0): the padding after a draft's last token in a [B, K] batch, and the next
# token of a row that gets none (an accepted EOS, a spent budget). It never reaches the wire: a verdict
# without a next token says ``next_token=None``.
NO_TOKEN = -1


@dataclass(frozen=True)
class VerifyResult:
    accepted: torch.Tensor    # [B] accepted draft tokens a_i
    next_token: torch.Tensor  # [B] recovered or bonus token, NO_TOKEN where there is none
    is_bonus: torch.Tensor    # [B] True where all k_i draft tokens were accepted
    hit_eos: torch.Tensor     # [B] True where the committed tokens end with EOS


def greedy_verify(
    draft_ids: torch.Tensor,    # [B, K] draft tokens, right-padded with NO_TOKEN
    draft_lens: torch.Tensor,   # [B] k_i <= K
    target_ids: torch.Tensor,   # [B, K+1] target argmax at each scored position
    budgets: torch.Tensor,      # [B] tokens session i may still commit (max_len - n), >= 1
    eos_ids: torch.Tensor,      # [E] end-of-sequence ids
) -> VerifyResult:
    if draft_ids.shape[1] == 0:  # every draft empty: keep one all-padding column so reductions have width
        draft_ids = draft_ids.new_full((draft_ids.shape[0], 1), NO_TOKEN)
    k_max = draft_ids.shape[1]
    positions = torch.arange(k_max, device=draft_ids.device)                  # [K]
    valid = positions[None, :] < draft_lens[:, None]                           # [B, K]
    matches = (draft_ids == target_ids[:, :k_max]) & valid                     # [B, K]
    accepted = matches.to(torch.int64).cumprod(dim=1).sum(dim=1)               # [B] longest matching prefix
    stops = apply_stops(draft_ids, accepted, budgets, eos_ids)
    next_token = target_ids.gather(1, stops.accepted[:, None]).squeeze(1)     # [B]
    return stops.result(next_token=next_token, draft_lens=draft_lens, eos_ids=eos_ids)


@dataclass(frozen=True)
class Stops:
    """The accepted prefix once an accepted EOS and the length budget have cut it (``apply_stops``)."""

    accepted: torch.Tensor      # [B] accepted draft tokens after the cuts
    has_next: torch.Tensor      # [B] True where a next token follows them
    eos_in_draft: torch.Tensor  # [B] True where an accepted draft token is an EOS

    def result(self, *, next_token: torch.Tensor, draft_lens: torch.Tensor, eos_ids: torch.Tensor) -> VerifyResult:
        """The rows' verdicts with ``next_token`` [B] (recovered or bonus) where one follows."""
        next_is_eos = torch.isin(next_token, eos_ids) & self.has_next
        return VerifyResult(
            accepted=self.accepted,
            next_token=torch.where(self.has_next, next_token, torch.full_like(next_token, NO_TOKEN)),
            is_bonus=self.has_next & (self.accepted == draft_lens),
            hit_eos=self.eos_in_draft | next_is_eos,
        )


def apply_stops(draft_ids: torch.Tensor, accepted: torch.Tensor, budgets: torch.Tensor,
                eos_ids: torch.Tensor) -> Stops:
    """Cut the accepted prefix after an accepted EOS and at the length budget; say whether a next token follows."""
    k_max = draft_ids.shape[1]
    positions = torch.arange(k_max, device=draft_ids.device)
    is_eos = torch.isin(draft_ids, eos_ids) & (positions[None, :] < accepted[:, None])
    eos_cut = torch.where(is_eos.any(dim=1), is_eos.to(torch.int64).argmax(dim=1) + 1, k_max + 1)
    accepted = torch.minimum(torch.minimum(accepted, eos_cut), budgets)       # [B]
    eos_in_draft = eos_cut <= accepted
    return Stops(accepted=accepted, has_next=(~eos_in_draft) & (accepted < budgets), eos_in_draft=eos_in_draft)
