"""The fleet bench: an emulated fleet through the real broker and the real ``sled-verifier``, against the
server decoding for the same sessions itself, as a fraction of what the model allows.

For each N: a real Mosquitto (the project's dev config), one ``sled-verifier`` process with default flags but
its context limit (``context_flags``) pinned to one core with one torch thread, and N emulated devices (``bench/fleet_devices.py``, one process
on the other cores, each device its own MQTT client) whose drafting costs the server nothing. Measured:

- server cost per committed token: the verifier process's CPU seconds (user + system, every thread: model,
  MQTT, codec, bookkeeping) in a steady window, divided by the tokens committed in it. Sessions arrive
  over a ramp, each device starting its next session when its last ends; the window opens after a warm-up
  of one session lifetime (so sessions are staggered and the window holds the steady mix of prefill and
  decoding) and lasts 1.5 lifetimes (a lifetime: the mean output at server-only's per-session pace);
- server-only: the same target, same thread and core, decoding the same kind of sessions (prompt prefill
  plus one token per step for every session in one batch); the strongest of transformers' batched
  ``generate`` and the verifier's own engine (slot cache, one token per row) on the plain kernels and on the
  verifier's own forward (``verifier``: the native kernels, which a server-only deployment would run too),
  named in the table;
- ceiling: what the model allows, tau x T(N x 1) / T(N x (k+1)) on the decode part, with tau the accepted
  length the fleet reached, measured here in the same run; and the same at the mean batch B the fleet
  reached (T(B x (k+1)) in place of T(N x (k+1))), which separates what scheduling lost (B < N, as with
  devices of very different speeds) from what the step lost;
- the conditions each side is timed under (``TIMING_CONDITIONS``): server-only and the ceiling's step times run
  back to back, hot, while the verifier idles between rounds by design; each row says the fleet's mean idle gap
  between steps and what a pass at the fleet's batch costs after that gap against back to back (issue 22,
  item 8; ``bench/idle.py``), so a ceiling the service cannot reach for a cooled core shows as such;
- per-session tokens/s p50 and p10, queue delay p50/p99 (verifier histogram), mean batch, capacity at an
  SLO for both, and where the verifier's time went.

Without a built family (``make models``) the target is a random-initialised model of the family's target
shape (6 x 384 Llama, vocabulary 4096): its cost is the same; acceptance then comes from ``--alpha``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import best_k_ceiling, ceiling_at  # noqa: E402
from bench.run import DEVICE_CORES, SERVER_CORES, Verifier, log, pinned  # noqa: E402
from sled_models.timing import timed  # noqa: E402
from sled_protocol.devbroker import start_dev_broker  # noqa: E402

PROFILES = {
    "quick": {"ns": [1, 4, 16, 64], "duration_s": 6.0, "ramp_s": 1.5, "pool": 48, "repeats": 1},
    "full": {"ns": [1, 4, 16, 64, 128, 256], "duration_s": 12.0, "ramp_s": 3.0, "pool": 96, "repeats": 1},
}
KS = {"quick": [1, 2, 3, 4, 6], "full": [1, 2, 3, 4, 5, 6, 8]}  # draft lengths the best-k ceiling is timed at
PROMPT_TOKENS = (24, 96)    # each session's prompt length, uniform
OUTPUT_TOKENS = (32, 96)    # each session's output length, uniform
RTT_MS = (2.0, 30.0)        # network round trip, uniform per message pair
# The verifier's context limit: the fleet's longest session (prompt, output, a draft past it), rounded up to
# attention's 64-key block. Server-only holds N sessions of their own lengths; at the default (4096) the KV budget
# reserves 4096 positions a session, and SmolLM2's held 52 sessions on a 20 GB machine: at N = 64 and 128 the
# rest of the fleet was refused as overloaded (881 and 9,698 refusals in a window), re-sent new sessions, and the
# verifier served about 26 drafts a step where server-only decoded N rows.
SESSION_CONTEXT = -(-(PROMPT_TOKENS[1] + OUTPUT_TOKENS[1] + 9) // 64) * 64
K = 4
# Device classes: the family's drafts (timings of this machine's x86 core stand in for the boards) and a
# real 0.5B draft (Qwen2.5-0.5B class) on a Raspberry Pi 5 at tens of ms per token.
CLASSES = [
    {"name": "jetson-orin", "draft": "jetson-orin", "draft_ms_per_token": 1.0},
    {"name": "rpi5", "draft": "rpi5", "draft_ms_per_token": 2.0},
    {"name": "rpi5-0.5b", "draft": None, "draft_ms_per_token": 40.0},
]
TIMING_CONDITIONS = {  # printed and stored with every result (issue 22, item 8)
    "sled": "the verifier's process CPU over the fleet's steady window: its steps with the idle gaps between rounds",
    "server_only": "back to back: prefill, then every decode step at once after the last (a server-only server runs "
                   "hot), process CPU, fastest of its runs, while the verifier idles",
    "ceiling": "T(N x 1) and T(N x (k+1)) back to back, interleaved, process CPU, median of pairs",
    "after_gap": "CPU of a B x (k+1) pass (B: the fleet's mean batch) after the fleet's mean idle gap between steps, "
                 "over the same pass back to back (medians, interleaved)",
}


def context_flags(flags: list[str]) -> list[str]:
    """The verifier's context limit sized to the fleet's sessions (``SESSION_CONTEXT``), unless ``flags`` set one."""
    if any(flag.split("=")[0] == "--max-context-tokens" for flag in flags):
        return []
    return ["--max-context-tokens", str(SESSION_CONTEXT)]


def quick_shape_target(out: Path) -> Path:
    """A random-initialised Llama of the family's target shape (seconds to build; cached)."""
    if (out / "config.json").is_file():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    from sled_models.recipe import TARGET
    from sled_models.tiny import build_tokenizer

    tokenizer = build_tokenizer(out, vocab_size=4096)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TARGET.hidden, intermediate_size=TARGET.intermediate,
                         num_hidden_layers=TARGET.layers, num_attention_heads=TARGET.heads,
                         num_key_value_heads=TARGET.heads, max_position_embeddings=1024, initializer_range=0.2,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(out)
    return out


