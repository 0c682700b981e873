"""An emulated fleet: N devices in one process, each its own MQTT client speaking the real wire protocol.

Drafting costs the server nothing, as with real separate devices. Every device knows the target's own
greedy continuation of its prompts (computed once by ``bench/fleet.py``, unbatched) and "drafts" it (each
session is the edge's own ``EdgeSession``: its drafts, context and applied verdicts): the
token at draft position j is the target's with the device class's conditional acceptance probability
``acceptance[j]``, otherwise another id. It sleeps ``k x draft_ms_per_token`` plus a network delay with
jitter before each draft and a network delay before it acts on each verdict. Sessions start spread over
a ramp and run back to back with varied prompt and output lengths.

Devices start new sessions until the end of the measurement window, which opens after a warm-up long
enough for sessions to be staggered (each device's sessions start when its last ended), so the window
holds the steady mix of prefill and decoding; sessions under way then run to their end (the drain is not
measured: a real service has none). Every verdict is checked: the accepted count and the next token must be exactly the target's; a mismatch
counts as wrong (the bench exits non-zero). Prints one JSON report on stdout.

python bench/fleet_devices.py --spec FILE   (written by bench/fleet.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sled_edge.controller import DraftLengthController, StepPrice  # noqa: E402
from sled_edge.session import EdgeSession, VerdictMismatch  # noqa: E402
from sled_protocol import Close, Draft, VerdictKind, encode  # noqa: E402
from sled_protocol import topics  # noqa: E402
from sled_protocol.codec import decode_status  # noqa: E402
from sled_protocol.codec import decode_verdict  # noqa: E402
from sled_protocol.mqtt import make_client  # noqa: E402
from sled_protocol.transport import parse_broker_url  # noqa: E402

RETRY_S = 10.0  # resend a round whose verdict has not come back (QoS 0); never expected in a healthy run


@dataclass(frozen=True)
class DeviceClass:
    name: str
    draft_ms_per_token: float
    acceptance: tuple[float, ...]   # P(draft token j is the target's | tokens before it were), j = 0..k-1
    k: int = 4


@dataclass
class SessionRecord:
    device: str
    klass: str
    started_s: float
    ended_s: float = 0.0
    tokens: int = 0           # committed after the prompt
    rounds: int = 0
    accepted: int = 0
    drafted: int = 0
    verifier_s: float = 0.0   # publish to verdict, summed over rounds: the verifier's queue and step (and the broker)
    ks: list[int] = field(default_factory=list)


class Tally:
    def __init__(self) -> None:
        self.sessions: list[SessionRecord] = []
        self.commits: list[tuple[float, int]] = []  # (monotonic time the verdict arrived, tokens it committed)
        self.wrong: list[str] = []
        self.errors: dict[str, int] = {}
        self.resyncs = 0
        self.retries = 0
        self.prices: list[tuple[float, tuple[float, ...]]] = []  # (when, the announced price a round's k was chosen with)


def draft_tokens(rng: random.Random, truth: list[int], klass: DeviceClass, k: int, vocab: int, avoid: set[int]) -> list[int]:
    """k tokens: the target's own while the acceptance draws succeed, then ids that differ from it."""
    out, agreeing = [], True
    for j in range(k):
        agreeing = agreeing and rng.random() < klass.acceptance[min(j, len(klass.acceptance) - 1)]
        if agreeing:
            out.append(truth[j])
        else:
            wrong = rng.randrange(vocab)
            while wrong == truth[j] or wrong in avoid:
                wrong = rng.randrange(vocab)
            out.append(wrong)
    return out


