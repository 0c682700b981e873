"""The bench's arithmetic (capacity against an SLO) on made-up figures: no timing is asserted anywhere."""

from __future__ import annotations

import pytest

from bench.report import best_k_ceiling, capacity, ceiling_at, expected_tokens


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


def test_expected_tokens_per_round_follows_the_acceptance_profile():
    assert expected_tokens([0.8], 0) == 1.0
    assert abs(expected_tokens([0.8], 4) - (1 - 0.8 ** 5) / (1 - 0.8)) < 1e-12   # 3.36: the closed form
    assert abs(expected_tokens([1.0, 0.5], 3) - (1 + 1 + 0.5 + 0.25)) < 1e-12      # the last position repeats


def test_the_ceiling_picks_the_k_the_step_times_favour():
    # Memory bound (a 5-token pass costs what a 1-token step does): the longest draft pays most.
    flat = best_k_ceiling(0.01, 1, 0.01, {1: 0.01, 2: 0.01, 4: 0.01}, [0.8])
    assert flat["best_k"] == 4 and abs(flat["ceiling"] - expected_tokens([0.8], 4)) < 1e-9
    # Compute bound (each scored token costs a full step): every k loses; k=1 loses least, below 1x.
    linear = best_k_ceiling(0.01, 64, 0.64, {k: 0.64 * (k + 1) for k in (1, 2, 4)}, [0.8])
    assert linear["best_k"] == 1 and linear["ceiling"] < 1.0
    # Prefill dilutes the gain: half of server-only's cost is prefill, so a 2x decode gain is 1.33x overall.
    assert abs(ceiling_at(0.02, 1, 0.01, 0.01, 2.0) - 0.02 / (0.02 - 0.01 + 0.005)) < 1e-12


def test_the_acceptance_profile_comes_from_a_number_a_list_or_what_distill_reports(tmp_path):
    from bench.fleet_target import acceptance_profile

    assert acceptance_profile("0.8", k_max=3) == [0.8, 0.8, 0.8]
    assert acceptance_profile("0.9,0.7", k_max=4) == [0.9, 0.7, 0.7, 0.7]
    report = tmp_path / "distill.json"
    report.write_text('{"acceptance_per_position": [0.85, 0.8, 0.75], "other": 1}')
    assert acceptance_profile(str(report), k_max=4) == [0.85, 0.8, 0.75, 0.75]
    report.write_text('{"alpha": 0.6}')
    assert acceptance_profile(str(report), k_max=2) == [0.6, 0.6]
    report.write_text('{"k": 4, "drafts": {"large": {"mimics": 12, "large": {"alpha": 0.71}, "large-int8": {"alpha": 0.69}},'
                      ' "small": {"small": {"alpha": 0.5}}}}')
    assert acceptance_profile(str(report), k_max=2) == [0.71, 0.71]
    report.write_text('{"nothing": 1}')
    with pytest.raises(SystemExit):
        acceptance_profile(str(report))
    for bad in ("1.5", "", "0.8,-0.1"):
        with pytest.raises(SystemExit):
            acceptance_profile(bad)


def test_the_llamacpp_stage_dequantizes_a_gguf_to_f32_keeping_layout_and_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from bench.llamacpp import f32_gguf

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)   # numpy order [rows, columns]
    quantized = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    source = tmp_path / "tiny.Q8_0.gguf"
    writer = gguf.GGUFWriter(source, arch="llama")
    writer.add_block_count(1)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_token_list(["<a>", "<b>"])
    writer.add_tensor("blk.0.ffn_up.weight", quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = gguf.GGUFReader(f32_gguf(source, tmp_path / "tiny.F32.gguf"))
    tensors = {t.name: t for t in out.tensors}
    assert {t.tensor_type for t in out.tensors} == {gguf.GGMLQuantizationType.F32}
    expected = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_up.weight"].data).reshape(8, 64), expected)
    assert not np.array_equal(expected, weight)  # Q8_0 loses bits: the F32 file holds the quantized model's values
    assert out.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert out.fields["tokenizer.ggml.tokens"].contents() == ["<a>", "<b>"]
    assert out.fields["llama.block_count"].contents() == 1


def test_timed_reports_its_statistic_of_its_clock():
    """The benches' one timing helper: an untimed warm-up call, then ``repeat`` calls on the given clock."""
    from sled_models.timing import timed

    ticks, calls, synced = iter(range(0, 100, 2)), [], []
    samples = timed(lambda: calls.append(1), repeat=3, clock=lambda: next(ticks), statistic=list,
                    sync=lambda: synced.append(1))
    assert samples == [2, 2, 2] and len(calls) == 4 and len(synced) == 4
    assert timed(lambda: None, repeat=3, warm_up=False, clock=iter([0, 1, 1, 4, 4, 6]).__next__, statistic=min) == 1


def test_fleet_capacity_per_device_class():
    """Each class's own p10 in the mixed fleet decides its capacity; server-only serves every class alike."""
    from bench.fleet import capacity as fleet_capacity, per_class_rates

    sessions = [{"klass": "fast", "tokens": 60, "seconds": 3.0, "rounds": 20, "verifier_s": 1.0},
                {"klass": "slow", "tokens": 60, "seconds": 10.0, "rounds": 20, "verifier_s": 2.0}]
    assert per_class_rates(sessions) == {
        "fast": {"p50": 20.0, "p10": 20.0, "sessions": 1, "verifier_ms_per_round": 50.0},
        "slow": {"p50": 6.0, "p10": 6.0, "sessions": 1, "verifier_ms_per_round": 100.0}}
    rows = [{"n": 8, "session_tokens_per_s_p10": 12.0, "server_only_session_tokens_per_s": 30.0,
             "ceiling_best_k": 1.2, "session_tokens_per_s_by_class": {"fast": {"p10": 25.0}, "slow": {"p10": 12.0}}},
            {"n": 16, "session_tokens_per_s_p10": 6.0, "server_only_session_tokens_per_s": 9.0,
             "ceiling_best_k": 1.05, "session_tokens_per_s_by_class": {"fast": {"p10": 14.0}, "slow": {"p10": 6.0}}}]
    # ceiling_sessions: what the model allows SLED (server-only's rate x the best-k ceiling): 9.45 tokens/s at N = 16
    # meets 5, not 10; a ceiling barely above 1 at the loaded N leaves SLED no capacity beyond server-only's.
    assert fleet_capacity(rows, [5, 10]) == [
        {"slo_tokens_per_s": 5, "sled_sessions": 16, "server_only_sessions": 16,
         "sled_sessions_by_class": {"fast": 16, "slow": 16}, "ceiling_sessions": 16},
        {"slo_tokens_per_s": 10, "sled_sessions": 8, "server_only_sessions": 8,
         "sled_sessions_by_class": {"fast": 16, "slow": 8}, "ceiling_sessions": 8}]
