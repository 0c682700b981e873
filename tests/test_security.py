"""The production broker config with real Mosquitto: TLS with a CA made here, a password per account,
ACLs that keep each device to its own topics (checked also with mosquitto_pub / mosquitto_sub), and a
whole generation over it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import aiomqtt
import openai
import pytest

from conftest import PROMPTS, ROOT, start_verifier
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_protocol import Limits, topics
from sled_protocol.devbroker import free_port, wait_for_port
from sled_protocol.mqtt import make_client
from sled_protocol.transport import parse_broker_url

pytestmark = pytest.mark.integration


class ProdBroker:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        subprocess.run([ROOT / "scripts" / "broker-certs.sh", workdir, "localhost"], check=True, capture_output=True)
        self.urls = {}
        for kind, name in (("device", "dev-a"), ("device", "dev-b"), ("verifier", "vsec"), ("inspector", "ops")):
            line = subprocess.run([ROOT / "scripts" / "broker-credentials.sh", kind, name, workdir, "localhost"],
                                  check=True, capture_output=True, text=True).stdout.strip()
            self.urls[name] = line.split("=", 1)[1].replace(":8883", f":{self.port}")
        conf = (ROOT / "broker" / "mosquitto-prod.conf").read_text()
        conf = conf.replace("/etc/mosquitto/sled/", f"{workdir}/").replace("/var/lib/mosquitto/", f"{workdir}/")
        conf = re.sub(r"(?m)^listener 8883$", f"listener {self.port} 127.0.0.1", conf)
        # Started as root, mosquitto drops to the 'mosquitto' user, which cannot read a root-only test dir.
        conf += "\nuser root\n"
        (workdir / "mosquitto.conf").write_text(conf)
        with (workdir / "mosquitto.log").open("wb") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(workdir / "mosquitto.conf")],
                                            stdout=subprocess.DEVNULL, stderr=log)
        wait_for_port(self.port)

    def password(self, name: str) -> str:
        return self.urls[name].split("://", 1)[1].split("@")[0].split(":")[1]

    def client(self, name: str, password: str | None = None, identifier: str | None = None,
               will: aiomqtt.Will | None = None) -> aiomqtt.Client:
        context = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        return aiomqtt.Client("localhost", self.port, username=name, password=password or self.password(name),
                              tls_context=context, will=will, protocol=aiomqtt.ProtocolVersion.V5,
                              identifier=f"{name}-{uuid.uuid4().hex[:6]}" if identifier is None else identifier)

    def cli_args(self, tool: str, name: str, *args: str) -> list[str]:
        return [tool, "-h", "localhost", "-p", str(self.port), "--cafile", str(self.dir / "ca.crt"),
                "-u", name, "-P", self.password(name), "-V", "mqttv5", *args]

    def cli(self, tool: str, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.cli_args(tool, name, *args), capture_output=True, text=True, timeout=20)

    def log(self) -> str:
        return (self.dir / "mosquitto.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def prod_broker(tmp_path_factory):
    broker = ProdBroker(tmp_path_factory.mktemp("prod-broker"))
    yield broker
    broker.process.terminate()
    broker.process.wait(timeout=10)


LINE_BUFFERED = ["stdbuf", "-oL"]  # a CLI's stdout into a pipe is block-buffered: its debug lines would wait


def wait_for_line(process: subprocess.Popen, text: str) -> str:
    """Read a ``-d`` (debug) mosquitto CLI's output until a line holds ``text``: the CLI's own signal that it got
    that far (e.g. "SUBACK": its subscription is in place). Returns what it read."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{process.args[0]} ended before printing {text!r}:\n{''.join(seen)}")