async def run_device(spec: dict, index: int, klass: DeviceClass, pool: list[dict], tally: Tally, stop_at: float) -> None:
    rng = random.Random(spec["seed"] * 100_003 + index)
    device_id = f"fleet-{index}"
    vocab, verifier = spec["vocab_size"], spec["verifier"]
    avoid = set(spec["eos_ids"])
    rtt_lo, rtt_hi = spec["rtt_ms"]

    def one_way_s() -> float:  # half a round trip, uniform jitter between the bounds
        return rng.uniform(rtt_lo, rtt_hi) / 2000.0

    # k per round: the class's fixed k, or the device's own controller (``k_mode`` adaptive: its tokens/s alone;
    # priced: against the verifier's announced step cost, as a real device does by default).
    controller = None if spec.get("k_mode", "fixed") == "fixed" else DraftLengthController(k_max=spec.get("k_max", 8))
    price: list[StepPrice | None] = [None]
    async with make_client(parse_broker_url(spec["mqtt_url"]), device_id, keepalive_s=60) as client:
        await client.subscribe(topics.verdict_topic(device_id), qos=topics.QOS_VERDICT)
        if spec.get("k_mode") == "priced":
            await client.subscribe(topics.status_topic(verifier), qos=topics.QOS_STATUS)
        inbox: asyncio.Queue = asyncio.Queue()

        async def receive() -> None:
            async for message in client.messages:
                if str(message.topic) == topics.status_topic(verifier):
                    price[0] = StepPrice.from_wire(decode_status(bytes(message.payload)).step_cost)
                    continue
                inbox.put_nowait((time.monotonic(), decode_verdict(bytes(message.payload))))

        reader = asyncio.create_task(receive(), name=f"receive-{device_id}")
        await asyncio.sleep(max(0.0, spec["t0"] - time.monotonic()) + rng.uniform(0, spec["ramp_s"]))
        draft_topic = topics.draft_topic(verifier, device_id)
        try:
            while time.monotonic() < stop_at:
                entry = rng.choice(pool)
                prompt = entry["prompt"]  # its own length: the continuation belongs to exactly this prompt
                truth = entry["continuation"]
                out_len = min(rng.randint(*spec["output_tokens"]), len(truth))
                # The edge's own session: drafts, context on first send and resync, verdicts applied and checked.
                session = EdgeSession(uuid.uuid4().hex[:12], device_id, spec["vocab"], list(prompt),
                                      len(prompt) + out_len)
                record = SessionRecord(device_id, klass.name, time.monotonic())
                verdict = None
                while session.budget > 0 and session.finish is None:
                    done = len(session.committed) - len(prompt)
                    room = max(0, session.budget - 1)
                    k = min(klass.k, room) if controller is None else controller.choose(room, price[0])
                    if price[0] is not None:
                        p = price[0]
                        tally.prices.append((time.monotonic(), (p.fixed_s, p.per_draft_s, p.per_token_s, p.drafts_per_step)))
                    tokens = draft_tokens(rng, truth[done:], klass, k, vocab, avoid)
                    await asyncio.sleep(k * klass.draft_ms_per_token / 1000.0)
                    sent = time.monotonic()  # a device times its round from publishing to the verdict's arrival
                    await asyncio.sleep(one_way_s())
                    draft = session.draft(tokens)
                    published = time.monotonic()
                    verdict = await exchange(client, draft_topic, draft, inbox, tally)
                    record.verifier_s += time.monotonic() - published
                    await asyncio.sleep(one_way_s())
                    if verdict.kind is VerdictKind.RESYNC:
                        tally.resyncs += 1
                        session.send_context = True
                        continue
                    if verdict.kind is VerdictKind.ERROR:
                        tally.errors[str(verdict.error)] = tally.errors.get(str(verdict.error), 0) + 1
                        break
                    expected = next((j for j, t in enumerate(tokens) if t != truth[done + j]), len(tokens))
                    if controller is not None and draft.context is None:  # a round that carried context timed a prefill
                        controller.observe(k, min(verdict.accepted, k), k * klass.draft_ms_per_token / 1000.0,
                                           time.monotonic() - sent)
                    wrong = verdict.accepted != expected or verdict.next_token != truth[done + expected]
                    try:
                        committed = [] if wrong else session.apply(draft, verdict)
                    except VerdictMismatch:
                        wrong = True
                    if wrong:
                        tally.wrong.append(f"{device_id}/{session.session_id} round {draft.seq}: accepted "
                                           f"{verdict.accepted} next {verdict.next_token}, target says {expected} and "
                                           f"{truth[done + expected]}")
                        break
                    record.ks.append(len(tokens))
                    tally.commits.append((time.monotonic(), len(committed)))
                stats = session.stats
                record.rounds, record.accepted, record.drafted = stats.rounds, stats.accepted_tokens, stats.draft_tokens
                record.tokens, record.ended_s = len(session.committed) - len(prompt), time.monotonic()
                tally.sessions.append(record)
                if verdict is not None and (verdict.kind is not VerdictKind.VERIFIED or session.finish is None):
                    # ended by an error or a wrong verdict: free the verifier's slot now
                    await client.publish(draft_topic, encode(Close(device_id=device_id, session_id=session.session_id)))
        finally:
            reader.cancel()


