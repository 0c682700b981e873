"""Proactive drafting measured on the real system: per-device tokens/s and verifier CPU per committed token,
with and without, for each draft of the model family at an emulated network round trip of 5, 20 and 50 ms.

A real Mosquitto (the project's dev config), one ``sled-verifier`` process (default flags, one torch thread,
pinned to the first core) and one real edge device per run (``EdgeDevice`` with the family's ONNX draft,
adaptive k, onnxruntime on the other cores) generating greedy sessions one after another on prompts cut
from this Python's standard library sources. The round trip is emulated on the device as in
``bench/fleet_devices.py``: each publish leaves RTT/2 late and each verdict is acted on RTT/2 after it
arrives. On and off alternate within each repeat (so drift on a shared machine hits both alike); the table
gives the median of the repeats and the spread of the on/off ratio. Verifier CPU is the process's
user + system seconds (/proc) over the run, every thread, divided by the committed tokens. Every session's
tokens must be the same with and without (greedy: the target's); the bench exits 1 otherwise.

Uses ``models/build/family-quick`` when built (``make models``), else the tiny random-weight family
(``sled-models tiny``, seconds to build: drafts that agree with the target ~85%, ~65% and ~0% of the time).
The family's drafts take about a millisecond a token here; ``--slow NAME=MS`` adds a row for that draft
slowed by MS per decoding step (a sleep in the worker thread before each forward pass of one or two
tokens), standing in for a device that drafts at tens of ms a token (a 0.5B draft on a Raspberry Pi 5).

python bench/proactive.py [--family DIR] [--rtt-ms 5,20,50] [--repeats 3] [--sessions 2] [--tokens 48]
                          [--slow jetson-orin=20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import CORES, DEVICE_CORES, DEVICES, SERVER_CORES, Verifier, log  # noqa: E402
from sled_edge.client import EdgeDevice  # noqa: E402
from sled_edge.config import EdgeConfig  # noqa: E402
from sled_protocol.devbroker import start_dev_broker  # noqa: E402
from sled_protocol.logs import configure_logging  # noqa: E402

QUICK = ROOT / "models" / "build" / "family-quick"
TINY = ROOT / "models" / "build" / "tiny"
PROMPT_SOURCES = ("asyncio/tasks.py", "json/decoder.py", "argparse.py", "dataclasses.py", "functools.py", "pathlib.py")


def family_drafts(family: Path) -> dict[str, Path]:
    """Each device's draft directory (the export ``bench/run.py`` gives that device, else the plain one)."""
    manifest = json.loads((family / "manifest.json").read_text())
    return {name: family / entry.get(DEVICES.get(name, "path"), entry["path"]) for name, entry in manifest["drafts"].items()}


def prompt_texts(count: int, chars: int = 240) -> list[str]:
    """Openings of functions in the standard library (the family was trained on it; held-out files or not)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in PROMPT_SOURCES:
        source = (stdlib / name).read_text()
        at = source.find("\ndef ", len(source) // 3)
        texts.append(source[at + 1 : at + 1 + chars])
    return [texts[i % len(texts)] for i in range(count)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def delay_network(device: EdgeDevice, one_way_s: float) -> None:
    """The emulated round trip: every publish leaves ``one_way_s`` late, every verdict is routed ``one_way_s``
    after it arrived (the device's own connection, so MQTT itself is measured as it is)."""
    connection = device.connection
    publish, route = connection.publish, connection._route

    async def delayed_publish(topic: str, payload: bytes, timeout_s: float) -> None:
        await asyncio.sleep(one_way_s)
        await publish(topic, payload, timeout_s)

    def delayed_route(verdict) -> None:
        asyncio.get_running_loop().call_later(one_way_s, route, verdict)

    connection.publish, connection._route = delayed_publish, delayed_route


def slow_down(device: EdgeDevice, ms_per_step: float) -> None:
    """A slower drafter: each decoding step (a forward pass of one or two tokens) takes ``ms_per_step`` longer."""
    feed = device.model.feed

    def slower(cache, tokens):
        if len(tokens) <= 2:
            time.sleep(ms_per_step / 1000.0)
        return feed(cache, tokens)

    device.model.feed = slower


async def run_device(url: str, verifier: Verifier, draft: Path, device_id: str, rtt_ms: float, proactive: bool,
                     prompts: list[str], tokens: int, slow_ms: float = 0.0) -> dict:
    config = EdgeConfig(draft=str(draft), mqtt_url=url, device_id=device_id, verifier=verifier.name,
                        proactive=proactive, timeout_s=30.0, threads=1)
    device = EdgeDevice(config)
    delay_network(device, rtt_ms / 2000.0)
    if slow_ms:
        slow_down(device, slow_ms)
    async with device:
        await device.choose_verifier()
        ids = [device.encode_prompt(p) for p in prompts]
        cpu_before, started = cpu_seconds(verifier.process.pid), time.perf_counter()
        results = [await device.generate(p, tokens) for p in ids]
        wall_s, cpu_s = time.perf_counter() - started, cpu_seconds(verifier.process.pid) - cpu_before
    committed = sum(len(r.token_ids) for r in results)
    rounds = sum(r.rounds for r in results)
    return {"tokens_per_s": committed / wall_s, "verifier_cpu_ms_per_token": 1000 * cpu_s / committed,
            "rounds": rounds, "hit_rate": sum(r.guesses_held for r in results) / rounds,
            "mean_accepted_length": committed / rounds, "outputs": [r.token_ids for r in results]}


def summarise(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs)
            for key in ("tokens_per_s", "verifier_cpu_ms_per_token", "hit_rate", "mean_accepted_length")}


