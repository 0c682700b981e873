"""The server's price of a draft and a token (issue 22, item 3): a table of calibrated step times, read at the
load the verifier runs, is what devices choose k against (``sled_verifier.price``), and a real verifier
announces it in its Status."""

from __future__ import annotations

import asyncio

import pytest

from conftest import serving
from sled_edge.controller import DraftLengthController, StepPrice, expected_tokens
from sled_protocol import decode_status, topics
from sled_protocol.mqtt import make_client
from sled_protocol.transport import parse_broker_url
from sled_verifier.price import StepTable

ALPHA = 0.75
SIZES, WIDTHS = (1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 9)


def roofline_s(drafts: float, width: float) -> float:
    """A step on one CPU core of SmolLM2's size: the weights' stream (40 ms) until the rows' arithmetic passes it
    (1.2 ms a token; the two joined smoothly, as a real core's are), plus 0.5 ms a row (attention, its cache) and
    5 ms whatever the step holds."""
    return 0.005 + 0.0005 * drafts + (0.040 ** 4 + (0.0012 * drafts * width) ** 4) ** 0.25


def calibrated(step=roofline_s) -> list[tuple[int, int, float]]:
    return [(d, d * w, step(d, w)) for _ in range(2) for d in SIZES for w in WIDTHS if d * w <= 256]  # as the engine


def controller() -> DraftLengthController:
    """A device that knows its acceptance (0.75 at every position) and drafts fast: only the price decides."""
    device = DraftLengthController(k_max=8, draft_s=0.001, round_s=0.05)
    device.offered, device.accepted = [1000.0] * 8, [1000.0 * ALPHA] * 8
    return device


def server_s_per_token(n: int, ks: list[int], step=roofline_s) -> float:
    """What the server really spends per committed token with n devices drafting ``ks`` in turn (the ceiling's
    measure at one k: T(N x (k + 1)) / (N x tau(k)); a mix: the step at its mean width)."""
    width = sum(k + 1 for k in ks) / len(ks)
    return step(n, width) / (n * sum(expected_tokens([ALPHA] * 8, k) for k in ks) / len(ks))


def settled(n: int, price_at, rounds: int = 300) -> list[int]:
    """The ks a fleet of n like devices drafts once settled, the price read as the service reads it: at the recent
    mean width of its steps (a moving average, weight 0.1)."""
    width, ks = 5.0, []
    for _ in range(rounds):
        ks.append(controller().best(price=StepPrice(*price_at(n, width))))
        width = 0.9 * width + 0.1 * (ks[-1] + 1)
    return ks[-100:]


@pytest.mark.parametrize("n", [1, 4, 8, 16, 24, 48, 64, 128])
def test_the_devices_settle_on_the_k_that_costs_the_server_least_at_every_load(n):
    table = StepTable.from_samples(calibrated())
    cheapest = min(server_s_per_token(n, [k]) for k in range(9))
    # within the controller's near-equal rule (3%: then the faster k) and the grid's resolution, at the loads the
    # table timed, between them and past them (128 > 64)
    assert server_s_per_token(n, settled(n, table.price)) <= 1.05 * cheapest


def test_live_steps_move_the_level_not_the_split():
    table = StepTable.from_samples(calibrated())
    before = table.price(48, 2)
    for _ in range(200):  # the service's steps run 1.5x slower than calibration (a colder, busier core)
        table.observe(48, 96, 1.5 * roofline_s(48, 2))
    after = table.price(48, 2)
    assert table.level == pytest.approx(1.5, rel=0.02)
    assert after[2] == pytest.approx(1.5 * before[2], rel=0.02) and after[0] == pytest.approx(1.5 * before[0], rel=0.02)
    assert table.predict(48, 2) == pytest.approx(1.5 * roofline_s(48, 2), rel=0.05)
    table.observe(48, 96, 1e6)  # one absurd step moves the level a bounded step, not to a million
    assert table.level <= 1.5 + 0.05 * (5.0 - 1.5) + 0.01  # clamped at 5x, then a 5% step