def make_pool(target_dir: Path, size: int, cont_tokens: int, held_out: np.ndarray | None, cache: Path) -> list[dict]:
    """``size`` prompts of varied length and the target's own greedy continuation of each, one at a time
    (unbatched, transformers ``generate``)."""
    key = f"{target_dir.resolve()}:{(target_dir / 'config.json').stat().st_mtime_ns}:{size}:{PROMPT_TOKENS}:{cont_tokens}"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            return stored["pool"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, local_files_only=True).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    rng = np.random.default_rng(7)
    pool = []
    for i in range(size):
        prompt_len = int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1))
        if held_out is not None:
            start = int(rng.integers(0, len(held_out) - prompt_len))
            prompt = held_out[start : start + prompt_len].astype(int).tolist()
        else:
            prompt = rng.integers(1, model.config.vocab_size, prompt_len).tolist()
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cont_tokens,
                                 min_new_tokens=cont_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
        continuation = out[0, prompt_len:].tolist()
        cut = next((j for j, t in enumerate(continuation) if t in eos_ids), len(continuation))
        if cut >= OUTPUT_TOKENS[0] + 1:
            pool.append({"prompt": prompt, "continuation": continuation[:cut]})
        log(f"pool: {i + 1}/{size} continuations") if (i + 1) % 16 == 0 else None
    cache.write_text(json.dumps({"key": key, "pool": pool}))
    return pool


def cpu_clock() -> float:
    """This process's CPU seconds: the baselines run on one torch thread, so this is their work, and time spent
    descheduled on a shared machine is not counted (the verifier's cost is its CPU seconds too: like with like)."""
    return time.process_time()


def server_only(target, pool: list[dict], n: int, out_tokens: int, verifying=None) -> dict:
    """Seconds per token for N sessions decoded in one batch: prefill, then one token per session per step.
    Every way; the strongest is the baseline: the verifier's engine on the plain kernels (``target``), the same
    engine on the verifier's own forward (``verifying``: its native kernels are the fastest this CPU has at a
    few rows, and a server-only deployment would run them too), and transformers' batched ``generate``."""
    prompts = [pool[i % len(pool)]["prompt"] for i in range(n)]  # the fleet's prompts, ragged
    lens = [len(p) for p in prompts]

    def engine(runtime):  # the verifier's own engine path: slot KV, ragged prefill in one forward, then N x 1
        kv = runtime.init_kv(max_slots=n, max_length=max(lens) + out_tokens + 8)
        slots = [kv.acquire() for _ in range(n)]

        def decode() -> None:
            # As the verifier prefills: every prompt token but the last without logits (the vocabulary head at
            # every prompt position is ~20% of a SmolLM2 prefill that nobody reads), then the last one as the
            # first row of the first N x 1 step.
            prefill()
            tokens = [p[-1] for p in prompts]
            for step in range(out_tokens):  # logits read as the verifier's engine reads them
                logits = runtime.forward_rows(slots, [length - 1 + step for length in lens], [[t] for t in tokens],
                                              packed_logits=runtime.packs_rows)
                tokens = logits.argmax(dim=-1)[:, 0].tolist()

        def prefill() -> None:
            runtime.forward_rows(slots, [0] * n, [p[:-1] for p in prompts], logits=False)

        return decode, prefill

    # transformers generate, batched, prompts left-padded.
    pad = target.model.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (max(lens) - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (max(lens) - len(p)) + [1] * len(p) for p in prompts])

    def generate() -> None:
        with torch.inference_mode():
            target.model.generate(ids, attention_mask=mask, max_new_tokens=out_tokens, min_new_tokens=out_tokens,
                                  do_sample=False, pad_token_id=pad)

    large = target.vocab_size >= 10_000  # a real target: its long decodes need no whole-run warm-up or repeat
    repeat = 1 if n >= 64 or large else 2
    warm_up = not large and n < 16
    # The fastest of the runs, in CPU seconds: the least disturbed by whatever else the machine does.
    ways = {"engine": engine(target)[0], "generate": generate}
    if verifying is not None:
        ways["verifier"] = engine(verifying)[0]
    prefill_s = timed(engine(target)[1], repeat=repeat, clock=cpu_clock, statistic=min)  # ... as this one warms
    seconds = {name: timed(fn, repeat=repeat, warm_up=warm_up, clock=cpu_clock, statistic=min)  # its weights first
               for name, fn in ways.items()}
    name = min(seconds, key=seconds.get)
    tokens = n * out_tokens
    return {"s_per_token": seconds[name] / tokens, "which": name,
            **{f"{way}_s_per_token": s / tokens for way, s in seconds.items()},
            "prefill_s_per_token": prefill_s / tokens, "session_tokens_per_s": out_tokens / seconds[name]}


