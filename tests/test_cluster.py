"""SLED on a clustered broker: RabbitMQ 3.10's MQTT plugin, three nodes on loopback (``tests/rabbitcluster.py``).

What that broker changes: MQTT 3.1.1 only, and retained messages are kept per node and, in 3.10, given only to
subscriptions of the exact topic, so an edge never sees a verifier's retained status through ``verifiers/+``;
it finds verifiers by their periodic status alone. Verifiers and edges sit on different nodes, each with the
cluster's nodes as its broker list; one node is killed mid-generation and every session still ends with
exactly the target's own greedy output.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import rabbitcluster
from conftest import PROMPTS, Broker, start_verifier
from sled_edge.client import EdgeDevice
from sled_edge.config import EdgeConfig
from sled_protocol.config import ConfigError
from sled_protocol.transport import parse_broker_urls
from test_failover import RoundCounter

MAX_NEW_TOKENS = 60


def test_a_broker_list_is_a_cluster_s_nodes_in_order():
    assert [str(a) for a in parse_broker_urls("mqtt://a:1883, mqtt://b:1884,mqtts://c")] == [
        "mqtt://a:1883", "mqtt://b:1884", "mqtts://c:8883"]
    with pytest.raises(ValueError, match="must look like"):
        parse_broker_urls("mqtt://a:1883,")


def test_the_mqtt_version_is_checked_at_start(tiny_models):
    EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_protocol="3.1.1")
    with pytest.raises(ConfigError, match="MQTT protocol '4' must be one of 5, 3.1.1"):
        EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_protocol="4")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if (reason := rabbitcluster.missing()) is not None:
        pytest.skip(reason)
    started_s = time.monotonic()
    cluster = rabbitcluster.RabbitCluster(tmp_path_factory.mktemp("rabbitmq"), size=3)
    try:
        cluster.start()
        print(f"rabbitmq cluster of {len(cluster.nodes)} up in {time.monotonic() - started_s:.1f} s")
        yield cluster
    finally:
        cluster.stop()


def node_list(cluster: rabbitcluster.RabbitCluster, first: int) -> str:
    """Every node's URL, starting at node ``first``: the client connects there and moves on after a failure."""
    nodes = cluster.nodes[first:] + cluster.nodes[:first]
    return ",".join(node.url for node in nodes)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_sessions_finish_exactly_when_a_node_dies(cluster, tiny_models, reference, tmp_path):
    doomed, steady, _ = cluster.nodes  # a verifier on each of the first two nodes; edges on the first and last
    tag = uuid.uuid4().hex[:6]
    verifiers = await asyncio.gather(*(
        asyncio.to_thread(start_verifier, Broker(node_list(cluster, index), node.mqtt_port, node.process),
                          tiny_models.target, tmp_path, f"cl-{index}-{tag}", "--mqtt-protocol", "3.1.1")
        for index, node in ((0, doomed), (1, steady))))
    counter = RoundCounter(after=10)

    def edge(index: int, name: str) -> EdgeDevice:
        config = EdgeConfig(draft=str(tiny_models.gpt2_onnx), mqtt_url=node_list(cluster, index),
                            mqtt_protocol="3.1.1", device_id=f"cl-{name}-{tag}", timeout_s=1.0, retries=10)
        return EdgeDevice(config, observer=counter)

    rounds_at_kill: list[int] = []

    async def kill_doomed_node() -> None:
        await counter.reached.wait()
        rounds_at_kill.append(counter.rounds)
        await asyncio.to_thread(cluster.kill, doomed)

    try:
        async with edge(0, "a") as on_doomed, edge(2, "c") as elsewhere:
            # No retained status reaches these edges: they find both verifiers by the periodic status, with the
            # defaults (a status every 3 s) well within the default discovery timeout.
            for device in (on_doomed, elsewhere):
                await asyncio.wait_for(all_online(device, {v.verifier_id for v in verifiers}),
                                       timeout=device.config.discovery_timeout_s)
            prompt_ids = [on_doomed.encode_prompt(p) for p in PROMPTS[:3]]
            async with asyncio.TaskGroup() as group:
                runs = [group.create_task(device.generate(ids, MAX_NEW_TOKENS))
                        for device in (on_doomed, elsewhere) for ids in prompt_ids]
                group.create_task(kill_doomed_node())
            assert on_doomed.connection.reconnects >= 1  # it moved to a surviving node
        for run, ids in zip(runs, prompt_ids * 2):
            assert run.result().token_ids == reference(ids, MAX_NEW_TOKENS)
        assert counter.rounds > rounds_at_kill[0]  # the sessions were mid-generation when the node died
        assert sorted(cluster.running_nodes()) == sorted(node.name for node in cluster.nodes[1:])
        assert all(v.process.poll() is None for v in verifiers)
        assert "broker_connection_lost" in verifiers[0].log_path.read_text()  # and it reconnected elsewhere
    finally:
        for running in verifiers:
            running.process.terminate()
        for running in verifiers:
            running.process.wait(timeout=15)


async def all_online(device: EdgeDevice, verifier_ids: set[str]) -> None:
    """Until ``device`` holds an online status of every verifier in ``verifier_ids``."""
    while not all(vid in device.directory.statuses and device.directory.statuses[vid].online for vid in verifier_ids):
        device.connection.status_changed.clear()
        await device.connection.status_changed.wait()