def test_a_table_needs_a_complete_grid_and_takes_the_fastest_repeat():
    assert StepTable.from_samples([]) is None
    assert StepTable.from_samples([(1, 1, 0.04), (2, 2, 0.05)]) is None  # one width each: no slope
    table = StepTable.from_samples([(1, 1, 0.05), (1, 1, 0.04), (1, 3, 0.06), (4, 4, 0.07)])  # 4: one width
    assert table.drafts == [1] and table.widths == [[1, 3]] and table.seconds == [[0.04, 0.06]]
    fixed, per_draft, per_token, drafts = table.price(1, 2)
    assert per_token == pytest.approx(0.01) and fixed == pytest.approx(0.03) and per_draft == 0 and drafts == 1


@pytest.mark.asyncio
async def test_a_verifier_announces_its_price_in_its_status(verifier):
    """The session's verifier calibrated at start: its retained Status carries a step cost devices can price with."""
    async with make_client(parse_broker_url(verifier.url), "price-reader", keepalive_s=30) as client:
        await client.subscribe(topics.status_topic(verifier.verifier_id), qos=topics.QOS_STATUS)
        async with asyncio.timeout(30):
            async for message in client.messages:
                status = decode_status(bytes(message.payload))
                if status.online:
                    break
    price = StepPrice.from_wire(status.step_cost)
    assert price is not None and price.drafts_per_step >= 1 and price.per_token_s >= 0
    assert 0 < price.round_s(0) < price.round_s(8) or price.per_token_s == 0


@pytest.mark.asyncio
async def test_a_rounds_cost_outside_the_model_is_priced_per_draft(tiny_models):
    """At k = 0 a device pays a whole round (receive, schedule, bookkeeping, publish) for every token; the forward
    alone does not show it, so the announced per-draft term is the service's measured time outside the model a
    verified draft (in-memory transport, the tiny target)."""
    import uuid

    from sled_protocol import Draft, decode_verdict, encode
    from sled_protocol.transport import transport_for
    from sled_protocol.vocab import vocab_hash
    from sled_verifier.config import VerifierConfig
    from sled_verifier.engine import VerifierEngine
    from sled_verifier.runtime import load_target
    from sled_verifier.service import VerifierService
    from sled_verifier.stats import VerifierStats

    url = f"memory://price-{uuid.uuid4().hex[:8]}"
    target = load_target(tiny_models.target, "transformers", device="cpu")
    engine = VerifierEngine(target, "priced", max_sessions=8, stats=VerifierStats())
    service = VerifierService(VerifierConfig(target=str(tiny_models.target), mqtt_url=url, verifier_id="priced",
                                             metrics_port=0), engine, vocab_hash(tiny_models.target))
    service.pricing.table = StepTable.from_samples(engine.calibrate(batch_sizes=(1, 4)))
    assert service.step_cost()[1] == 0.0  # nothing served yet
    async with serving(service):
        async with transport_for(parse_broker_url(url)).connect("dev") as device:
            await device.subscribe(topics.verdict_topic("dev"), qos=topics.QOS_VERDICT)
            for session in range(6):
                draft = Draft("dev", f"s{session}", 0, base_len=4, tokens=(), max_len=32, vocab=service.vocab,
                              context=(5, 6, 7, 8))
                await device.publish(topics.draft_topic("priced", "dev"), encode(draft))
                async with asyncio.timeout(30):
                    async for message in device.messages():
                        assert decode_verdict(bytes(message.payload)).session_id == f"s{session}"
                        break
    fixed, per_draft, per_token, drafts = service.step_cost()
    assert per_draft == service.pricing.overhead_s > 0
    announced = service.pricing.table.price(service.pricing.drafts_per_step, service.pricing.tokens_per_draft)
    assert (fixed, per_token) == pytest.approx(announced[::2])
