"""``make bench``: SLED measured against its baselines in one run, on this machine, with ratios.

- SLED: a real Mosquitto, one verifier process and three edge device processes (heterogeneous drafts
  from the model family) running N sessions on held-out prompts; committed tokens/s, acceptance per
  draft, verifier busy fraction, model seconds per committed token, round trip p50/p99, queue delay,
  batch sizes, verifier overhead (busy time not in the model);
- server-only: the same target decoding the same N sessions autoregressively, batched, same runtime and
  threads (the remote-inference baseline); every SLED output is also checked against it token for token;
- no batching: SLED with one draft per forward pass;
- ceiling: the raw model's forward over N x (k+1) tokens against N x 1 and against N separate forwards;
- memory: verifier peak RSS at the smallest and largest N, KV bytes per session, edge peak RSS per draft;
- draft length: fixed k swept against the adaptive controller, per draft.
Writes bench/results/<profile>-<time>.json and a PNG plot; prints a table of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sled_models.timing import timed  # noqa: E402
from sled_protocol.devbroker import free_port, start_dev_broker  # noqa: E402

PROFILES = {
    "quick": {"ns": [1, 4, 8], "tokens": 32, "k_sweep": [2, 4], "sweep_drafts": ["rpi5"], "prompt_tokens": 48,
              "repeats": 1},
    # Each SLED configuration runs `repeats` times and the run with the median throughput is reported.
    "full": {"ns": [1, 2, 4, 8, 16], "tokens": 64, "k_sweep": [1, 2, 3, 4, 6], "sweep_drafts": ["jetson-orin", "rpi5", "rpi4"],
             "prompt_tokens": 64, "repeats": 3},
}


def median_run(runs: list[dict], key: str = "system_tokens_per_s") -> dict:
    ordered = sorted(runs, key=lambda run: run[key])
    chosen = dict(ordered[len(ordered) // 2])
    chosen[f"{key}_all_runs"] = [run[key] for run in runs]
    return chosen
DEVICES = {"jetson-orin": "path", "rpi5": "path_int8", "rpi4": "path_int8"}  # which export each device runs
# On one host the edge devices would steal the server's CPU; pin the server side (verifier, baselines,
# ceiling) to the first core and the device processes to the others, as separate machines would be.
CORES = sorted(os.sched_getaffinity(0))
SERVER_CORES = {CORES[0]}
DEVICE_CORES = set(CORES[1:]) or SERVER_CORES


def pinned(cores: set[int]):
    return lambda: os.sched_setaffinity(0, cores)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Verifier:
    def __init__(self, url: str, target: Path, workdir: Path, name: str, *extra: str) -> None:
        self.metrics_port = free_port()
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sled_verifier", "--mqtt-url", url, "--target", str(target), "--verifier-id", name,
                 "--threads", "1", "--metrics-port", str(self.metrics_port), "--stats-interval-s", "30", *extra],
                stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                preexec_fn=pinned(SERVER_CORES))
        self.name = name
        deadline = time.monotonic() + 600  # a 135M target loads, probes and calibrates in 10-60 s (minutes when shared)
        while "verifier_online" not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)


def run_sled(url: str, verifier: Verifier, family: Path, manifest: dict, prompts_file: Path, n: int, tokens: int,
             devices: list[str], draft_tokens: int = 0) -> dict:
    """N sessions spread over the device processes, all starting at once; verifier metrics diffed."""
    before = verifier.metrics()
    start_at = time.time() + 4.0
    workers = []
    for d, device in enumerate(devices):
        indices = [i for i in range(n) if i % len(devices) == d]
        if not indices:
            continue
        draft = family / manifest["drafts"][device][DEVICES[device]]
        workers.append((device, subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "worker.py"), "--mqtt-url", url, "--draft", str(draft),
             "--device-id", f"bench-{device}", "--verifier", verifier.name, "--prompts", str(prompts_file),
             "--indices", ",".join(map(str, indices)), "--max-new-tokens", str(tokens),
             "--draft-tokens", str(draft_tokens), "--start-at", str(start_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=pinned(DEVICE_CORES))))
    reports = {}
    for device, process in workers:
        out, err = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"bench worker {device} failed:\n{err[-3000:]}")
        reports[device] = json.loads(out)
    after = verifier.metrics()
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    sessions = [s | {"device": d} for d, r in reports.items() for s in r["sessions"]]
    wall_s = max(r["wall_s"] for r in reports.values())
    committed = sum(len(s["tokens"]) for s in sessions)
    trips = sorted(t for r in reports.values() for t in r["round_trips_s"])
    busy, forward = delta.get("sled_verifier_busy_seconds_total", 0.0), delta.get("sled_verifier_forward_seconds_sum", 0.0)
    prefill = delta.get("sled_verifier_prefill_seconds_total", 0.0)
    batches = delta.get("sled_verifier_batch_size_count", 0.0)
    per_draft = {}
    for device in reports:
        own = [s for s in sessions if s["device"] == device]
        rounds, accepted, drafted = (sum(s[key] for s in own) for key in ("rounds", "accepted", "draft_tokens"))
        per_draft[device] = {"sessions": len(own), "mean_accepted_length": round(1 + accepted / rounds, 3),
                             "acceptance_rate": round(accepted / max(1, drafted), 3),
                             "mean_k": round(drafted / rounds, 2), "peak_rss_mb": round(reports[device]["peak_rss_bytes"] / 2**20, 1)}
    buckets = {k.split("le=")[1].rstrip("}"): v for k, v in delta.items() if k.startswith("sled_verifier_batch_size_bucket")}
    return {
        "n": n, "wall_s": round(wall_s, 3), "committed_tokens": committed,
        "system_tokens_per_s": round(committed / wall_s, 2),
        "session_tokens_per_s_median": round(statistics.median(len(s["tokens"]) / s["elapsed_s"] for s in sessions), 2),
        "round_trip_ms_p50": round(1000 * trips[len(trips) // 2], 2) if trips else None,
        "round_trip_ms_p99": round(1000 * trips[min(len(trips) - 1, int(len(trips) * 0.99))], 2) if trips else None,
        "verifier_busy_fraction": round(busy / wall_s, 3),
        "verifier_model_s_per_token": round((forward + prefill) / committed, 6),
        "verifier_overhead": round(1 - (forward + prefill) / busy, 3) if busy else None,
        "queue_delay_ms_mean": round(1000 * delta.get("sled_verifier_queue_delay_seconds_sum", 0.0)
                                     / max(1.0, delta.get("sled_verifier_queue_delay_seconds_count", 0.0)), 3),
        "mean_batch_size": round(delta.get("sled_verifier_batch_size_sum", 0.0) / max(1.0, batches), 2),
        "verifier_busy_ms_per_batch": round(1000 * busy / max(1.0, batches), 3),

        "batch_size_cumulative": buckets, "per_draft": per_draft,
        "outputs": {s["index"]: s["tokens"] for s in sessions},
    }


def transport(url: str, rounds: int = 400) -> dict:
    """MQTT + codec per round, alone: a device publishes real Draft messages (k=4, a 16-entry proposal each),
    an echo 'verifier' decodes each and answers with an encoded Verdict; and the same with raw bytes."""
    import asyncio

    from sled_protocol import Draft, SamplingParams, Verdict, VerdictKind, decode_draft, decode_verdict, encode
    from sled_protocol import topics
    from sled_protocol.mqtt import make_client
    from sled_protocol.transport import parse_broker_url

    draft = Draft(device_id="bench-t", session_id="0123456789ab", seq=0, base_len=300, tokens=(11, 12, 13, 14),
                  max_len=900, vocab="0123456789abcdef", sampling=SamplingParams(0.8, seed=1),
                  q_ids=tuple(tuple(range(j, j + 16)) for j in range(4)), q_probs=tuple((1 / 16,) * 16 for _ in range(4)))

    async def measure(codec: bool) -> list[float]:
        address = parse_broker_url(url)
        async with make_client(address, "bench-echo") as echo, make_client(address, "bench-edge") as edge:
            await echo.subscribe(topics.drafts_filter("bench-t"))
            await edge.subscribe(topics.verdict_topic("bench-t"))

            async def serve() -> None:
                async for message in echo.messages:
                    payload = bytes(message.payload)
                    if codec:
                        got = decode_draft(payload)
                        payload = encode(Verdict(kind=VerdictKind.VERIFIED, verifier_id="bench-t",
                                                 session_id=got.session_id, seq=got.seq, accepted=2, next_token=7, committed_len=got.base_len + 3))
                    await echo.publish(topics.verdict_topic("bench-t"), payload)

            server = asyncio.create_task(serve())
            replies = aiter(edge.messages)
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                await edge.publish(topics.draft_topic("bench-t", "bench-t"), encode(draft) if codec else b"x" * 700)
                reply = await anext(replies)
                if codec:
                    decode_verdict(bytes(reply.payload))
                samples.append(time.perf_counter() - started)
            server.cancel()
            return sorted(samples[20:])

    out = {}
    for name, codec in (("sled_messages", True), ("raw_bytes", False)):
        samples = asyncio.run(measure(codec))
        out[name] = {"p50_ms": round(1000 * samples[len(samples) // 2], 3),
                     "p99_ms": round(1000 * samples[int(len(samples) * 0.99)], 3)}
    return out


def server_only(target, prompts: list[list[int]], tokens: int) -> dict:
    """The same target decoding the same sessions autoregressively, batched (slot cache, one token per row)."""
    kv = target.init_kv(max_slots=len(prompts), max_length=max(map(len, prompts)) + tokens + 8)
    slots = [kv.acquire() for _ in prompts]
    started = time.perf_counter()
    logits = target.forward_rows(slots, [0] * len(prompts), prompts)
    lens = torch.tensor([len(p) for p in prompts])
    last = logits[torch.arange(len(prompts)), lens - 1].argmax(-1).tolist()
    outputs, lengths = [[t] for t in last], [len(p) for p in prompts]
    for _ in range(tokens - 1):
        logits = target.forward_rows(slots, lengths, [[o[-1]] for o in outputs])
        for row, token in enumerate(logits[:, 0].argmax(-1).tolist()):
            outputs[row].append(token)
            lengths[row] += 1
    wall_s = time.perf_counter() - started
    return {"n": len(prompts), "wall_s": round(wall_s, 3), "system_tokens_per_s": round(len(prompts) * tokens / wall_s, 2),
            "session_tokens_per_s": round(tokens / wall_s, 2), "model_s_per_token": round(wall_s / (len(prompts) * tokens), 6),
            "outputs": outputs}


def ceiling(target, n: int, k: int, context: int, repeat: int = 5) -> dict:
    """Raw forward times: N rows x (k+1) tokens, N x 1 token, and N separate (k+1)-token forwards."""
    kv = target.init_kv(max_slots=n, max_length=context + k + 8)
    slots = [kv.acquire() for _ in range(n)]
    rng = np.random.default_rng(0)
    target.forward_rows(slots, [0] * n, [rng.integers(1, 4000, context).tolist() for _ in range(n)])

    wide = [[1] * (k + 1)] * n
    batched_k = timed(lambda: target.forward_rows(slots, [context] * n, wide), repeat=repeat)  # median wall seconds
    batched_1 = timed(lambda: target.forward_rows(slots, [context] * n, [[1]] * n), repeat=repeat)
    separate_k = timed(lambda: [target.forward_rows([s], [context], [[1] * (k + 1)]) for s in slots], repeat=repeat)
    return {"n": n, "k": k, "forward_ms_n_x_k1": round(1000 * batched_k, 2), "forward_ms_n_x_1": round(1000 * batched_1, 2),
            "forward_ms_n_separate_k1": round(1000 * separate_k, 2),
            "pass_cost_ratio": round(batched_k / batched_1, 3), "batching_gain_raw": round(separate_k / batched_k, 3)}


def real_pair(target: Path, drafts: Path, count: int) -> tuple[dict, list[list[int]], Path]:
    """``--target``/``--drafts``: a pretrained target (a directory or a .gguf) and the drafts ``sled-models distill``
    wrote for it (or any ONNX draft directories): a manifest shaped like the family's (each device class's draft
    by ``sled_models.pretrained.drafts_by_device``), held-out chat prompts laid out by
    the target's chat template, and the model directory the baselines load."""
    from tokenizers import Tokenizer

    from sled_edge.chat_template import load_chat_format
    from sled_verifier.gguf import model_directory

    from sled_models.pretrained import drafts_by_device

    chosen = drafts_by_device(drafts)
    manifest = {"drafts": {"jetson-orin": {"path": str(chosen["jetson-orin"])}, "rpi5": {"path_int8": str(chosen["rpi5"])},
                           "rpi4": {"path_int8": str(chosen["rpi4"])}}}
    try:
        from sled_models.chat_prompts import held_out_prompts

        questions = held_out_prompts(count)
    except ImportError:
        topics = ("hurricanes", "chocolate", "Mars", "the brain", "sorting algorithms", "ancient Egypt", "telescopes",
                  "yoga", "owls", "the violin", "coral reefs", "wind turbines", "exercise", "maps", "trains", "maps")
        questions = [f"Can you tell me about {topics[i % len(topics)]}?" for i in range(count)]
    draft = chosen["jetson-orin"]
    chat, tokenizer = load_chat_format(draft), Tokenizer.from_file(str(draft / "tokenizer.json"))
    prompts = []
    for question in questions:
        rendered = chat.render([{"role": "user", "content": question}])
        prompts.append(tokenizer.encode(rendered.text, add_special_tokens=rendered.add_special_tokens).ids)
    return manifest, prompts, model_directory(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--family", type=Path, default=ROOT / "models" / "build" / "family-quick")
    parser.add_argument("--slo-tokens-per-s", type=float, default=None,
                        help="per-session rate a session must keep for capacity [default: half of N=1 server-only]")
    parser.add_argument("--target", type=Path, default=None,
                        help="a pretrained target (directory or .gguf) instead of the family's; needs --drafts")
    parser.add_argument("--drafts", type=Path, default=None,
                        help="with --target: the directory of its ONNX drafts (sled-models distill --out)")
    parser.add_argument("--pretrained", choices=["smollm2"], default=None,
                        help="SmolLM2-135M-Instruct (fetched by make pretrained) with its distilled drafts (built once)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    if args.pretrained:
        from sled_models.pretrained import distilled_drafts, fetch_smollm2

        args.target = fetch_smollm2()
        args.drafts = distilled_drafts(args.target)
        if args.drafts is None:
            parser.error("--pretrained needs sled-models distill for its drafts")
    if (args.target is None) != (args.drafts is None):
        parser.error("--target and --drafts go together")
    started = time.monotonic()
    torch.set_num_threads(1)  # the verifier runs with --threads 1: same runtime, same threads
    os.sched_setaffinity(0, SERVER_CORES)  # the baselines run where the verifier runs
    if args.target is None and not (args.family / "manifest.json").is_file():
        from sled_models.build import build_family
        from sled_models.recipe import PROFILES as RECIPES

        log(f"building the model family into {args.family} (first run only)")
        build_family(args.family, RECIPES["quick"])
    from sled_verifier.target import TransformersTarget

    max_n = max(profile["ns"])
    if args.target is not None:  # the drafts' paths are absolute: args.family / path is path
        manifest, prompts, target_dir = real_pair(args.target, args.drafts, max_n)
        served = args.target
    else:
        manifest = json.loads((args.family / "manifest.json").read_text())
        target_dir = served = args.family / "target"
        held_out = np.load(args.family / "tokens_held_out.npy")
        rng = np.random.default_rng(42)
        starts = rng.integers(0, len(held_out) - profile["prompt_tokens"], size=max_n)
        prompts = [held_out[s : s + profile["prompt_tokens"]].astype(int).tolist() for s in starts]
    target = TransformersTarget(target_dir, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = ROOT / "build" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)
    prompts_file = workdir / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    results: dict = {"profile": args.profile, "family": str(args.family) if args.target is None else None,
                     "target": str(served), "drafts": {d: next(iter(v.values())) for d, v in manifest["drafts"].items()}
                     if args.target is not None else None,
                     "machine": f"{len(CORES)} CPU cores: verifier and baselines on core {sorted(SERVER_CORES)} (torch threads 1), "
                                f"device processes on cores {sorted(DEVICE_CORES)} (onnxruntime threads 1)"}

    log("server-only baseline and model ceiling")
    results["server_only"] = {n: median_run([server_only(target, prompts[:n], profile["tokens"])
                                             for _ in range(profile["repeats"])]) for n in profile["ns"]}
    k_typical = 4
    results["ceiling"] = {n: ceiling(target, n, k_typical, profile["prompt_tokens"] + profile["tokens"] // 2)
                          for n in profile["ns"]}
    results["memory"] = {"target_bytes": sum(p.stat().st_size for p in Path(target_dir).glob("*.safetensors")),
                         "kv_bytes_per_token": target.kv.bytes_per_token(),
                         "kv_bytes_per_session": target.kv.bytes_per_token() * (profile["prompt_tokens"] + profile["tokens"])}

    broker, port = start_dev_broker(workdir / "broker")
    url = f"mqtt://127.0.0.1:{port}"
    devices = list(DEVICES)
    wrong = 0
    try:
        log("transport: MQTT + codec per round")
        results["transport"] = transport(url)
        for mode, extra in (("sled", ()), ("no_batching", ("--max-batch-drafts", "1"))):
            verifier = Verifier(url, served, workdir, f"bench-{mode}", *extra)
            try:
                results[mode] = {}
                for n in profile["ns"]:
                    runs = []
                    for repeat in range(profile["repeats"]):
                        log(f"{mode}: N={n} (run {repeat + 1}/{profile['repeats']})")
                        run = run_sled(url, verifier, args.family, manifest, prompts_file, n, profile["tokens"], devices)
                        outputs = run.pop("outputs")
                        wrong += sum(outputs[i] != results["server_only"][n]["outputs"][i] for i in outputs)
                        runs.append(run)
                    results[mode][n] = median_run(runs)
                    if mode == "sled" and n in (min(profile["ns"]), max(profile["ns"])):
                        results["memory"][f"verifier_peak_rss_bytes_n{n}"] = verifier.peak_rss()
            finally:
                verifier.stop()
        results["memory"]["edge_peak_rss_mb"] = {d: r["peak_rss_mb"] for d, r in results["sled"][max(profile["ns"])]["per_draft"].items()}
        verifier = Verifier(url, served, workdir, "bench-sweep")
        try:
            results["k_sweep"] = {}
            for device in profile["sweep_drafts"]:
                rates = {}
                for k in [*profile["k_sweep"], 0]:
                    runs = []
                    for repeat in range(profile["repeats"]):
                        log(f"k sweep: {device} k={'adaptive' if k == 0 else k} (run {repeat + 1}/{profile['repeats']})")
                        run = run_sled(url, verifier, args.family, manifest, prompts_file, 1, profile["tokens"] * 2,
                                       [device], draft_tokens=k)
                        run.pop("outputs")
                        runs.append(run)
                    run = median_run(runs)
                    rates["adaptive" if k == 0 else k] = {"tokens_per_s": run["system_tokens_per_s"],
                                                          "mean_k": run["per_draft"][device]["mean_k"]}
                best = max((v["tokens_per_s"], k) for k, v in rates.items() if k != "adaptive")
                rates["adaptive_vs_best_fixed"] = round(rates["adaptive"]["tokens_per_s"] / best[0], 3)
                rates["best_fixed_k"] = best[1]
                results["k_sweep"][device] = rates
        finally:
            verifier.stop()
    finally:
        for server in results.get("server_only", {}).values():
            server.pop("outputs", None)
        broker.terminate()
        broker.wait(timeout=10)
    results["sessions_differing_from_server_only"] = wrong
    results["bench_seconds"] = round(time.monotonic() - started, 1)
    from bench.report import capacity, plot, print_table

    slo = args.slo_tokens_per_s or round(results["server_only"][min(profile["ns"])]["session_tokens_per_s"] / 2, 1)
    results["capacity"] = capacity(results, slo)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"{args.profile}-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{args.profile}-{stamp}.png")
    print_table(results)
    log(f"wrote {json_path} and its .png in {results['bench_seconds']} s")
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
