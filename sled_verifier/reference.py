"""The reference SLED is exact against: the verifier's own engine decoding alone, one token per step.

Server-only decoding is SLED with nothing drafted: a session whose every round carries k = 0 draft tokens
is verified one position per forward, through the same engine, runtime, prefill and greedy decision, and
its verdict's next token is the target's argmax there. With batch invariance (``sled_verifier.invariant``)
and width invariance (``sled_verifier.attention``: fixed query blocks and key spans), each position of any
verification pass gets bitwise the logits this decoding gets, so a greedy SLED run's output is this output token for token,
whatever the draft lengths, batch, neighbours or failovers (tests/test_width.py, ``sled-models check
--prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence

from sled_protocol import Draft, VerdictKind
from sled_verifier.engine import VerifierEngine


def decode_alone(engine: VerifierEngine, prompt: Sequence[int], max_new_tokens: int, *,
                 session: str = "reference", device: str = "reference", vocab: str = "") -> list[int]:
    """The greedy continuation of ``prompt`` (at most ``max_new_tokens``, ending at an end-of-sequence id)
    decoded by ``engine`` one token per step, alone: k = 0 every round. The session is closed after."""
    committed, seq = list(prompt), 0
    max_len = len(committed) + max_new_tokens
    context: tuple[int, ...] | None = tuple(committed)  # the first round opens the session with its prompt
    try:
        while True:
            draft = Draft(device_id=device, session_id=session, seq=seq, base_len=len(committed), tokens=(),
                          max_len=max_len, vocab=vocab, context=context)
            [outcome] = engine.step_until_answered([draft])
            verdict = outcome.verdict
            if verdict is None or verdict.kind is not VerdictKind.VERIFIED:
                raise RuntimeError(f"the reference decoding was refused: {verdict}")
            if verdict.next_token is not None:
                committed.append(verdict.next_token)
            context, seq = None, seq + 1
            if verdict.finish is not None:
                return committed[len(prompt):]
    finally:
        engine.close(device, session)