async def exchange(client, topic: str, draft: Draft, inbox: asyncio.Queue, tally: Tally):
    """Publish ``draft`` and wait for its verdict (same session and seq), resending on a timeout."""
    payload = encode(draft)
    while True:
        await client.publish(topic, payload, qos=topics.QOS_DRAFT)
        try:
            async with asyncio.timeout(RETRY_S):
                while True:
                    _, verdict = await inbox.get()
                    if verdict.session_id == draft.session_id and verdict.seq == draft.seq:
                        return verdict
        except TimeoutError:
            tally.retries += 1


async def main_async(spec: dict) -> dict:
    pool = json.loads(Path(spec["pool"]).read_text())
    classes = [DeviceClass(c["name"], c["draft_ms_per_token"], tuple(c["acceptance"]), c["k"]) for c in spec["classes"]]
    tally = Tally()
    window = (spec["t0"] + spec["ramp_s"] + spec["warmup_s"], spec["t0"] + spec["ramp_s"] + spec["warmup_s"] + spec["duration_s"])
    stop_at = window[1]  # no new session after this
    async with asyncio.TaskGroup() as group:
        for index in range(spec["n"]):
            group.create_task(run_device(spec, index, classes[index % len(classes)], pool, tally, stop_at))
    sessions = [s for s in tally.sessions if s.rounds and window[0] <= s.ended_s < window[1]]
    return {
        "n": spec["n"], "committed": sum(tokens for at, tokens in tally.commits if window[0] <= at < window[1]),
        "committed_all": sum(tokens for _, tokens in tally.commits),
        "rounds_all": len(tally.commits),
        "announced_price": announced(tally.prices, window),
        "wrong": tally.wrong, "errors": tally.errors, "resyncs": tally.resyncs, "retries": tally.retries,
        "sessions": [{"klass": s.klass, "tokens": s.tokens, "seconds": s.ended_s - s.started_s, "rounds": s.rounds,
                      "accepted": s.accepted, "drafted": s.drafted, "verifier_s": s.verifier_s,
                      "k_mean": round(sum(s.ks) / max(1, len(s.ks)), 2), "k0_rounds": s.ks.count(0)} for s in sessions],
    }


def announced(prices: list[tuple[float, tuple[float, ...]]], window: tuple[float, float]) -> dict | None:
    """The verifier's announced step cost as the window's rounds chose k with: the median of each term (ms, and drafts
    per step), and what it prices one draft (its share of the fixed part plus per draft) against one scored token."""
    inside = [p for at, p in prices if window[0] <= at < window[1]]
    if not inside:
        return None
    fixed, per_draft, per_token, per_step = (sorted(column)[len(column) // 2] for column in zip(*inside))
    return {"fixed_ms": round(1000 * fixed, 3), "per_draft_ms": round(1000 * per_draft, 3),
            "per_token_ms": round(1000 * per_token, 3), "drafts_per_step": round(per_step, 1),
            "draft_over_token": round((fixed / max(1.0, per_step) + per_draft) / max(1e-9, per_token), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    print(json.dumps(asyncio.run(main_async(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