async def received_within(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got = []
    try:
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                got.append((str(message.topic), bytes(message.payload)))
    except TimeoutError:
        pass
    return got


@pytest.mark.asyncio
async def test_a_device_cannot_publish_as_another(prod_broker):
    async with prod_broker.client("vsec") as verifier:
        await verifier.subscribe(topics.drafts_filter("vsec"))
        async with prod_broker.client("dev-a") as device:  # closed before the CLI logs in as dev-a too
            await device.publish(topics.draft_topic("vsec", "dev-b"), b"spoofed", qos=1)
            await device.publish(topics.draft_topic("vsec", "dev-a"), b"own", qos=1)
        cli = prod_broker.cli("mosquitto_pub", "dev-a", "-t", topics.draft_topic("vsec", "dev-b"), "-m", "cli-spoofed", "-q", "1")
        got = await received_within(verifier, 1.5)
    assert got == [(topics.draft_topic("vsec", "dev-a"), b"own")]
    assert "cli-spoofed" not in str(got)  # not delivered...
    assert cli.returncode == 0 and "Not authorized" in cli.stderr  # ...because the broker refused it (MQTT 5 PUBACK)


@pytest.mark.asyncio
async def test_a_device_cannot_read_another_devices_verdicts(prod_broker):
    spy = subprocess.Popen([*LINE_BUFFERED, "mosquitto_sub", "-h", "localhost", "-p", str(prod_broker.port), "--cafile",
                            str(prod_broker.dir / "ca.crt"), "-u", "dev-a", "-P", prod_broker.password("dev-a"),
                            "-V", "mqttv5", "-t", topics.verdict_topic("dev-b"), "-C", "1", "-W", "5", "-d"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    async with prod_broker.client("dev-b") as owner, prod_broker.client("vsec") as verifier:
        await owner.subscribe(topics.verdict_topic("dev-b"))
        spied = await asyncio.to_thread(wait_for_line, spy, "SUBACK")  # the spy is subscribed: now publish
        await verifier.publish(topics.verdict_topic("dev-b"), b"for dev-b only", qos=1)
        assert await received_within(owner, 1.5) == [(topics.verdict_topic("dev-b"), b"for dev-b only")]
    out, _ = spy.communicate(timeout=10)
    assert "for dev-b only" not in spied + out  # the spy's subscription delivered nothing
    # and a device cannot pose as the verifier either
    async with prod_broker.client("dev-a") as device, prod_broker.client("dev-b") as victim:
        await victim.subscribe(topics.verdict_topic("dev-b"))
        await device.publish(topics.verdict_topic("dev-b"), b"forged verdict", qos=1)
        assert await received_within(victim, 1.0) == []


@pytest.mark.asyncio
async def test_a_device_cannot_take_over_the_verifiers_or_another_devices_connection(prod_broker):
    """Issue 15: the broker uses the username as client id, so a device logging in with the verifier's
    client id (or another device's, or none) gets its own connection and disconnects nobody."""
    status = topics.status_topic("vsec")
    will = aiomqtt.Will(status, b"offline-by-will", qos=1, retain=True)
    log_start = len(prod_broker.log())
    async with prod_broker.client("vsec", identifier="sled-verifier-vsec", will=will) as verifier, \
            prod_broker.client("dev-b", identifier="sled-edge-dev-b-1234") as victim:
        await verifier.subscribe(topics.drafts_filter("vsec"))
        await verifier.publish(status, b"online", qos=1, retain=True)
        await victim.subscribe(topics.verdict_topic("dev-b"))
        await victim.subscribe(status, qos=1)
        assert await received_within(victim, 1.0) == [(status, b"online")]
        # 1. the takeover attempts: each one a real login of dev-a with a foreign (or empty) client id
        for stolen_id in ("sled-verifier-vsec", "vsec", "dev-b", "sled-edge-dev-b-1234"):
            attack = prod_broker.cli("mosquitto_pub", "dev-a", "-i", stolen_id, "-q", "1",
                                     "-t", topics.draft_topic("vsec", "dev-a"), "-m", f"as {stolen_id}")
            assert attack.returncode == 0, attack.stderr  # dev-a's own rights still work under any id
        async with prod_broker.client("dev-a", identifier="") as anonymous_id:
            await anonymous_id.publish(topics.draft_topic("vsec", "dev-a"), b"no id", qos=1)
        # 2. the legitimate clients are still connected and still work
        await verifier.publish(topics.verdict_topic("dev-b"), b"verdict", qos=1)
        await verifier.publish(status, b"still online", qos=1, retain=True)
        drafts = await received_within(verifier, 1.0)
        seen_by_victim = await received_within(victim, 1.0)
    assert seen_by_victim == [(topics.verdict_topic("dev-b"), b"verdict"), (status, b"still online")]
    assert [payload for _, payload in drafts] == [b"as sled-verifier-vsec", b"as vsec", b"as dev-b",
                                                  b"as sled-edge-dev-b-1234", b"no id"]
    assert "already connected" not in prod_broker.log()[log_start:]  # the broker closed no connection
    still = prod_broker.cli("mosquitto_sub", "dev-b", "-t", status, "-C", "1", "-W", "3")
    assert still.stdout.strip() == "still online"  # no will fired while the verifier was connected


@pytest.mark.asyncio
async def test_an_account_connects_under_its_username():
    """What the production broker enforces, the services do themselves: with an account, its name is the id."""
    with_account = make_client(parse_broker_url("mqtts://dev-a:pw@broker.lan"), "sled-edge-dev-a-1234")
    without = make_client(parse_broker_url("mqtt://127.0.0.1:1884"), "sled-edge-dev-a-1234")
    assert (with_account.identifier, without.identifier) == ("dev-a", "sled-edge-dev-a-1234")


@pytest.mark.asyncio
async def test_a_devices_will_cannot_mark_a_verifier_offline(prod_broker):
    """The ACL applies to last wills: a device's will on a verifier's status topic is never published."""
    status = topics.status_topic("vsec")
    async with prod_broker.client("vsec") as verifier, prod_broker.client("dev-b") as watcher:
        await verifier.publish(status, b"online", qos=1, retain=True)
        await watcher.subscribe(status, qos=1)
        assert await received_within(watcher, 1.0) == [(status, b"online")]
        hostile = subprocess.Popen([*LINE_BUFFERED, *prod_broker.cli_args(
            "mosquitto_sub", "dev-a", "-t", topics.verdict_topic("dev-a"), "--will-topic", status,
            "--will-payload", "forged offline", "--will-retain", "--will-qos", "1", "-d")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        await asyncio.to_thread(wait_for_line, hostile, "SUBACK")  # connected, will registered
        hostile.kill()  # no DISCONNECT: the broker publishes the will, if it may
        hostile.communicate(timeout=10)  # reaped, its pipe read and closed
        assert await received_within(watcher, 1.5) == []
    retained = prod_broker.cli("mosquitto_sub", "dev-b", "-t", status, "-C", "1", "-W", "3")
    assert retained.stdout.strip() == "online"


def test_a_device_keeps_retained_drafts_only_where_a_verifier_reads_them(prod_broker):
    """Drafts go only to verifiers with an account: a device cannot pile up retained messages under
    made-up verifier names (each up to max_packet_size, kept across restarts)."""
    for verifier in ("vsec", "no-such-verifier"):
        prod_broker.cli("mosquitto_pub", "dev-a", "-r", "-q", "1", "-t", topics.draft_topic(verifier, "dev-a"),
                        "-m", f"retained for {verifier}")
    seen = prod_broker.cli("mosquitto_sub", "ops", "-v", "-t", "sled/v1/drafts/#", "-W", "2")  # an inspector
    assert "retained for vsec" in seen.stdout and "no-such-verifier" not in seen.stdout
    prod_broker.cli("mosquitto_pub", "dev-a", "-r", "-q", "1", "-t", topics.draft_topic("vsec", "dev-a"), "-n")


@pytest.mark.asyncio
async def test_anonymous_and_wrong_passwords_are_refused(prod_broker):
    anonymous = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(prod_broker.port), "--cafile",
                                str(prod_broker.dir / "ca.crt"), "-t", "sled/v1/x", "-m", "x"],
                               capture_output=True, text=True, timeout=20)
    assert anonymous.returncode != 0
    with pytest.raises(aiomqtt.MqttError):
        async with prod_broker.client("dev-a", password="wrong"):
            pass


@pytest.mark.asyncio
async def test_generation_over_tls_with_credentials(prod_broker, tiny_models, reference, tmp_path):
    url = prod_broker.urls["vsec"]
    running = start_verifier(type("B", (), {"url": url})(), tiny_models.target, tmp_path, "vsec",
                             "--ca-file", str(prod_broker.dir / "ca.crt"))
    try:
        config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=prod_broker.urls["dev-a"], device_id="dev-a",
                            ca_file=str(prod_broker.dir / "ca.crt"))
        async with EdgeDevice(config) as device:
            prompt = device.encode_prompt(PROMPTS[0])
            result = await device.generate(prompt, 16)
        assert result.token_ids == reference(prompt, 16) and result.verifier == "vsec"
    finally:
        running.process.terminate()
        running.process.wait(timeout=15)


def test_no_password_or_key_in_any_log_line(prod_broker, tiny_models, tmp_path):
    """Issue 19 item 7: a verifier, a device's API and sled-inspect run with passwords in their URLs (and the API
    with a key), serve a request, fail a login; not one line of their logs holds a password or the key, while the
    URLs are logged, account names kept, passwords masked."""
    ca, api_key, wrong = str(prod_broker.dir / "ca.crt"), "key-" + uuid.uuid4().hex, uuid.uuid4().hex
    secrets = [prod_broker.password(name) for name in ("vsec", "dev-a", "ops")] + [api_key, wrong]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLED_LOG_LEVEL": "debug", "SLED_CA_FILE": ca}
    running = start_verifier(type("B", (), {"url": prod_broker.urls["vsec"]})(), tiny_models.target, tmp_path, "vsec",
                             "--ca-file", ca)
    http_port, logs = free_port(), [running.log_path]
    with (tmp_path / "edge.log").open("wb") as edge_log:
        edge = subprocess.Popen([sys.executable, "-m", "sled_edge", "serve", "--mqtt-url", prod_broker.urls["dev-a"],
                                 "--draft", str(tiny_models.target_onnx), "--device-id", "dev-a", "--verifier", "vsec",
                                 "--http-port", str(http_port), "--metrics-port", "0", "--api-key", api_key],
                                stdout=subprocess.DEVNULL, stderr=edge_log, cwd=ROOT, env=env)
    logs.append(tmp_path / "edge.log")
    try:
        wait_for_port(http_port, timeout_s=60)
        inspect = subprocess.Popen([sys.executable, "-m", "sled_protocol.inspect", "--count", "2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                   env={**env, "SLED_MQTT_URL": prod_broker.urls["ops"]})
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=api_key, max_retries=0) as client:
            for _ in range(3):  # until sled-inspect has seen two messages
                client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0)
                if inspect.poll() is not None:
                    break
        inspected = inspect.communicate(timeout=60)
        refused = [subprocess.run([sys.executable, "-m", *tool], capture_output=True, text=True, cwd=ROOT, timeout=60,
                                  env={**env, "SLED_MQTT_URL": prod_broker.urls["dev-b"].replace(
                                      prod_broker.password("dev-b"), wrong)})
                   for tool in (["sled_edge", "generate", "--draft", str(tiny_models.target_onnx), "--prompt", "x",
                                 "--device-id", "dev-b", "--discovery-timeout-s", "2"], ["sled_protocol.inspect"])]
    finally:
        for process in (edge, running.process):
            process.terminate()
            process.wait(timeout=15)
    text = "\n".join(path.read_text(errors="replace") for path in logs) + "".join(inspected)
    text += "".join(done.stdout + done.stderr for done in refused)
    assert [secret for secret in secrets if secret in text] == []
    assert "vsec:***@localhost" in text and "target_loaded" in text  # the verifier's config was logged, masked
    assert all(done.returncode != 0 for done in refused) and "broker_unreachable" in text  # the failed logins logged


# -- broker settings for a hostile fleet (issue 19, item 9) ---------------------------------------------------

TOPIC_AND_HEADER = 1024  # a draft topic (two names of at most 128 characters) and the MQTT header, with room


def broker_settings(path: Path) -> dict[str, int]:
    """The numeric settings of a Mosquitto config, or of EMQX's/VerneMQ's (``key = 64KB``)."""
    units = {"KB": 1024, "MB": 1 << 20, "GB": 1 << 30}
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*(?:mqtt\.)?(\w+)\s*=?\s*(\d+)(KB|MB|GB)?\b", line)
        if match:
            found[match[1]] = int(match[2]) * units.get(match[3] or "", 1)
    return found


@pytest.mark.parametrize("conf", ["mosquitto-dev.conf", "mosquitto-prod.conf"])
def test_mosquitto_limits_are_sized_to_the_protocol(conf):
    settings, largest = broker_settings(ROOT / "broker" / conf), Limits().max_message_bytes + TOPIC_AND_HEADER
    assert largest <= settings["max_packet_size"] <= 2 * largest  # the largest valid draft passes, little more
    assert settings["max_packet_size"] <= settings["max_queued_bytes"] <= 64 * settings["max_packet_size"]
    assert settings["memory_limit"] >= 1024 * settings["max_packet_size"]


def test_the_untested_brokers_examples_are_sized_and_bind_ids():
    largest = Limits().max_message_bytes + TOPIC_AND_HEADER
    emqx, vernemq = (ROOT / "broker" / "emqx.conf").read_text(), (ROOT / "broker" / "vernemq.conf").read_text()
    assert largest <= broker_settings(ROOT / "broker" / "emqx.conf")["max_packet_size"] <= 2 * largest
    assert largest <= broker_settings(ROOT / "broker" / "vernemq.conf")["max_message_size"] <= 2 * largest
    assert "use_username_as_clientid = true" in emqx and "vernemq-sled.lua" in vernemq
    acl = (ROOT / "broker" / "emqx-acl.conf").read_text().splitlines()
    first_rule = next(line for line in acl if line.startswith("{"))
    assert first_rule == '{deny, all, {publish, {retain, true}}, ["sled/v1/drafts/#"]}.'  # before any allow
    lua = (ROOT / "broker" / "vernemq-sled.lua").read_text()
    assert "reg.client_id ~= reg.username" in lua and "pub.retain" in lua


async def publish_largest_and_larger(publisher, subscriber, topic: str, max_packet_size: int) -> list[int]:
    """The largest valid message, then one past the broker's packet limit: the sizes the subscriber got."""
    await publisher.publish(topic, b"x" * Limits().max_message_bytes, qos=0)
    with contextlib.suppress(aiomqtt.MqttError):  # the broker drops the connection of whoever sends it
        await publisher.publish(topic, b"y" * max_packet_size, qos=0)
        await asyncio.sleep(0.5)
    return [len(payload) for _, payload in await received_within(subscriber, 1.5)]


@pytest.mark.asyncio
async def test_the_largest_draft_passes_the_production_broker_and_more_does_not(prod_broker):
    limit = broker_settings(ROOT / "broker" / "mosquitto-prod.conf")["max_packet_size"]
    async with prod_broker.client("vsec") as verifier:
        await verifier.subscribe(topics.drafts_filter("vsec"))
        device = prod_broker.client("dev-a")
        with contextlib.suppress(aiomqtt.MqttError):
            async with device:
                sizes = await publish_largest_and_larger(device, verifier, topics.draft_topic("vsec", "dev-a"), limit)
    assert sizes == [Limits().max_message_bytes]


@pytest.mark.asyncio
async def test_the_largest_draft_passes_the_dev_broker_and_more_does_not(broker):
    limit = broker_settings(ROOT / "broker" / "mosquitto-dev.conf")["max_packet_size"]
    address = parse_broker_url(broker.url)
    verifier_id, device_id = f"v-{uuid.uuid4().hex[:6]}", f"d-{uuid.uuid4().hex[:6]}"
    async with make_client(address, verifier_id) as verifier:
        await verifier.subscribe(topics.drafts_filter(verifier_id))
        device = make_client(address, device_id)
        with contextlib.suppress(aiomqtt.MqttError):
            async with device:
                sizes = await publish_largest_and_larger(device, verifier, topics.draft_topic(verifier_id, device_id),
                                                         limit)
    assert sizes == [Limits().max_message_bytes]
