"""Lossless speculative sampling: warping matches transformers, and the committed tokens are distributed
exactly as the target's own samples (chi-square over 10^5 runs of the verifier's own code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import sled_verifier.sampling as sampling_module
from sled_edge.proposal import sparse_proposal, warp_probs as edge_warp
from sled_protocol import SamplingParams
from sled_verifier.sampling import SampledRows, rejection_sample, warp_probs

V = 8           # a tiny vocabulary: the joint of two tokens has 64 cells
N = 100_000     # runs per statistical test
PROMPT = [3, 1, 4]

WARPS = [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.9), (1.0, 3, 0.5), (2.0, 50, 0.95)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), WARPS)
def test_warping_matches_transformers_and_the_edge(temperature, top_k, top_p):
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(7)) * 3
    params = SamplingParams(temperature, top_k, top_p)
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    ours = warp_probs(logits, torch.full((4,), params.temperature), torch.full((4,), top_k), torch.full((4,), params.top_p))
    assert torch.equal(ours, scores.softmax(-1))
    for row in range(4):
        edge = edge_warp(logits[row].numpy(), params)
        assert np.allclose(edge, ours[row].numpy(), atol=1e-6) and ((edge > 0) == (ours[row].numpy() > 0)).all()


def tiny_model(seed: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, initializer_range=0.15)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tables():
    """Warped distributions after every context the two-token test can reach: x, x+a, x+a+b."""
    target, draft = tiny_model(11, 2), tiny_model(12, 1)
    contexts = [PROMPT] + [PROMPT + [a] for a in range(V)] + [PROMPT + [a, b] for a in range(V) for b in range(V)]

    def last_logits(model):
        with torch.inference_mode():
            return torch.stack([model(torch.tensor([c])).logits[0, -1] for c in contexts])

    return last_logits(target), last_logits(draft)


def context_index(prefix: tuple[int, ...]) -> int:
    return 0 if not prefix else (1 + prefix[0] if len(prefix) == 1 else 1 + V + prefix[0] * V + prefix[1])


SCENARIOS = {
    # name: (target warp, how the edge proposes)
    "disagreeing draft, top-3 proposal": (SamplingParams(1.0), "draft-top3"),
    "proposal misses the target's mode": (SamplingParams(1.0), "anti-mode"),
    "top-p excludes drafted tokens": (SamplingParams(1.0, top_p=0.6), "draft-top8-unwarped"),
    "top-k and temperature": (SamplingParams(0.7, top_k=4), "draft-top3"),
    "token-only deterministic draft": (SamplingParams(1.0), "point-mass"),
}


def proposals(kind: str, draft_logits: torch.Tensor, target_probs: torch.Tensor, params: SamplingParams):
    """Dense q' [contexts, V] the edge samples from (and sends in sparse form) in each scenario."""
    rows = []
    for c in range(draft_logits.shape[0]):
        if kind == "anti-mode":  # uniform over the target's three least likely tokens
            q = np.zeros(V)
            q[np.argsort(target_probs[c].numpy())[:3]] = 1 / 3
        elif kind == "point-mass":
            q = np.eye(V)[int(draft_logits[c].argmax())]
        else:
            warp = params if kind == "draft-top3" else SamplingParams(1.0)
            sparse = sparse_proposal(edge_warp(draft_logits[c].numpy(), warp), 3 if kind == "draft-top3" else V)
            q = np.zeros(V)
            q[list(sparse.ids)] = np.asarray(sparse.probs, dtype=np.float64) / np.sum(sparse.probs)
        rows.append(q)
    return torch.tensor(np.array(rows))


