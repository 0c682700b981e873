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
