"""The fleet bench's verifier configuration (bench/fleet.py): its context limit holds the fleet's longest session,
so the KV budget admits the whole fleet as server-only holds it, and a limit the caller sets wins."""

from __future__ import annotations

from bench.fleet import OUTPUT_TOKENS, PROMPT_TOKENS, SESSION_CONTEXT, context_flags


def test_context_limit_holds_the_longest_session_and_a_draft_past_it() -> None:
    assert SESSION_CONTEXT >= PROMPT_TOKENS[1] + OUTPUT_TOKENS[1] + 8 and SESSION_CONTEXT % 64 == 0
    assert SESSION_CONTEXT < 4096  # far below the default: the KV budget reserves this much a session
    assert context_flags(["--no-batch-invariant"]) == ["--max-context-tokens", str(SESSION_CONTEXT)]


def test_a_context_limit_the_caller_sets_wins() -> None:
    assert context_flags(["--max-context-tokens", "1024"]) == []
    assert context_flags(["--max-context-tokens=1024"]) == []


def test_server_only_takes_the_strongest_forward_and_the_ceiling_its_one_token_step(tiny_models) -> None:
    """Server-only is timed every way (the engine on the plain kernels and on the verifier's own forward,
    and generate) and reports the fastest; the ceiling's N x 1 step runs on whichever forward is faster, in
    slots apart from the wide passes' so neither overwrites the other's context."""
    from bench.fleet import server_only, step_times
    from sled_verifier.runtime import load_target

    plain = load_target(tiny_models.target, "transformers", "cpu", batch_invariant=False)
    verifying = load_target(tiny_models.target, "transformers", "cpu")
    pool = [{"prompt": [5, 6, 7, 8]}, {"prompt": [9, 10]}]
    result = server_only(plain, pool, 2, 3, verifying)
    ways = {"engine", "generate", "verifier"}
    assert result["which"] in ways and all(result[f"{way}_s_per_token"] > 0 for way in ways)
    assert result["s_per_token"] == min(result[f"{way}_s_per_token"] for way in ways)
    steps = step_times(plain, verifying, 2, [1, 2], 12)
    assert steps["t_n_x_1_s"] > 0 and set(steps["t_n_x_k1_s"]) == {1, 2}