def draw(dense: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(dense.float(), 1, generator=generator).squeeze(1)


def verify_round(prefixes, k, p_table, q_table, generator):
    """One verification round for each run: draft k tokens from q', run the verifier's rejection sampler."""
    n = len(prefixes)
    drafts = torch.zeros(n, k, dtype=torch.int64)
    probs = torch.zeros(n, k + 1, V)
    q_probs = torch.zeros(n, k, V, dtype=torch.float64)
    contexts = [tuple(p) for p in prefixes]
    for j in range(k + 1):
        index = torch.tensor([context_index(c) for c in contexts])
        probs[:, j] = p_table[index]
        if j < k:
            q_probs[:, j] = q_table[index]
            drafts[:, j] = draw(q_table[index], generator)
            contexts = [c + (int(d),) for c, d in zip(contexts, drafts[:, j])]
    q_ids = torch.arange(V).expand(n, k, V)   # the dense proposal in sparse form: all V ids
    rows = SampledRows(probs=probs, draft_ids=drafts, draft_lens=torch.full((n,), k), q_ids=q_ids, q_probs=q_probs,
                       uniforms=torch.rand(n, k + 1, generator=generator, dtype=torch.float64),
                       budgets=torch.full((n,), 100))
    result = rejection_sample(rows, torch.tensor([-5]))
    committed = []
    for row in range(n):
        tokens = drafts[row, : result.accepted[row]].tolist() + [int(result.next_token[row])]
        committed.append(list(prefixes[row]) + tokens)
    return committed


def sample_two_tokens(scenario: str, tables, seed: int = 0) -> np.ndarray:
    """(t1, t2) for N runs through the verifier's code, drafting k=2; a second round where one token came."""
    params, kind = SCENARIOS[scenario]
    target_logits, draft_logits = tables
    rows = target_logits.shape[0]
    as_tensor = lambda x: torch.tensor(x)  # noqa: E731
    p_table = warp_probs(target_logits, as_tensor([params.temperature] * rows), as_tensor([params.top_k] * rows),
                         as_tensor([params.top_p] * rows))
    q_table = proposals(kind, draft_logits, p_table, params)
    generator = torch.Generator().manual_seed(seed)
    first = verify_round([[] for _ in range(N)], 2, p_table, q_table, generator)
    short = [i for i, c in enumerate(first) if len(c) < 2]
    if short:
        second = verify_round([first[i] for i in short], 1, p_table, q_table, generator)
        for i, c in zip(short, second):
            first[i] = c
    return np.array([c[:2] for c in first]), p_table


def chi_square_p(samples: np.ndarray, p_table: torch.Tensor, position: str) -> float:
    p1 = p_table[context_index(())].double().numpy()
    if position == "first":
        observed = np.bincount(samples[:, 0], minlength=V)
        expected = p1 * len(samples)
    else:  # the joint of the first two tokens: p(t1) p(t2 | t1)
        observed = np.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V)
        expected = np.concatenate([p1[a] * p_table[context_index((a,))].double().numpy() for a in range(V)]) * len(samples)
    assert observed[expected == 0].sum() == 0, "a token the target can never produce was committed"
    keep = expected >= 5
    pooled_obs = np.append(observed[keep], observed[~keep].sum())
    pooled_exp = np.append(expected[keep], expected[~keep].sum())
    if pooled_exp[-1] == 0:
        pooled_obs, pooled_exp = pooled_obs[:-1], pooled_exp[:-1]
    return chisquare(pooled_obs, pooled_exp * pooled_obs.sum() / pooled_exp.sum()).pvalue


@pytest.mark.slow  # about 10 s or more on a 2-core machine
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_committed_tokens_follow_the_target_distribution(scenario, tables):
    samples, p_table = sample_two_tokens(scenario, tables)
    assert chi_square_p(samples, p_table, "first") > 0.01
    assert chi_square_p(samples, p_table, "joint") > 0.01


@pytest.mark.slow  # about 10 s or more on a 2-core machine
def test_a_wrong_residual_is_caught(tables, monkeypatch):
    """Prove the test bites: resampling from p instead of max(0, p - q') skews the output detectably."""
    monkeypatch.setattr(sampling_module, "residual_distribution", lambda p, q: p)
    samples, p_table = sample_two_tokens("disagreeing draft, top-3 proposal", tables)
    assert chi_square_p(samples, p_table, "first") < 0.01


def test_zero_draft_probability_is_a_rejection_not_a_division():
    """d not in q' (q'(d) = 0): rejected, and the recovered token comes from the residual."""
    probs = torch.tensor([[[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    rows = SampledRows(probs=probs, draft_ids=torch.tensor([[1]]), draft_lens=torch.tensor([1]),
                       q_ids=torch.tensor([[[0, 2]]]), q_probs=torch.tensor([[[0.5, 0.5]]], dtype=torch.float64),
                       uniforms=torch.tensor([[0.0, 0.99]]), budgets=torch.tensor([10]))
    result = rejection_sample(rows, torch.tensor([-1]))
    assert result.accepted.tolist() == [0]
    assert result.next_token.tolist() == [1]  # residual max(0, p - q') = [0, 0.5, 0]: only token 1
