"""Batch assembly and the split of a batch between the greedy and the sampled path, on hand-made logits.

A greedy row is decided by argmax only and a batch of greedy rows runs no sampling code at all; in a mixed
batch each row is decided by exactly one path, and its verdict is the one it gets alone."""

from __future__ import annotations

import pytest
import torch

import sled_verifier.decide as decide_module
from sled_protocol import Draft, SamplingParams
from sled_protocol.seeding import STREAM_VERIFY, round_seed
from sled_verifier import sampling
from sled_verifier.rows import padded_rows
from sled_verifier.decide import decide, is_sampled
from sled_verifier.verify import NO_TOKEN, greedy_verify

V = 12
EOS = torch.tensor([0])


def make(tokens, sampling_params=None, q=None, base_len=5, session="s") -> Draft:
    q_ids = tuple(tuple(ids) for ids, _ in q) if q else None
    q_probs = tuple(tuple(probs) for _, probs in q) if q else None
    return Draft("dev", session, 0, base_len, tuple(tokens), 100, "v", sampling=sampling_params, q_ids=q_ids,
                 q_probs=q_probs)


def logits_for(drafts, seed=0) -> torch.Tensor:
    """Random target logits [B, K+1, V] for ``drafts``, as one forward over [x[n-1], d_1..d_k] returns them."""
    width = max(len(d.tokens) for d in drafts) + 1
    return torch.randn(len(drafts), width, V, generator=torch.Generator().manual_seed(seed)) * 3


def rows(result) -> list[tuple]:
    return list(zip(result.accepted.tolist(), result.next_token.tolist(), result.is_bonus.tolist(),
                    result.hit_eos.tolist()))


