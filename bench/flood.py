"""One device floods the verifier while honest devices decode: their time alone and under the flood (issue 19).

A real Mosquitto (the project's dev config), one ``sled-verifier`` process with its default flags (one torch
thread, pinned to the first core; the devices run on the others) serving the tiny random-weight target, three
honest devices (``EdgeDevice``, greedy, a draft of the tiny family) each generating sessions one after another,
first alone, then beside a flooding device (its own process): it opens ``--wave`` sessions with
``--context``-token contexts at once, again every ``--pause-s`` (256 a second by default), and answers every
verdict of its sessions at once with a next round of ``--k`` random tokens (a flood of drafts). The figure is
the honest devices' wall time under the flood divided by their time alone (issue 19's goal: <= 1.5x; 23x
before per-device quotas). Each repeat starts a fresh verifier and times the honest devices alone, then
flooded; every honest session's tokens must be the same in both (greedy: the target's), or the bench exits 1.

python bench/flood.py [--repeats 3] [--sessions 2] [--tokens 48] [--wave 64] [--context 400]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sled_protocol import Draft, VerdictKind, encode, topics  # noqa: E402
from sled_protocol.codec import decode_verdict  # noqa: E402
from sled_protocol.mqtt import make_client  # noqa: E402
from sled_protocol.transport import parse_broker_url  # noqa: E402

HONEST = ("honest-a", "honest-b", "honest-c")
PROMPTS = ("import os\nimport sys\n", "def main(argv):\n    parser = argparse.", "class Loop:\n    def run(self",
           "    return self._loop.run_until_complete(fut)")


@dataclass
class FloodTally:
    opened: int = 0                 # sessions the flooder tried to open
    drafts: int = 0                 # drafts it published, first rounds included
    verdicts: Counter[str] = field(default_factory=Counter)  # by kind, errors by code


async def flood(url: str, verifier_id: str, vocab: str, stop: asyncio.Event, *, device_id: str = "flood",
                wave: int = 64, context: int = 400, k: int = 8, pause_s: float = 0.25, vocab_size: int = 500,
                seed: int = 0) -> FloodTally:
    """Waves of sessions with long contexts from one device, every verdict answered by a next round at once."""
    rng, tally = random.Random(seed), FloodTally()
    contexts = [tuple(rng.randrange(3, vocab_size) for _ in range(context)) for _ in range(16)]
    async with make_client(parse_broker_url(url), device_id, keepalive_s=60) as client:
        await client.subscribe(topics.verdict_topic(device_id), qos=topics.QOS_VERDICT)
        topic = topics.draft_topic(verifier_id, device_id)
        max_len: dict[str, int] = {}

        async def publish(draft: Draft) -> None:
            tally.drafts += 1
            await client.publish(topic, encode(draft), qos=topics.QOS_DRAFT)

        def tokens() -> tuple[int, ...]:
            return tuple(rng.randrange(3, vocab_size) for _ in range(k))

        async def answer() -> None:
            async for message in client.messages:
                verdict = decode_verdict(bytes(message.payload))
                tally.verdicts[str(verdict.error or verdict.kind)] += 1
                if verdict.kind is VerdictKind.VERIFIED and verdict.finish is None and verdict.session_id in max_len:
                    await publish(Draft(device_id, verdict.session_id, verdict.seq + 1, base_len=verdict.committed_len,
                                        tokens=tokens()[: max(0, max_len[verdict.session_id]
                                                              - verdict.committed_len - 1)],
                                        max_len=max_len[verdict.session_id], vocab=vocab))
                else:
                    max_len.pop(verdict.session_id, None)

        reader = asyncio.create_task(answer(), name="flood-verdicts")
        try:
            for number in range(10**9):
                for i in range(wave):
                    session = f"w{number}-{i}"
                    max_len[session] = context + 200
                    tally.opened += 1
                    await publish(Draft(device_id, session, 0, base_len=context, tokens=tokens(), max_len=context + 200,
                                        vocab=vocab, context=contexts[i % len(contexts)]))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause_s):
                        await stop.wait()
                if stop.is_set():
                    break
        finally:
            reader.cancel()
    return tally


async def honest_devices(url: str, draft: Path, verifier_id: str, sessions: int, tokens: int,
                         devices: tuple[str, ...] = HONEST, timeout_s: float = 5.0) -> tuple[float, list[list[int]]]:
    """Each device generates ``sessions`` greedy sessions one after another, all devices at once: wall seconds
    and every session's tokens (device by device)."""
    from sled_edge.client import EdgeDevice
    from sled_edge.config import EdgeConfig

    async def one(index: int, device_id: str) -> list[list[int]]:
        config = EdgeConfig(draft=str(draft), mqtt_url=url, device_id=device_id, verifier=verifier_id,
                            timeout_s=timeout_s)
        outputs = []
        async with EdgeDevice(config) as device:
            for s in range(sessions):
                prompt = device.encode_prompt(PROMPTS[(index + s) % len(PROMPTS)])
                outputs.append((await device.generate(prompt, tokens)).token_ids)
        return outputs

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        runs = [group.create_task(one(i, d)) for i, d in enumerate(devices)]
    return time.perf_counter() - started, [out for run in runs for out in run.result()]


