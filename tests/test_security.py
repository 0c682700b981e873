"""The production broker config with real Mosquitto: TLS with a CA made here, a password per account,
ACLs that keep each device to its own topics (checked also with mosquitto_pub / mosquitto_sub), and a
whole generation over it."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import uuid
from pathlib import Path

import aiomqtt
import pytest

from conftest import PROMPTS, ROOT, start_verifier
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_protocol import topics
from sled_protocol.devbroker import free_port, wait_for_port

pytestmark = pytest.mark.integration


class ProdBroker:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        subprocess.run([ROOT / "scripts" / "broker-certs.sh", workdir, "localhost"], check=True, capture_output=True)
        self.urls = {}
        for kind, name in (("device", "dev-a"), ("device", "dev-b"), ("verifier", "vsec")):
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

    def client(self, name: str, password: str | None = None) -> aiomqtt.Client:
        context = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        return aiomqtt.Client("localhost", self.port, username=name, password=password or self.password(name),
                              tls_context=context, identifier=f"{name}-{uuid.uuid4().hex[:6]}",
                              protocol=aiomqtt.ProtocolVersion.V5)

    def cli(self, tool: str, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([tool, "-h", "localhost", "-p", str(self.port), "--cafile", str(self.dir / "ca.crt"),
                               "-u", name, "-P", self.password(name), "-V", "mqttv5", *args],
                              capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def prod_broker(tmp_path_factory):
    broker = ProdBroker(tmp_path_factory.mktemp("prod-broker"))
    yield broker
    broker.process.terminate()
    broker.process.wait(timeout=10)


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
    async with prod_broker.client("vsec") as verifier, prod_broker.client("dev-a") as device:
        await verifier.subscribe(topics.drafts_filter("vsec"))
        await device.publish(topics.draft_topic("vsec", "dev-b"), b"spoofed", qos=1)
        await device.publish(topics.draft_topic("vsec", "dev-a"), b"own", qos=1)
        cli = prod_broker.cli("mosquitto_pub", "dev-a", "-t", topics.draft_topic("vsec", "dev-b"), "-m", "cli-spoofed", "-q", "1")
        got = await received_within(verifier, 1.5)
    assert got == [(topics.draft_topic("vsec", "dev-a"), b"own")]
    assert "cli-spoofed" not in str(got) and cli.returncode in (0, 1)  # refused by the broker, not delivered


@pytest.mark.asyncio
async def test_a_device_cannot_read_another_devices_verdicts(prod_broker):
    spy = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(prod_broker.port), "--cafile",
                            str(prod_broker.dir / "ca.crt"), "-u", "dev-a", "-P", prod_broker.password("dev-a"),
                            "-V", "mqttv5", "-t", topics.verdict_topic("dev-b"), "-C", "1", "-W", "3"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    async with prod_broker.client("dev-b") as owner, prod_broker.client("vsec") as verifier:
        await owner.subscribe(topics.verdict_topic("dev-b"))
        await asyncio.sleep(0.5)
        await verifier.publish(topics.verdict_topic("dev-b"), b"for dev-b only", qos=1)
        assert await received_within(owner, 1.5) == [(topics.verdict_topic("dev-b"), b"for dev-b only")]
    out, _ = spy.communicate(timeout=10)
    assert "for dev-b only" not in out  # the spy's subscription delivered nothing
    # and a device cannot pose as the verifier either
    async with prod_broker.client("dev-a") as device, prod_broker.client("dev-b") as victim:
        await victim.subscribe(topics.verdict_topic("dev-b"))
        await device.publish(topics.verdict_topic("dev-b"), b"forged verdict", qos=1)
        assert await received_within(victim, 1.0) == []


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
