"""Per-round random seeds shared by the edge and the verifier (exact sampling, Leviathan et al. 2023).

Both ends derive a round's random numbers from the session seed and the committed length alone, so a
seeded session reproduces its output on any verifier, after retries, resyncs and failover.
"""

from __future__ import annotations

# Independent random streams per round: the edge's draft sampling and the verifier's acceptance tests
# must never share uniforms (that would correlate d_i with its acceptance test and bias the output).
STREAM_DRAFT = 1
STREAM_VERIFY = 2


def round_seed(seed: int, committed_len: int, stream: int) -> int:
    """A 63-bit seed for one round of one session (splitmix64 over seed, length and stream).

    Seeding by committed length rather than by round number makes a seeded session reproduce its
    output even across retries and resyncs: the same prefix always meets the same random numbers.
    """
    x = (seed * 0x9E3779B97F4A7C15 + committed_len * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * multiplier) % 2**64
    return (x ^ (x >> 31)) & (2**63 - 1)
