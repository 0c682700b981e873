"""One benchmark device: a separate process running its sessions concurrently, reporting JSON on stdout.

python bench/worker.py --mqtt-url URL --draft DIR --device-id ID --verifier V --prompts FILE --indices 0,3,6
    --max-new-tokens N --draft-tokens K --start-at UNIX_TIME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sled_edge.client import EdgeDevice  # noqa: E402
from sled_edge.config import EdgeConfig  # noqa: E402
from sled_protocol.logs import configure_logging  # noqa: E402


def peak_rss_bytes() -> int:
    """VmHWM of this process (ru_maxrss would count the forked parent's pages from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class RoundTrips:
    def __init__(self) -> None:
        self.samples: list[float] = []

    def round_done(self, k: int, accepted: int, committed: int, round_trip_s: float) -> None:
        self.samples.append(round_trip_s)


async def main_async(args: argparse.Namespace) -> dict:
    prompts = json.loads(Path(args.prompts).read_text())
    indices = [int(i) for i in args.indices.split(",")]
    trips = RoundTrips()
    config = EdgeConfig(draft=args.draft, mqtt_url=args.mqtt_url, device_id=args.device_id, verifier=args.verifier,
                        draft_tokens=args.draft_tokens, timeout_s=30.0, threads=1)
    async with EdgeDevice(config, observer=trips) as device:
        await device.choose_verifier()
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        started = time.perf_counter()
        results = await asyncio.gather(*(device.generate(prompts[i], args.max_new_tokens) for i in indices))
        wall_s = time.perf_counter() - started
    return {
        "device": args.device_id, "wall_s": wall_s, "round_trips_s": trips.samples,
        "peak_rss_bytes": peak_rss_bytes(),
        "sessions": [{"index": i, "tokens": r.token_ids, "rounds": r.rounds, "draft_tokens": r.draft_tokens,
                      "accepted": r.accepted_tokens, "elapsed_s": r.elapsed_s} for i, r in zip(indices, results)],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--mqtt-url", "--draft", "--device-id", "--verifier", "--prompts", "--indices"):
        parser.add_argument(name, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--draft-tokens", type=int, default=0)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    configure_logging("error")
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
