"""Turn a bench result into ratios, a capacity figure and a plot."""

from __future__ import annotations

from pathlib import Path

ANCHORS = "anchors (GPU servers): SLED paper 2.2x system throughput and 2.8x capacity, SpecEdge 2.22x server throughput"


def capacity(results: dict, slo: float) -> dict:
    """Largest N whose per-session rate stays at or above ``slo`` tokens/s, SLED against server-only."""
    def largest(rows: dict, key: str) -> int:
        ok = [int(n) for n, row in rows.items() if row[key] >= slo]
        return max(ok, default=0)

    sled = largest(results["sled"], "session_tokens_per_s_median")
    server = largest(results["server_only"], "session_tokens_per_s")
    return {"slo_tokens_per_s_per_session": slo, "sled_sessions": sled, "server_only_sessions": server,
            "ratio": round(sled / server, 2) if server else None,
            "note": "largest tested N meeting the SLO (tested N only)"}


def rows(results: dict):
    for n, sled in results["sled"].items():
        server, nob, ceil = results["server_only"][n], results["no_batching"][n], results["ceiling"][n]
        acc = sum(d["mean_accepted_length"] * d["sessions"] for d in sled["per_draft"].values()) / int(n)
        cost_ratio = server["model_s_per_token"] / sled["verifier_model_s_per_token"]
        cost_ceiling = acc * ceil["forward_ms_n_x_1"] / ceil["forward_ms_n_x_k1"]
        yield n, sled, server, nob, ceil, acc, cost_ratio, cost_ceiling


