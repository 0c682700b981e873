"""The bench's arithmetic (capacity against an SLO) on made-up figures: no timing is asserted anywhere."""

from __future__ import annotations

from bench.report import capacity


def test_capacity_is_the_largest_n_meeting_the_slo():
    results = {
        "sled": {1: {"session_tokens_per_s_median": 90}, 4: {"session_tokens_per_s_median": 70},
                 8: {"session_tokens_per_s_median": 40}},
        "server_only": {1: {"session_tokens_per_s": 80}, 4: {"session_tokens_per_s": 45},
                        8: {"session_tokens_per_s": 30}},
    }
    assert capacity(results, 50) | {} == {"slo_tokens_per_s_per_session": 50, "sled_sessions": 4,
                                          "server_only_sessions": 1, "ratio": 4.0,
                                          "note": "largest tested N meeting the SLO (tested N only)"}
    assert capacity(results, 100)["ratio"] is None
