"""``make load``: N simulated devices generate for T seconds against real verifiers through a real broker,
optionally killing verifiers as they go, then every committed token is checked against the target.

Reports rounds, retries, resyncs, failovers, errors by kind, sessions lost (must be 0) and wrong tokens
(must be 0). Example: make load DEVICES=64 DURATION_S=600 KILL_EVERY_S=30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sled_edge.client import EdgeDevice, EdgeError  # noqa: E402
from sled_edge.config import EdgeConfig  # noqa: E402
from sled_models.tiny import build_tiny_family  # noqa: E402
from sled_protocol.devbroker import start_dev_broker  # noqa: E402
from sled_protocol.logs import configure_logging  # noqa: E402

PROMPTS = ["import os\n", "def main(argv):\n", "class Parser:\n    def __init__(self", "    return self.",
           "for key, value in items.", "try:\n    import", "if __name__ == '__main__':\n", "with open(path) as f:\n"]


class Verifiers:
    """Verifier processes that can be killed (-9) and brought back with the same id."""

    def __init__(self, url: str, target: Path, count: int, logdir: Path) -> None:
        self.url, self.target, self.logdir = url, target, logdir
        self.processes = {f"load-v{i}": self._start(f"load-v{i}") for i in range(count)}
        self.kills = 0

    def _start(self, verifier_id: str) -> subprocess.Popen:
        log = (self.logdir / f"{verifier_id}.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", "sled_verifier", "--mqtt-url", self.url, "--target",
                                 str(self.target), "--verifier-id", verifier_id, "--metrics-port", "0",
                                 "--threads", "1", "--stats-interval-s", "5"],
                                stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})

    async def wait_online(self) -> None:
        for verifier_id in self.processes:
            path = self.logdir / f"{verifier_id}.log"
            while "verifier_online" not in path.read_text(errors="replace"):
                await asyncio.sleep(0.1)

    async def chaos(self, every_s: float, until_s: float) -> None:
        rng = random.Random(7)
        while time.monotonic() + every_s < until_s:
            await asyncio.sleep(every_s)
            victim = rng.choice(sorted(self.processes))
            self.processes[victim].send_signal(signal.SIGKILL)
            self.processes[victim].wait()
            self.kills += 1
            print(f"  killed {victim} (-9)", flush=True)
            await asyncio.sleep(1.0)
            self.processes[victim] = self._start(victim)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(timeout=15)


async def device_loop(config: EdgeConfig, until_s: float, max_new: int, seed: int, records: list, errors: Counter):
    rng = random.Random(seed)
    async with EdgeDevice(config) as device:
        while time.monotonic() < until_s:
            prompt = rng.choice(PROMPTS)
            prompt_ids = device.encode_prompt(prompt)
            try:
                result = await device.generate(prompt_ids, max_new)
                records.append({"prompt": prompt, "tokens": result.token_ids, "rounds": result.rounds,
                                "retries": result.retries, "resyncs": result.resyncs, "failovers": result.failovers,
                                "accepted": result.accepted_tokens, "draft_tokens": result.draft_tokens})
            except EdgeError as exc:
                errors[exc.code] += 1


def target_outputs(target: Path, max_new: int) -> dict[str, list[int]]:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target).eval()
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    outputs = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=model.config.pad_token_id)
        outputs[prompt] = out[0, ids.shape[1]:].tolist()
    return outputs


async def main_async(args: argparse.Namespace) -> dict:
    manifest = build_tiny_family(args.models, log=lambda message: None)
    target = args.models / manifest["target"]
    drafts = [args.models / spec["path"] for spec in manifest["drafts"].values()]
    args.workdir.mkdir(parents=True, exist_ok=True)
    broker, port = start_dev_broker(args.workdir / "broker")
    url = f"mqtt://127.0.0.1:{port}"
    verifiers = Verifiers(url, target, args.verifiers, args.workdir)
    records: list[dict] = []
    errors: Counter[str] = Counter()
    try:
        await verifiers.wait_online()
        print(f"load: {args.devices} devices x {args.duration_s} s, {args.verifiers} verifiers"
              f"{f', killing one every {args.kill_every_s} s' if args.kill_every_s else ''}", flush=True)
        started = time.monotonic()
        until_s = started + args.duration_s
        async with asyncio.TaskGroup() as group:
            for i in range(args.devices):
                config = EdgeConfig(draft=str(drafts[i % len(drafts)]), mqtt_url=url, device_id=f"load-d{i}",
                                    timeout_s=2.0, retries=10, discovery_timeout_s=10.0)
                group.create_task(device_loop(config, until_s, args.max_new_tokens, i, records, errors))
            if args.kill_every_s:
                group.create_task(verifiers.chaos(args.kill_every_s, until_s))
        wall_s = time.monotonic() - started
    finally:
        verifiers.stop()
        broker.terminate()
        broker.wait(timeout=10)
    expected = target_outputs(target, args.max_new_tokens)
    wrong = sum(sum(a != b for a, b in zip(r["tokens"], expected[r["prompt"]])) + abs(len(r["tokens"]) - len(expected[r["prompt"]]))
                for r in records)
    tokens = sum(len(r["tokens"]) for r in records)
    report = {
        "devices": args.devices, "duration_s": args.duration_s, "verifiers": args.verifiers,
        "verifier_kills": verifiers.kills, "sessions_completed": len(records),
        "sessions_lost": sum(errors.values()), "errors_by_kind": dict(errors), "wrong_tokens": wrong,
        "tokens": tokens, "tokens_per_s": round(tokens / wall_s, 1),
        "rounds": sum(r["rounds"] for r in records), "retries": sum(r["retries"] for r in records),
        "resyncs": sum(r["resyncs"] for r in records), "failovers": sum(r["failovers"] for r in records),
        "mean_accepted_length": round(sum(r["rounds"] + r["accepted"] for r in records) / max(1, sum(r["rounds"] for r in records)), 3),
    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--verifiers", type=int, default=2)
    parser.add_argument("--kill-every-s", type=float, default=0.0, help="SIGKILL a random verifier this often (0: never)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--models", type=Path, default=ROOT / "models" / "build" / "tiny")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "load")
    args = parser.parse_args()
    configure_logging("error")  # the report is the output; failovers and retries are counted in it
    report = asyncio.run(main_async(args))
    (args.workdir / "results.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"  {key:<22} {value}")
    ok = report["sessions_lost"] == 0 and report["wrong_tokens"] == 0
    print("PASS: no session lost, no wrong token" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