def forbid_sampling(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a greedy row reached sampling code")

    for name in ("sampled_rows", "warp_probs", "rejection_sample", "residual_distribution", "sample_inverse_cdf"):
        monkeypatch.setattr(sampling, name, boom)


# --- batch assembly ---------------------------------------------------------------------------------------

def test_drafts_are_right_padded_with_the_placeholder():
    batch = padded_rows([make([5, 6, 7]), make([]), make([9])], [10, 3, 1], torch.device("cpu"))
    assert batch.draft_ids.tolist() == [[5, 6, 7], [NO_TOKEN] * 3, [9, NO_TOKEN, NO_TOKEN]]
    assert batch.lens.tolist() == [3, 0, 1] and batch.budgets.tolist() == [10, 3, 1]
    assert batch.take(torch.tensor([2])).draft_ids.tolist() == [[9, NO_TOKEN, NO_TOKEN]]  # K stays the step's
    assert NO_TOKEN < 0  # never a token id


def test_a_batch_of_empty_drafts_keeps_one_column():
    batch = padded_rows([make([]), make([])], [4, 4], torch.device("cpu"))
    assert batch.width == 1 and batch.draft_ids.tolist() == [[NO_TOKEN], [NO_TOKEN]]


def test_sparse_proposals_are_padded_and_renormalised():
    drafts = [make([3, 4], q=[([3, 8], [0.5, 0.25]), ([4], [1.0])]), make([7])]  # the second: token only
    ids, probs = sampling.sparse_proposals(drafts, k_max=3)
    assert ids.shape == probs.shape == (2, 3, 2)
    assert ids[0].tolist() == [[3, 8], [4, 0], [0, 0]]
    assert torch.allclose(probs[0], torch.tensor([[2 / 3, 1 / 3], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert ids[1, 0].tolist() == [7, 0] and probs[1, 0].tolist() == [1.0, 0.0]           # point mass on d_1
    assert probs[1, 1:].sum() == 0                                                         # padding: no mass


def test_uniforms_come_from_the_round_seed_whatever_the_batch():
    """A row's uniforms depend on its session seed and committed length, not on the step's K."""
    draft = make([1, 2], SamplingParams(0.8, seed=42), base_len=17)
    alone = sampling.verify_uniforms([draft], k_max=2)
    in_a_wider_batch = sampling.verify_uniforms([draft, make([1] * 9, SamplingParams(1.0, seed=1))], k_max=9)
    expected = torch.rand(3, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(round_seed(42, 17, STREAM_VERIFY)))
    assert torch.equal(alone[0], expected) and torch.equal(in_a_wider_batch[0, :3], expected)


# --- the two paths ------------------------------------------------------------------------------------------

def test_temperature_zero_is_greedy():
    assert not is_sampled(make([1])) and not is_sampled(make([1], SamplingParams(0.0, seed=3)))
    assert not is_sampled(make([1], SamplingParams(1e-6)))  # below GREEDY_BELOW_TEMPERATURE: greedy at both ends
    assert is_sampled(make([1], SamplingParams(0.5)))


def test_a_greedy_batch_never_touches_sampling(monkeypatch):
    drafts = [make([5, 6, 7]), make([], SamplingParams(0.0, seed=9)), make([2, 2])]
    logits = logits_for(drafts)
    argmax = logits.argmax(dim=-1)
    drafts[0] = make(argmax[0, :3].tolist())  # one draft the target fully agrees with
    forbid_sampling(monkeypatch)
    result = decide(drafts, [10, 10, 2], logits, EOS)
    batch = padded_rows(drafts, [10, 10, 2], logits.device)
    assert rows(result) == rows(greedy_verify(batch.draft_ids, batch.lens, argmax, batch.budgets, EOS))
    assert rows(result)[0][:3] == (3, int(argmax[0, 3]), True)


def test_the_forbidding_bites(monkeypatch):
    """The guard above would catch a sampled row: the same patch fails a batch holding one."""
    forbid_sampling(monkeypatch)
    drafts = [make([5]), make([5], SamplingParams(1.0))]
    with pytest.raises(AssertionError, match="reached sampling code"):
        decide(drafts, [10, 10], logits_for(drafts), EOS)


@pytest.mark.parametrize("seed", range(3))
def test_each_row_of_a_mixed_batch_is_decided_once_and_as_alone(monkeypatch, seed):
    drafts = [
        make([3, 4, 5], session="g1"),
        make([1, 2], SamplingParams(0.9, top_k=5, seed=seed), q=[([1, 2], [0.7, 0.3]), ([2], [1.0])], session="s1"),
        make([], session="g2"),
        make([7, 8, 9, 10], SamplingParams(1.3, top_p=0.9, seed=seed + 7), session="s2"),  # token-only proposal
        make([], SamplingParams(0.7, seed=seed), session="s3"),
    ]
    budgets = [10, 10, 10, 3, 10]
    logits = logits_for(drafts, seed)
    seen = {"greedy": [], "sampled": []}
    greedy_path, sampled_path = decide_module.greedy_verify, sampling.rejection_sample

    def spy_greedy(draft_ids, *args):
        seen["greedy"].append(draft_ids.shape[0])
        return greedy_path(draft_ids, *args)

    def spy_sampled(rows, eos_ids):
        seen["sampled"].append(rows.draft_ids.shape[0])
        return sampled_path(rows, eos_ids)

    monkeypatch.setattr(decide_module, "greedy_verify", spy_greedy)
    monkeypatch.setattr(sampling, "rejection_sample", spy_sampled)
    together = rows(decide(drafts, budgets, logits, EOS))
    assert seen == {"greedy": [2], "sampled": [3]}  # one call per path, each with only its own rows
    for row, draft in enumerate(drafts):
        width = len(draft.tokens) + 1
        assert [together[row]] == rows(decide([draft], [budgets[row]], logits[row : row + 1, :width], EOS)), row


def test_a_step_of_empty_sampled_drafts_has_one_position():
    """Every draft empty: the forward scored one position per row; the sampled path draws the next token there."""
    drafts = [make([], SamplingParams(1.0, seed=s), session=f"e{s}") for s in range(3)]
    logits = torch.full((3, 1, V), -1e9)
    logits[:, 0, 4] = 0.0  # all the target's mass on token 4
    assert rows(decide(drafts, [5, 5, 5], logits, EOS)) == [(0, 4, True, False)] * 3


def packed(padded: torch.Tensor, lens: list[int]):
    """The ``PackedLogits`` of a packed forward whose rows have ``lens`` tokens: each row's real places packed end
    to end, padding places pointing at the row's last token (as ``kvslots.packed_layout`` unpacks)."""
    from sled_verifier.target import PackedLogits

    tokens, unpack = [], []
    for row, n in enumerate(lens):
        first = len(tokens)
        tokens += [padded[row, i] for i in range(n)]
        unpack.append([first + min(i, n - 1) for i in range(padded.shape[1])])
    return PackedLogits(torch.stack(tokens), torch.tensor(unpack))


@pytest.mark.parametrize("seed", range(4))
def test_packed_logits_decide_as_the_padded_ones(seed):
    """Greedy, sampled and mixed batches of ragged drafts: the verdicts from a packed forward's logits (argmax per
    token, sampled rows copied out alone) are the padded tensor's, bit for bit; ties and a NaN included."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(0, 7, (1,), generator=g)) for _ in range(6)]
    drafts = [make([int(t) for t in torch.randint(1, V, (n,), generator=g)], session=f"s{i}") for i, n in enumerate(lengths)]
    settings = SamplingParams(0.9, 0, 1.0, 7)
    sampled_q = lambda d: [([t], [1.0]) for t in d.tokens]  # noqa: E731
    batches = [drafts,
               [make(d.tokens, settings, sampled_q(d), session=d.session_id) for d in drafts],
               [make(d.tokens, settings, sampled_q(d), session=d.session_id) if i % 2 else d for i, d in enumerate(drafts)]]
    for batch in batches:
        padded = logits_for(batch, seed)
        padded[0, 0, 3] = padded[0, 0, 5] = padded[0, 0].max() + 1  # a tie: the first index wins
        padded[-1, 0, 2] = float("nan")                               # torch's argmax takes the NaN
        lens = [len(d.tokens) + 1 for d in batch]
        budgets = [100] * len(batch)
        assert rows(decide(batch, budgets, packed(padded, lens), EOS)) == rows(decide(batch, budgets, padded, EOS))


def test_a_packed_forward_gives_the_padded_logits(tiny_models):
    """Both runtimes' ``packed_logits=True``: the same logits, token for token, without the padded copy."""
    from tests.test_invariance import rounds
    from sled_verifier.runtime import load_target

    for runtime in ("transformers", "compiled"):
        target = load_target(tiny_models.target, runtime, "cpu")
        _, slots, starts, inputs = rounds(target, 3)
        padded = target.forward_rows(slots, starts, inputs)
        _, slots, starts, inputs = rounds(target, 3)
        lazy = target.forward_rows(slots, starts, inputs, packed_logits=True)
        assert lazy.shape == padded.shape
        for row, tokens in enumerate(inputs):
            assert torch.equal(lazy[torch.tensor([row])][0, : len(tokens)], padded[row, : len(tokens)])
            assert torch.equal(lazy.argmax(dim=-1)[row, : len(tokens)], padded[row, : len(tokens)].argmax(dim=-1))