def ratio_spread(on: list[dict], off: list[dict], key: str) -> tuple[float, float, float]:
    """Median and range of the per-repeat on/off ratios of ``key``."""
    ratios = sorted(a[key] / b[key] for a, b in zip(on, off))
    return statistics.median(ratios), ratios[0], ratios[-1]


def print_table(rows: list[dict]) -> None:
    print(f"{'draft':<18}{'rtt_ms':>7}{'acc_len':>8}{'hits':>6}  {'tok/s off':>9}{'tok/s on':>9}  {'ratio (min-max)':<18}"
          f"{'cpu ms/tok off':>15}{'on':>7}  {'ratio (min-max)':<18}")
    for row in rows:
        speed, cpu = row["speedup"], row["cpu_ratio"]
        print(f"{row['draft']:<18}{row['rtt_ms']:>7g}{row['on']['mean_accepted_length']:>8.2f}{row['on']['hit_rate']:>6.0%}  "
              f"{row['off']['tokens_per_s']:>9.1f}{row['on']['tokens_per_s']:>9.1f}  "
              f"{f'{speed[0]:.2f}x ({speed[1]:.2f}-{speed[2]:.2f})':<18}"
              f"{row['off']['verifier_cpu_ms_per_token']:>15.2f}{row['on']['verifier_cpu_ms_per_token']:>7.2f}  "
              f"{f'{cpu[0]:.2f}x ({cpu[1]:.2f}-{cpu[2]:.2f})':<18}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, default=None, help="model family [default: family-quick if built, else tiny]")
    parser.add_argument("--rtt-ms", default="5,20,50", help="emulated round trips, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2, help="sessions per run, one after another")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per session")
    parser.add_argument("--slow", action="append", default=None, metavar="NAME=MS",
                        help="also run draft NAME slowed by MS per decoding step [default: jetson-orin=20]")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    configure_logging("error")
    family = args.family or (QUICK if (QUICK / "manifest.json").is_file() else TINY)
    if not (family / "manifest.json").is_file():
        from sled_models.tiny import build_tiny_family

        build_tiny_family(family, log=log)
    drafts = {name: (path, 0.0) for name, path in family_drafts(family).items()}
    for spec in args.slow if args.slow is not None else ["jetson-orin=20"]:
        name, ms = spec.split("=")
        drafts[f"{name}+{float(ms):g}ms"] = (drafts[name][0], float(ms))
    rtts = [float(r) for r in args.rtt_ms.split(",")]
    prompts = prompt_texts(args.sessions)
    workdir = ROOT / "build" / "bench-proactive"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    broker, port = start_dev_broker(workdir / "broker")
    url = f"mqtt://127.0.0.1:{port}"
    rows, differing = [], 0
    try:
        verifier = Verifier(url, family / "target", workdir, "bench-proactive")
        os.sched_setaffinity(0, DEVICE_CORES)  # the device (this process) off the verifier's core
        try:
            for name, (draft, slow_ms) in drafts.items():
                for rtt_ms in rtts:
                    runs: dict[bool, list[dict]] = {True: [], False: []}
                    for repeat in range(args.repeats):
                        for proactive in ((True, False) if repeat % 2 == 0 else (False, True)):
                            runs[proactive].append(asyncio.run(run_device(
                                url, verifier, draft, f"bench-{name.replace('+', '-')}", rtt_ms, proactive, prompts, args.tokens, slow_ms)))
                    outputs = {json.dumps(run.pop("outputs")) for run in runs[True] + runs[False]}
                    differing += len(outputs) - 1
                    row = {"draft": name, "rtt_ms": rtt_ms, "on": summarise(runs[True]), "off": summarise(runs[False]),
                           "speedup": ratio_spread(runs[True], runs[False], "tokens_per_s"),
                           "cpu_ratio": ratio_spread(runs[True], runs[False], "verifier_cpu_ms_per_token"), "runs": runs}
                    rows.append(row)
                    log(f"{name} rtt {rtt_ms:g} ms: {row['off']['tokens_per_s']:.1f} -> {row['on']['tokens_per_s']:.1f} "
                        f"tokens/s ({row['speedup'][0]:.2f}x), hits {row['on']['hit_rate']:.0%}")
        finally:
            verifier.stop()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    results = {"family": str(family), "rtt_ms": rtts, "repeats": args.repeats, "sessions": args.sessions,
               "tokens": args.tokens, "machine": f"{len(CORES)} cores: verifier on {sorted(SERVER_CORES)}, "
               f"device on {sorted(DEVICE_CORES)}", "rows": rows,
               "bench_seconds": round(time.monotonic() - started, 1), "outputs_differing": differing}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"proactive-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"proactive drafting, {family.name} family, {args.sessions} x {args.tokens} greedy tokens per run, "
          f"median of {args.repeats} (ratio: on/off per repeat, median and range)")
    print_table(rows)
    log(f"wrote {path} in {results['bench_seconds']} s; sessions differing with and without: {differing}")
    return 0 if differing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