def print_table(results: dict) -> None:
    print(f"\nSLED bench ({results['profile']}): {results['machine']}")
    print("  N  SLED tok/s  no-batch  server-only  SLED/server  SLED/no-batch  server cost/token: SLED vs server-only "
          "(ceiling)  acc.len  rtt p50/p99 ms  busy  overhead  batch")
    for n, sled, server, nob, _ceil, acc, cost_ratio, cost_ceiling in rows(results):
        print(f"{int(n):>3}  {sled['system_tokens_per_s']:>10.1f}  {nob['system_tokens_per_s']:>8.1f}  "
              f"{server['system_tokens_per_s']:>11.1f}  {sled['system_tokens_per_s'] / server['system_tokens_per_s']:>10.2f}x  "
              f"{sled['system_tokens_per_s'] / nob['system_tokens_per_s']:>12.2f}x  "
              f"{cost_ratio:>28.2f}x less ({cost_ceiling:.2f}x)  {acc:>7.2f}  "
              f"{sled['round_trip_ms_p50']:>6.1f}/{sled['round_trip_ms_p99']:<6.1f}  {sled['verifier_busy_fraction']:>4.2f}  "
              f"{sled['verifier_overhead']:>8.3f}  {sled['mean_batch_size']:>5.2f}")
    transport = results["transport"]
    print(f"MQTT + codec per round, alone (draft k=4 with a 16-entry proposal out, verdict back, both through Mosquitto): "
          f"p50 {transport['sled_messages']['p50_ms']} ms, p99 {transport['sled_messages']['p99_ms']} ms; raw 700-byte "
          f"echo p50 {transport['raw_bytes']['p50_ms']} ms")
    print("\nmodel ceiling (k=4): forward N x 5 tokens vs N x 1, and N separate forwards vs one batched")
    for n, ceil in results["ceiling"].items():
        print(f"{int(n):>3}  N x 5: {ceil['forward_ms_n_x_k1']:>7.2f} ms   N x 1: {ceil['forward_ms_n_x_1']:>7.2f} ms "
              f"(pass cost {ceil['pass_cost_ratio']:.2f}x)   N separate: {ceil['forward_ms_n_separate_k1']:>7.2f} ms "
              f"(raw batching gain {ceil['batching_gain_raw']:.2f}x)")
    cap = results["capacity"]
    print(f"\ncapacity at >= {cap['slo_tokens_per_s_per_session']} tokens/s per session: SLED {cap['sled_sessions']} "
          f"sessions, server-only {cap['server_only_sessions']} ({cap['ratio']}x; {cap['note']})")
    memory = results["memory"]
    print(f"memory: target weights {memory['target_bytes'] / 2**20:.1f} MiB, KV {memory['kv_bytes_per_token']} B/token "
          f"({memory['kv_bytes_per_session'] / 2**20:.2f} MiB per session), verifier peak RSS "
          + ", ".join(f"{k.split('_n')[-1].replace('bytes', '')} sessions: {v / 2**20:.0f} MiB"
                      for k, v in memory.items() if k.startswith("verifier_peak_rss"))
          + "; edge peak RSS per draft: " + ", ".join(f"{d} {v} MiB" for d, v in memory.get("edge_peak_rss_mb", {}).items()))
    for device, sweep in results.get("k_sweep", {}).items():
        fixed = ", ".join(f"k={k}: {v['tokens_per_s']:.0f}" for k, v in sweep.items() if isinstance(k, int) or str(k).isdigit())
        print(f"draft length {device}: {fixed} tok/s; adaptive {sweep['adaptive']['tokens_per_s']:.0f} tok/s "
              f"(mean k {sweep['adaptive']['mean_k']}) = {sweep['adaptive_vs_best_fixed']:.2f} of the best fixed k={sweep['best_fixed_k']}")
    print(f"outputs differing from server-only decoding: {results['sessions_differing_from_server_only']} sessions")
    print(ANCHORS)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in results["sled"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("sled", "SLED"), ("no_batching", "SLED, no batching"), ("server_only", "server-only")):
        left.plot(ns, [results[key][n]["system_tokens_per_s"] for n in results["sled"]], marker="o", label=label)
    left.set(xlabel="sessions N", ylabel="committed tokens/s (system)", xscale="log", title="throughput")
    left.set_xticks(ns, [str(n) for n in ns])
    left.legend()
    for key, label in (("sled", "SLED"), ("no_batching", "SLED, no batching")):
        right.plot(ns, [results[key][n]["round_trip_ms_p50"] for n in results["sled"]], marker="o", label=f"{label} p50")
        right.plot(ns, [results[key][n]["round_trip_ms_p99"] for n in results["sled"]], marker="x", linestyle="--",
                   label=f"{label} p99")
    right.set(xlabel="sessions N", ylabel="round trip ms (draft sent -> verdict)", xscale="log", title="round trip")
    right.set_xticks(ns, [str(n) for n in ns])
    right.legend()
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- the fleet bench's ceiling (issue 22, item 6) ------------------------------------------------------------


def expected_tokens(acceptance: list[float], k: int) -> float:
    """Tokens one round of k drafts commits: 1 + sum_i prod_{j<=i} a_j (a_j per position, the last repeated)."""
    total, survive = 1.0, 1.0
    for j in range(k):
        survive *= acceptance[min(j, len(acceptance) - 1)]
        total += survive
    return total


def ceiling_at(server_s_per_token: float, n: int, t_one_s: float, t_wide_s: float, tau: float) -> float:
    """What the model allows against server-only: the same prefill share, the decode part (T(N x 1) / N a token)
    replaced by ideal batched verification (T(N x (k+1)) / (N x tau) a token)."""
    decode_server = t_one_s / n
    decode_sled = t_wide_s / (n * tau)
    return server_s_per_token / max(1e-12, server_s_per_token - decode_server + decode_sled)


def best_k_ceiling(server_s_per_token: float, n: int, t_one_s: float, t_wide_s: dict[int, float],
                   acceptance: list[float]) -> dict:
    """max over k of the ceiling with tau(k) from the acceptance profile: ``t_wide_s`` maps k to T(N x (k+1))
    timed in the same run as ``t_one_s``. Returns the best k, its ceiling and every k's."""
    per_k = {k: ceiling_at(server_s_per_token, n, t_one_s, t, expected_tokens(acceptance, k))
             for k, t in sorted(t_wide_s.items())}
    best = max(per_k, key=per_k.get)
    return {"best_k": best, "ceiling": per_k[best], "per_k": per_k}