def step_times(plain, verifying, n: int, ks: list[int], context: int) -> dict:
    """T(N x 1) of server-only's forward (the faster of ``plain`` and ``verifying`` at N x 1, as server-only takes
    the stronger) and T(N x (k+1)) of the verifier's (``verifying``) for every k in ``ks`` at ``context``, in CPU
    seconds: the ceiling compares what each side would really run. All widths are timed in
    alternation (1, k1+1, 1, k2+1, ...) and each pass-cost ratio is the median of its back-to-back pairs with the
    1-token step, so the machine's drift (up to 50% between runs here, more on a shared machine) cancels in the
    ratios the ceiling depends on."""
    one_kv = plain.init_kv(max_slots=n, max_length=context + 1 + 8)
    plain_slots = [one_kv.acquire() for _ in range(n)]
    wide_kv = verifying.init_kv(max_slots=2 * n, max_length=context + max(ks) + 1 + 8)
    wide_slots = [wide_kv.acquire() for _ in range(n)]
    own_slots = [wide_kv.acquire() for _ in range(n)]  # its N x 1 steps apart from the wide passes' positions
    rng = np.random.default_rng(0)
    prefix = [rng.integers(1, min(1000, plain.vocab_size), context).tolist() for _ in range(n)]
    for runtime, slots in ((plain, plain_slots), (verifying, wide_slots), (verifying, own_slots)):
        runtime.forward_rows(slots, [0] * n, prefix, logits=False)

    def one_by(runtime, slots) -> None:  # logits as the engine takes them (no padded copy where rows pack)
        runtime.forward_rows(slots, [context] * n, [[1]] * n, packed_logits=runtime.packs_rows)

    fastest = min(((plain, plain_slots), (verifying, own_slots)),
                  key=lambda pair: timed(lambda: one_by(*pair), repeat=3, clock=cpu_clock, statistic=min))

    def one() -> None:
        one_by(*fastest)

    def wide(k: int) -> None:
        verifying.forward_rows(wide_slots, [context] * n, [[1] * (k + 1)] * n, packed_logits=verifying.packs_rows)

    one()
    for k in ks:  # warm-up
        wide(k)
    ones, ratios = [], {k: [] for k in ks}
    for _ in range(5 if n >= 64 else 9):
        for k in ks:
            started = cpu_clock()
            one()
            middle = cpu_clock()
            wide(k)
            ended = cpu_clock()
            ones.append(middle - started)
            ratios[k].append((ended - middle) / (middle - started))
    t1 = float(np.median(ones))
    return {"t_n_x_1_s": t1, "t_n_x_k1_s": {k: t1 * float(np.median(r)) for k, r in ratios.items()}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def histogram_quantile(metrics: dict, name: str, q: float) -> float | None:
    buckets = sorted(((float(k.split("le=")[1].rstrip("}")), v) for k, v in metrics.items()
                      if k.startswith(f"{name}_bucket")), key=lambda b: b[0])
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= q * total:
            if bound == float("inf"):
                return previous_bound
            share = (q * total - previous_count) / max(1e-9, count - previous_count)
            return previous_bound + share * (bound - previous_bound)
        previous_bound, previous_count = bound, count
    return previous_bound


def after_gap(verifying, fleet: dict, batch: int, width: int, context: int) -> dict:
    """The fleet's mean idle gap between steps, and the CPU of a ``batch`` x ``width`` pass after it over the same
    pass back to back (``bench/idle.py``): how much colder the service's passes run than the ceiling's."""
    from bench.idle import cpu_after_gap, idle_gap_s

    gap_s = idle_gap_s(fleet["metrics"], fleet["window_s"])
    factor = cpu_after_gap(verifying, batch, width, context, gap_s, samples=5 if batch >= 32 else 9)
    return {"idle_gap_ms": round(1000 * gap_s, 2), "pass_cpu_after_gap": round(factor, 3)}


def run_fleet(url: str, verifier: Verifier, workdir: Path, spec: dict) -> dict:
    """One fleet run: the verifier's CPU and metrics at the edges of the steady window (CLOCK_MONOTONIC is
    system-wide, so both processes mean the same instants)."""
    spec = {**spec, "t0": time.monotonic() + 2.0 + spec["n"] / 100}
    spec_path = workdir / f"fleet-{spec['n']}.json"
    spec_path.write_text(json.dumps(spec))
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fleet_devices.py"), "--spec", str(spec_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               preexec_fn=pinned(DEVICE_CORES))
    opens = spec["t0"] + spec["ramp_s"] + spec["warmup_s"]
    time.sleep(max(0.0, opens - time.monotonic()))
    cpu_before, metrics_before, started = cpu_seconds(verifier.process.pid), verifier.metrics(), time.monotonic()
    time.sleep(max(0.0, opens + spec["duration_s"] - time.monotonic()))
    cpu_after, metrics_after, ended = cpu_seconds(verifier.process.pid), verifier.metrics(), time.monotonic()
    out, err = process.communicate(timeout=900)
    if process.returncode != 0:
        raise RuntimeError(f"fleet of {spec['n']} failed:\n{err[-3000:]}")
    report = json.loads(out)
    delta = {key: metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0) for key in metrics_after}
    report["cpu_s"] = cpu_after - cpu_before
    report["window_s"] = ended - started
    report["metrics"] = delta
    return report