async def flooded(url: str, draft: Path, verifier_id: str, vocab: str, args,
                  flooder_id: str) -> tuple[float, list[list[int]], dict]:
    """The honest devices beside a flooder in its own process (on a real fleet the flood costs the flooder's
    CPU, not the honest devices': sharing this process's event loop would charge them for it)."""
    flooder = subprocess.Popen(
        [sys.executable, __file__, "--flooder", url, verifier_id, vocab, "--device-id", flooder_id, "--wave",
         str(args.wave), "--context",
         str(args.context), "--k", str(args.k), "--pause-s", str(args.pause_s)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        await asyncio.sleep(args.head_start_s)  # the flood is under way before the honest devices start
        seconds, outputs = await honest_devices(url, draft, verifier_id, args.sessions, args.tokens)
    finally:
        flooder.send_signal(signal.SIGTERM)
        try:
            out, _ = flooder.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # the honest figures stand; only the flooder's own tally is lost
            flooder.kill()
            out, _ = flooder.communicate()
    lines = out.strip().splitlines()
    return seconds, outputs, json.loads(lines[-1]) if lines else {"error": "the flooder did not stop: killed"}


def run_flooder(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flood.py --flooder")
    parser.add_argument("url")
    parser.add_argument("verifier")
    parser.add_argument("vocab")
    parser.add_argument("--device-id", default="flood")
    for name, kind in (("--wave", int), ("--context", int), ("--k", int), ("--pause-s", float)):
        parser.add_argument(name, type=kind, required=True)
    args = parser.parse_args(argv)

    async def until_terminated() -> FloodTally:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        return await flood(args.url, args.verifier, args.vocab, stop, device_id=args.device_id, wave=args.wave,
                           context=args.context, k=args.k, pause_s=args.pause_s)

    tally = asyncio.run(until_terminated())
    print(json.dumps({"opened": tally.opened, "drafts": tally.drafts, "verdicts": dict(tally.verdicts)}), flush=True)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--flooder"]:
        return run_flooder(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=2, help="sessions per honest device, one after another")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per honest session")
    parser.add_argument("--wave", type=int, default=64, help="sessions the flooder opens at once")
    parser.add_argument("--context", type=int, default=400, help="context tokens of each flood session")
    parser.add_argument("--k", type=int, default=8, help="draft tokens of each flood round")
    parser.add_argument("--pause-s", type=float, default=0.25, help="seconds between waves")
    parser.add_argument("--head-start-s", type=float, default=1.0, help="flood before the honest devices start")
    parser.add_argument("--verifier-args", default="", help="extra sled-verifier flags, space-separated")
    args = parser.parse_args()
    from bench.run import DEVICE_CORES, Verifier
    from sled_models.tiny import build_tiny_family
    from sled_protocol.devbroker import start_dev_broker
    from sled_protocol.logs import configure_logging
    from sled_protocol.vocab import vocab_hash

    configure_logging("error")
    family = ROOT / "models" / "build" / "tiny"
    manifest = build_tiny_family(family, log=lambda line: print(line, file=sys.stderr))
    draft = family / next(iter(manifest["drafts"].values()))["path"]
    workdir = ROOT / "build" / "bench-flood"
    workdir.mkdir(parents=True, exist_ok=True)
    broker, port = start_dev_broker(workdir / "broker")
    url = f"mqtt://127.0.0.1:{port}"
    factors, differing, alive = [], 0, True
    os.sched_setaffinity(0, DEVICE_CORES)  # the devices (honest ones here, the flooder inherits it) off its core
    vocab = vocab_hash(family / "target")
    try:
        for repeat in range(args.repeats):
            # A fresh verifier each repeat: the last flood's sessions and queued first rounds would still hold
            # a part of it (and dilute the next flooder's share), so repeats would not measure the same thing.
            verifier = Verifier(url, family / "target", workdir, f"bench-flood-{repeat}", *args.verifier_args.split())
            asyncio.run(honest_devices(url, draft, verifier.name, 1, 8))  # warm-up: sessions, ONNX, the cost model
            alone_s, alone = asyncio.run(honest_devices(url, draft, verifier.name, args.sessions, args.tokens))
            flood_s, under, tally = asyncio.run(flooded(url, draft, verifier.name, vocab, args, "flood"))
            differing += sum(a != b for a, b in zip(alone, under))
            factors.append(flood_s / alone_s)
            flooder = (f"flooder opened {tally['opened']} sessions, sent {tally['drafts']} drafts, verdicts "
                       f"{tally['verdicts']}" if "opened" in tally else tally["error"])
            print(f"repeat {repeat + 1}: honest alone {alone_s:.2f} s, under the flood {flood_s:.2f} s, "
                  f"factor {factors[-1]:.2f}x; {flooder}", flush=True)
            alive = alive and verifier.process.poll() is None
            verifier.stop()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    print(f"flood factor (honest time under the flood / alone): median {statistics.median(factors):.2f}x, "
          f"runs {', '.join(f'{f:.2f}x' for f in factors)}; honest sessions differing: {differing}; "
          f"verifier {'up' if alive else 'EXITED'}")
    return 0 if differing == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