def summarise(n: int, fleet: dict, server: dict, steps: dict, at_batch: dict, acceptance: list[float], k: int) -> dict:
    m = fleet["metrics"]
    committed = fleet["committed"]
    rates = sorted(s["tokens"] / s["seconds"] for s in fleet["sessions"] if s["seconds"] > 0)
    rounds = sum(s["rounds"] for s in fleet["sessions"])
    tau = sum(s["tokens"] for s in fleet["sessions"]) / max(1, rounds)      # tokens committed per round
    if not rounds:  # no session ended inside the window (a slow, shared machine): every round of the run
        tau = fleet["committed_all"] / max(1, fleet.get("rounds_all", 0))
    sled_s = fleet["cpu_s"] / max(1, committed)
    ratio = server["s_per_token"] / sled_s
    # The model's ceiling at the fleet's k and measured tau: the same prefill share, the decode part replaced by
    # ideal batched verification; and the best over k with tau(k) from the acceptance profile (item 6).
    ceiling = ceiling_at(server["s_per_token"], n, steps["t_n_x_1_s"], steps["t_n_x_k1_s"][k], tau)
    best = best_k_ceiling(server["s_per_token"], n, steps["t_n_x_1_s"], steps["t_n_x_k1_s"], acceptance)
    batches = m.get("sled_verifier_batch_size_count", 0.0)
    mean_batch = m.get("sled_verifier_batch_size_sum", 0.0) / max(1.0, batches)
    decode_server = steps["t_n_x_1_s"] / n
    decode_at_batch = at_batch["t_n_x_k1_s"][k] / (at_batch["n"] * tau)
    ceiling_at_batch = server["s_per_token"] / (server["s_per_token"] - decode_server + decode_at_batch)
    window_s = fleet["window_s"]
    parts = {name: m.get(f"sled_verifier_{name}_seconds_total", m.get(f"sled_verifier_{name}_seconds_sum", 0.0))
             for name in ("forward", "prefill", "decide", "step", "receive", "publish", "schedule")}
    breakdown = {
        "verify_forward": parts["forward"],
        "prefill_forward": parts["prefill"],
        "batch_assembly_and_kv": max(0.0, parts["step"] - parts["forward"] - parts["prefill"] - parts["decide"]),
        "verification_and_commit": parts["decide"],
    }
    if "sled_verifier_loop_cpu_seconds_total" in m:  # the event loop's own CPU clock: MQTT, codec, scheduling
        breakdown["event_loop_cpu"] = m["sled_verifier_loop_cpu_seconds_total"]
    else:  # a verifier without it: the wall time of its receive, publish and schedule work
        breakdown.update(mqtt_and_codec=parts["receive"] + parts["publish"], scheduling=parts["schedule"])
    breakdown["other_cpu"] = max(0.0, fleet["cpu_s"] - sum(breakdown.values()))
    breakdown["idle"] = max(0.0, window_s - fleet["cpu_s"])
    return {
        "n": n, "committed_tokens": committed, "window_s": round(window_s, 2),
        "sled_ms_per_token": round(1000 * sled_s, 4), "server_only_ms_per_token": round(1000 * server["s_per_token"], 4),
        "server_only_which": server["which"], "ratio": round(ratio, 3), "ceiling": round(ceiling, 3),
        "fraction_of_ceiling": round(ratio / ceiling, 3), "tau": round(tau, 3),
        "k_mean": round(sum(s["drafted"] for s in fleet["sessions"]) / max(1, rounds), 2),
        "k0_share": round(sum(s.get("k0_rounds", 0) for s in fleet["sessions"]) / max(1, rounds), 3),
        "best_k": best["best_k"], "ceiling_best_k": round(best["ceiling"], 3),
        "fraction_of_best_k_ceiling": round(ratio / best["ceiling"], 3),
        "announced_price": fleet.get("announced_price"),
        "ceiling_per_k": {str(kk): round(v, 3) for kk, v in best["per_k"].items()},
        "ceiling_at_batch": round(ceiling_at_batch, 3), "fraction_at_batch": round(ratio / ceiling_at_batch, 3),
        "mean_batch": round(mean_batch, 2),
        "session_tokens_per_s_p50": round(rates[len(rates) // 2], 1) if rates else None,
        "session_tokens_per_s_p10": round(rates[len(rates) // 10], 1) if rates else None,
        "session_tokens_per_s_by_class": per_class_rates(fleet["sessions"]),
        "server_only_session_tokens_per_s": round(server["session_tokens_per_s"], 1),
        "queue_delay_ms_p50": _ms(histogram_quantile(m, "sled_verifier_queue_delay_seconds", 0.5)),
        "queue_delay_ms_p99": _ms(histogram_quantile(m, "sled_verifier_queue_delay_seconds", 0.99)),
        "added_wait_ms_p50": _ms(histogram_quantile(m, "sled_verifier_added_wait_seconds", 0.5)),
        "added_wait_ms_p99": _ms(histogram_quantile(m, "sled_verifier_added_wait_seconds", 0.99)),
        "verifier_cpu_fraction": round(fleet["cpu_s"] / window_s, 3),
        "breakdown_s": {k: round(v, 3) for k, v in breakdown.items()},
        "wrong": len(fleet["wrong"]), "wrong_examples": fleet["wrong"][:3], "errors": fleet["errors"],
        "prefill_tokens": int(m.get("sled_verifier_prefill_tokens_total", 0)),
        "deferred": int(m.get("sled_verifier_deferred_drafts_total", 0)), "resyncs": fleet["resyncs"], "retries": fleet["retries"], "sessions": len(fleet["sessions"]),
        "server_only": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in server.items()},
        "steps_ms": {"n_x_1": round(1000 * steps["t_n_x_1_s"], 3),
                     **{f"n_x_{kk + 1}": round(1000 * v, 3) for kk, v in steps["t_n_x_k1_s"].items()}},
    }


def per_class_rates(sessions: list[dict]) -> dict:
    """Per device class: p50 and p10 of its sessions' tokens/s (capacity per class, issue 22 item 5), and the mean
    time a round spent between its draft's publication and its verdict (the verifier's queue and step)."""
    out = {}
    for klass in sorted({s["klass"] for s in sessions}):
        mine = [s for s in sessions if s["klass"] == klass and s["seconds"] > 0]
        rates = sorted(s["tokens"] / s["seconds"] for s in mine)
        if rates:
            rounds = sum(s["rounds"] for s in mine)
            out[klass] = {"p50": round(rates[len(rates) // 2], 2), "p10": round(rates[len(rates) // 10], 2),
                          "sessions": len(rates),
                          "verifier_ms_per_round": round(1000 * sum(s.get("verifier_s", 0.0) for s in mine) / max(1, rounds), 1)}
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def capacity(rows: list[dict], slos: list[float]) -> list[dict]:
    """Per SLO: the largest tested N whose p10 per-session rate meets it, mixed and per device class for SLED (each
    class's own p10 in the mixed fleet); server-only decodes every session alike, whatever drafts on its device.

    ``ceiling_sessions`` is what the model allows SLED at all: the largest tested N where server-only's per-session
    rate times the best-k ceiling (SLED's server throughput at its best, every device drafting instantly) meets the
    SLO. Where that is no more than server-only's own, no scheduling can lift SLED's capacity above it: at the
    sessions a saturated core serves at a few tokens/s each the step is compute-bound, and a verified token costs
    what a decoded one does."""
    out = []
    classes = sorted({klass for r in rows for klass in r.get("session_tokens_per_s_by_class", {})})
    for slo in slos:
        sled = max((r["n"] for r in rows if (r["session_tokens_per_s_p10"] or 0) >= slo), default=0)
        server = max((r["n"] for r in rows if r["server_only_session_tokens_per_s"] >= slo), default=0)
        by_class = {klass: max((r["n"] for r in rows
                                if r.get("session_tokens_per_s_by_class", {}).get(klass, {}).get("p10", 0) >= slo), default=0)
                    for klass in classes}
        ceiling = max((r["n"] for r in rows
                       if r["ceiling_best_k"] * r["server_only_session_tokens_per_s"] >= slo), default=0)
        out.append({"slo_tokens_per_s": slo, "sled_sessions": sled, "server_only_sessions": server,
                    "sled_sessions_by_class": by_class, "ceiling_sessions": ceiling})
    return out


def print_table(result: dict) -> None:
    print(f"\nSLED fleet bench ({result['profile']}): {result['target']}; {result['machine']}")
    print(f"devices: {', '.join(c['name'] + ' ' + str(c['draft_ms_per_token']) + ' ms/token alpha ' + str(round(c['acceptance'][0], 2)) for c in result['classes'])}; "
          f"k={result['k'] if result.get('k_mode', 'fixed') == 'fixed' else result['k_mode'] + ' (up to 8)'}; round trip {RTT_MS[0]:g}-{RTT_MS[1]:g} ms; prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]}, outputs "
          f"{OUTPUT_TOKENS[0]}-{OUTPUT_TOKENS[1]} tokens; verifier flags: {' '.join(result['verifier_flags']) or 'defaults'}")
    print(f"ceiling: at the fleet's k={result['k']} and measured tau; best k: max over k of tau(k) x T(N x 1) / T(N x (k+1)) "
          f"with tau(k) from acceptance {[round(a, 2) for a in result['acceptance'][:4]]}, step times interleaved in this run")
    print("    N  SLED ms/tok  server-only ms/tok (which)  ratio  ceiling  fraction  (at batch)  best-k ceiling  fraction"
          "   tau  k mean (k=0)  batch  tok/s/session p50/p10 (server-only)  queue ms p50/p99  added wait p50/p99  cpu   wrong")
    for r in result["rows"]:
        print(f"  {r['n']:>3}  {r['sled_ms_per_token']:>11.3f}  {r['server_only_ms_per_token']:>11.3f} ({r['server_only_which']:>8})  "
              f"{r['ratio']:>5.2f}x  {r['ceiling']:>6.2f}x  {r['fraction_of_ceiling']:>7.0%}  ({r['fraction_at_batch']:>7.0%})  "
              f"{r['ceiling_best_k']:>6.2f}x (k={r['best_k']})  {r['fraction_of_best_k_ceiling']:>7.0%}  {r['tau']:>4.2f}  "
              f"{r['k_mean']:>6.2f} ({r['k0_share']:>4.0%})  "
              f"{r['mean_batch']:>5.1f}  {str(r['session_tokens_per_s_p50']):>8}/{str(r['session_tokens_per_s_p10']):<8} "
              f"({r['server_only_session_tokens_per_s']:>6})  {str(r['queue_delay_ms_p50']):>6}/{str(r['queue_delay_ms_p99']):<7} "
              f"{str(r['added_wait_ms_p50']):>6}/{str(r['added_wait_ms_p99']):<7}  "
              f"{r['verifier_cpu_fraction']:>4.2f}  {r['wrong']:>5}")
    print("\nstep times (ms, interleaved; N x 1 on server-only's faster forward, N x (k+1) on the verifier's) and the ceiling per k:")
    for r in result["rows"]:
        print(f"  {r['n']:>3}  " + "  ".join(f"{k} {v:.1f}" for k, v in r["steps_ms"].items()) + "   ceiling "
              + "  ".join(f"k={k} {v:.2f}x" for k, v in r["ceiling_per_k"].items()))
    print("\ntimed under: " + "; ".join(f"{side}: {how}" for side, how in result.get("timing_conditions", {}).items()))
    print("the verifier's mean idle gap between steps, and a pass at its mean batch after that gap (x back to back): "
          + "  ".join(f"N={r['n']} {r['idle_gap_ms']:.1f} ms {r['pass_cpu_after_gap']:.2f}x"
                      for r in result["rows"] if "idle_gap_ms" in r))
    print("\nper-session tokens/s by device class, p50/p10 (sessions), and ms a round waited on the verifier (publish to verdict):")
    for r in result["rows"]:
        print(f"  {r['n']:>3}  " + "  ".join(f"{k} {v['p50']}/{v['p10']} ({v['sessions']}) {v.get('verifier_ms_per_round', '-')} ms"
                                         for k, v in r.get("session_tokens_per_s_by_class", {}).items()))
    print("\nwhere the verifier's time went (seconds over the run):")
    for r in result["rows"]:
        print(f"  {r['n']:>3}  " + "  ".join(f"{k} {v:.2f}" for k, v in r["breakdown_s"].items()))
    print("\ncapacity (largest tested N whose p10 per-session rate meets the SLO; p10 is the slowest device class, "
          "whose own drafting caps its rate): " + "; ".join(
              f">= {c['slo_tokens_per_s']:g} tok/s: SLED {c['sled_sessions']} ("
              + ", ".join(f"{klass} {n}" for klass, n in c.get("sled_sessions_by_class", {}).items())
              + f"), server-only {c['server_only_sessions']}, the best-k ceiling allows SLED {c.get('ceiling_sessions', '-')}"
              for c in result["capacity"]))
    print(f"verdicts differing from the target's own continuation: {sum(r['wrong'] for r in result['rows'])}")


def chosen_classes(names: str) -> list[dict]:
    """The device classes named (comma-separated; empty: all, the mixed fleet), devices dealt round robin."""
    if not names:
        return CLASSES
    known = {c["name"]: c for c in CLASSES}
    unknown = [name for name in names.split(",") if name not in known]
    if unknown:
        raise SystemExit(f"unknown device class {unknown}; known: {sorted(known)}")
    return [known[name] for name in names.split(",")]


def prepare(args, profile: dict, workdir: Path):
    """The target's directory, the device classes, the acceptance profile the ceiling assumes, and a function of
    the verifying runtime returning the pool of prompts with the target's own continuations."""
    from bench.fleet_target import acceptance_profile, engine_pool, smollm2_dir

    if args.target == "smollm2":

        target_dir = smollm2_dir(args.smollm2_dir)
        acceptance = acceptance_profile(args.acceptance or str(args.alpha))
        classes = [{"name": c["name"], "draft_ms_per_token": c["draft_ms_per_token"], "acceptance": acceptance[: args.k],
                    "k": args.k} for c in chosen_classes(args.classes)]
        cache = workdir / f"pool-smollm2-{args.profile}-{args.dtype}.json"
        return target_dir, classes, acceptance, lambda verifying: engine_pool(
            verifying, target_dir, profile["pool"], PROMPT_TOKENS, OUTPUT_TOKENS[1] + 1, OUTPUT_TOKENS[0] + 1, cache, log)
    evals, held_out = {}, None
    if (args.family / "manifest.json").is_file():
        target_dir = args.family / "target"
        held_out = np.load(args.family / "tokens_held_out.npy")
        if (args.family / "eval.json").is_file():
            evals = json.loads((args.family / "eval.json").read_text())
    else:
        log(f"no model family at {args.family}: a random-initialised target of its shape, acceptance {args.alpha}")
        target_dir = quick_shape_target(workdir / "quick-shape-target")
    classes = []
    for c in chosen_classes(args.classes):
        measured = evals.get(c["draft"], {}) if c["draft"] else {}
        alpha = measured.get("alpha_continuations", args.alpha)
        classes.append({"name": c["name"], "draft_ms_per_token": measured.get("draft_ms_per_token", c["draft_ms_per_token"]),
                        "acceptance": [alpha] * args.k, "k": args.k})
    # The ceiling assumes the fleet's mean profile (each class an equal share of the devices).
    acceptance = [sum(c["acceptance"][0] for c in classes) / len(classes)]
    if args.dtype != "float32":  # the continuations must be the verifier's own, in its dtype
        cache = workdir / f"pool-family-{args.profile}-{args.dtype}.json"
        return target_dir, classes, acceptance, lambda verifying: engine_pool(
            verifying, target_dir, profile["pool"], PROMPT_TOKENS, OUTPUT_TOKENS[1] + 1, OUTPUT_TOKENS[0] + 1, cache, log)
    return target_dir, classes, acceptance, lambda verifying: make_pool(
        target_dir, profile["pool"], OUTPUT_TOKENS[1] + 1, held_out, workdir / f"pool-{args.profile}.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--ns", default="", help="comma-separated fleet sizes [default: the profile's]")
    parser.add_argument("--family", type=Path, default=ROOT / "models" / "build" / "family-quick")
    parser.add_argument("--target", choices=("family", "smollm2"), default="family",
                        help="family: the 12M family target (or its shape); smollm2: the real SmolLM2-135M-Instruct, float32")
    parser.add_argument("--smollm2-dir", type=Path, default=None, help="the real target's float32 directory [default: fetched]")
    parser.add_argument("--alpha", type=float, default=0.8, help="per-position acceptance without a family eval.json")
    parser.add_argument("--acceptance", default="",
                        help="the real target's draft acceptance per position: a number, a comma list, or the JSON "
                             "`sled-models distill` reports [default: --alpha]")
    parser.add_argument("--k", type=int, default=K, help="draft tokens per round of every emulated device")
    parser.add_argument("--k-mode", choices=("fixed", "adaptive", "priced"), default="fixed",
                        help="fixed: --k; adaptive: each device's controller for its own tokens/s; priced: against "
                             "the verifier's announced step cost (k = 0 where drafting cannot pay), up to 8")
    parser.add_argument("--classes", default="",
                        help=f"device classes of the fleet, comma-separated [default: all, mixed: {','.join(c['name'] for c in CLASSES)}]")
    parser.add_argument("--slo-tokens-per-s", default="5,10",
                        help="per-session rates for capacity, comma-separated [default: 5,10; reading speed is ~5]")
    parser.add_argument("--duration-s", type=float, default=0.0, help="seconds devices keep starting sessions after the ramp [default: the profile's]")
    parser.add_argument("--runtime", choices=("transformers", "compiled"), default="transformers",
                        help="the verifier's runtime; the server-only baseline decodes with the same one (fair)")
    parser.add_argument("--dtype", default="float32",
                        help="the target's dtype for the verifier and the server-only baseline alike (bfloat16: a user's choice)")
    parser.add_argument("--verifier-flag", action="append", default=[], help="extra sled-verifier flag (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip server-only and ceiling (quick iteration)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    ns = [int(n) for n in args.ns.split(",")] if args.ns else profile["ns"]
    duration_s = args.duration_s or profile["duration_s"]
    torch.set_num_threads(1)
    os.sched_setaffinity(0, SERVER_CORES)
    workdir = ROOT / "build" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)

    target_dir, classes, acceptance, pool_of = prepare(args, profile, workdir)
    from sled_protocol.vocab import vocab_hash
    from sled_verifier.runtime import load_target

    # Server-only needs no batch invariance: it decodes with whichever is fastest of the plain kernels, generate
    # and the verifier's own forward (invariant by default: its native kernels are the fastest at a few rows),
    # which is also what the ceiling's k+1 pass is timed on.
    target = load_target(target_dir, args.runtime, device="cpu", dtype=args.dtype, batch_invariant=False)
    verifying = load_target(target_dir, args.runtime, device="cpu", dtype=args.dtype,
                            batch_invariant="--no-batch-invariant" not in args.verifier_flag)
    pool = pool_of(verifying)
    ks = sorted({*KS[args.profile], args.k})
    mean_out = sum(OUTPUT_TOKENS) // 2
    context = sum(PROMPT_TOKENS) // 2 + mean_out // 2
    baselines = {}
    verifier_flags = ["--runtime", args.runtime, "--dtype", args.dtype, *context_flags(args.verifier_flag),
                      *args.verifier_flag]
    broker, port = start_dev_broker(workdir / "broker-fleet")
    url = f"mqtt://127.0.0.1:{port}"
    rows, wrong = [], 0
    try:
        verifier = Verifier(url, target_dir, workdir, "fleet-verifier", *verifier_flags)
        try:
            for n in ns:
                if not args.no_baseline:  # timed while the verifier idles, before its fleet (rows land one by one)
                    log(f"server-only and model step times at N={n}")
                    baselines[n] = (server_only(target, pool, n, mean_out, verifying), step_times(target, verifying, n, ks, context))
                ramp_s = max(profile["ramp_s"], n / 25)  # sessions arrive over time, not all at once
                warmup_s = profile["ramp_s"]
                if n in baselines:  # a lifetime at server-only's pace: warm up one, measure 1.5
                    lifetime_s = mean_out / baselines[n][0]["session_tokens_per_s"]
                    warmup_s = max(warmup_s, lifetime_s)
                    duration_s = max(args.duration_s or profile["duration_s"], 1.5 * lifetime_s)
                log(f"fleet of {n} devices: arriving over {ramp_s:g} s, warm-up {warmup_s:.1f} s, window {duration_s:.1f} s")
                spec = {"n": n, "mqtt_url": url, "verifier": "fleet-verifier", "vocab": vocab_hash(target_dir),
                        "vocab_size": target.vocab_size, "eos_ids": target.eos_ids.tolist(), "seed": 1,
                        "pool": str(workdir / f"pool-{args.target}-{args.profile}.json.pool"), "classes": classes,
                        "rtt_ms": RTT_MS, "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                        "ramp_s": ramp_s, "warmup_s": warmup_s, "duration_s": duration_s, "k_mode": args.k_mode}
                Path(spec["pool"]).write_text(json.dumps(pool))
                fleet = run_fleet(url, verifier, workdir, spec)
                wrong += len(fleet["wrong"])
                if args.no_baseline:
                    m = fleet["metrics"]
                    rates = sorted(s["tokens"] / s["seconds"] for s in fleet["sessions"] if s["seconds"] > 0) or [0.0]
                    log(f"N={n}: {1000 * fleet['cpu_s'] / max(1, fleet['committed']):.3f} ms/token, batch "
                        f"{m.get('sled_verifier_batch_size_sum', 0) / max(1, m.get('sled_verifier_batch_size_count', 0)):.1f}, "
                        f"cpu {fleet['cpu_s'] / fleet['window_s']:.2f}, wrong {len(fleet['wrong'])} {fleet['errors']}; "
                        f"tokens/s p50/p10 {rates[len(rates) // 2]:.2f}/{rates[len(rates) // 10]:.2f}, by class: " + "  ".join(
                            f"{klass} {v['p50']}/{v['p10']} ({v['verifier_ms_per_round']} ms a round on the verifier)"
                            for klass, v in per_class_rates(fleet["sessions"]).items()))
                    continue
                m = fleet["metrics"]
                batch = max(1, round(m.get("sled_verifier_batch_size_sum", 0) / max(1, m.get("sled_verifier_batch_size_count", 0))))
                at_batch = {"n": batch, **step_times(target, verifying, batch, [args.k], context)}
                rows.append(summarise(n, fleet, *baselines[n], at_batch, acceptance, args.k))
                rows[-1].update(after_gap(verifying, fleet, batch, args.k + 1, context))
                log(f"N={n}: ratio {rows[-1]['ratio']}x of ceiling {rows[-1]['ceiling']}x "
                    f"({rows[-1]['fraction_of_ceiling']:.0%}), best-k ceiling {rows[-1]['ceiling_best_k']}x at "
                    f"k={rows[-1]['best_k']} ({rows[-1]['fraction_of_best_k_ceiling']:.0%}), batch {rows[-1]['mean_batch']}, "
                    f"k mean {rows[-1]['k_mean']}, wrong {rows[-1]['wrong']}")
                (workdir / f"fleet-{args.target}-{args.profile}-partial.json").write_text(json.dumps(rows, indent=2))
        finally:
            verifier.stop()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    if args.no_baseline:
        return 0 if wrong == 0 else 1
    result = {"profile": args.profile, "target": f"{args.target} ({target_dir})", "target_name": args.target,
              "k": args.k, "k_mode": args.k_mode, "acceptance": acceptance, "classes": classes, "rows": rows,
              "timing_conditions": TIMING_CONDITIONS,
              "verifier_flags": verifier_flags, "capacity": capacity(rows, [float(x) for x in args.slo_tokens_per_s.split(",")]),
              "machine": f"verifier and baselines on core {sorted(SERVER_CORES)} (1 torch thread), devices and broker "
                         f"on {sorted(DEVICE_CORES)}"}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"fleet-{args.target}-{args.profile}-{args.runtime}-{args.k_mode}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    print_table(result)
    log(f"wrote {path} and its .png")
    return 0 if wrong == 0 else 1


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ns = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ns, [r["ratio"] for r in rows], marker="o", label="SLED / server-only (server cost per token)")
    left.plot(ns, [r["ceiling"] for r in rows], marker="x", linestyle="--", label="ceiling the model allows")
    left.set(xlabel="devices N", ylabel="x less server time per token", xscale="log", title="server cost")
    left.set_xticks(ns, [str(n) for n in ns])
    left.legend()
    right.plot(ns, [r["session_tokens_per_s_p50"] for r in rows], marker="o", label="SLED p50")
    right.plot(ns, [r["session_tokens_per_s_p10"] for r in rows], marker="o", label="SLED p10")
    right.plot(ns, [r["server_only_session_tokens_per_s"] for r in rows], marker="x", label="server-only")
    right.set(xlabel="devices N", ylabel="tokens/s per session", xscale="log", yscale="log", title="per-session rate")
    right.set_xticks(ns, [str(n) for n in ns])
    right.legend()
    fig.suptitle(result["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
