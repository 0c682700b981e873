"""A throwaway RabbitMQ cluster on loopback for tests: a few nodes with the MQTT plugin, beside any system instance.

Every node has its own name, ports (AMQP, MQTT, Erlang distribution), config, data and log directories under
``workdir``; the cluster has its own Erlang cookie (a private ``HOME``) and its own epmd on a free port, so
nothing is shared with a RabbitMQ already running on the default ports. Node 0 starts as a new cluster; the
others name it for classic-config peer discovery and join it at first boot, once it has booted alone (joining
a node still migrating its schema can fail). Readiness is what RabbitMQ reports, never a sleep: ``rabbitmqctl wait`` on each node's pid file, then
``await_online_nodes`` for the whole cluster, then each MQTT listener accepting connections.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sled_protocol.devbroker import free_port, wait_for_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's rabbitmq-server; /usr/sbin wrappers would su to rabbitmq
START_TIMEOUT_S = 120


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if not (RABBITMQ_BIN / "rabbitmq-server").exists() or not shutil.which("epmd"):
        return "rabbitmq-server is not installed (apt-get install rabbitmq-server: RabbitMQ 3.10 with its MQTT plugin)"
    return None


def _die_with_parent() -> None:
    """``preexec_fn``: SIGTERM this child when the test process dies, however it dies (the rabbitmq-server script
    stops its node on SIGTERM), so an interrupted run leaves no broker behind."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Node:
    name: str          # Erlang node name, e.g. sled-test-0@localhost
    mqtt_port: int
    directory: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        logs = sorted((self.directory / "log").glob("*.log")) + [self.directory / "stdout.log"]
        text = "\n".join(path.read_text(errors="replace") for path in logs if path.exists())
        return "\n".join(text.splitlines()[-lines:])


class RabbitCluster:
    def __init__(self, workdir: Path, size: int = 3, prefix: str = "sled-test") -> None:
        self.workdir = workdir
        home = workdir / "home"  # the cookie lives in $HOME for the nodes and for rabbitmqctl alike
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (workdir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf (the system node's)
        self.epmd_port = free_port()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        base_env.update(HOME=str(home), ERL_EPMD_PORT=str(self.epmd_port),
                        RABBITMQ_CONF_ENV_FILE=str(workdir / "rabbitmq-env.conf"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=str(workdir / "enabled_plugins"))
        self.base_env = base_env
        names = [f"{prefix}-{index}@localhost" for index in range(size)]
        self.nodes = [self._node(names, index) for index in range(size)]
        self.epmd: subprocess.Popen | None = None

    def _node(self, names: list[str], index: int) -> Node:
        directory = self.workdir / names[index].split("@")[0]
        directory.mkdir()
        mqtt_port = free_port()
        config = [f"listeners.tcp.default = 127.0.0.1:{free_port()}",
                  f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}",
                  "mqtt.tcp_listen_options.nodelay = true",  # small messages, many round trips: Nagle off
                  "mqtt.allow_anonymous = true"]
        if index:  # join node 0, waiting for it as long as the test would
            config += ["cluster_formation.peer_discovery_backend = classic_config",
                       f"cluster_formation.classic_config.nodes.1 = {names[0]}",
                       "cluster_formation.discovery_retry_interval = 500",
                       f"cluster_formation.discovery_retry_limit = {2 * START_TIMEOUT_S}"]
        (directory / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        env = dict(self.base_env, RABBITMQ_NODENAME=names[index],
                   RABBITMQ_CONFIG_FILE=str(directory / "rabbitmq.conf"),
                   RABBITMQ_ADVANCED_CONFIG_FILE=str(directory / "advanced.config"),
                   RABBITMQ_MNESIA_BASE=str(directory / "mnesia"), RABBITMQ_LOG_BASE=str(directory / "log"),
                   RABBITMQ_PID_FILE=str(directory / "pid"), RABBITMQ_DIST_PORT=str(free_port()),
                   RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
        return Node(names[index], mqtt_port, directory, env)

    def start(self) -> None:
        self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     env=self.base_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        wait_for_port(self.epmd_port)
        # Node 0 boots alone first: a node joining one that is still creating its schema and enabling its
        # feature flags can copy a half-migrated schema and fail to boot (schema_integrity_check_failed,
        # seen here once). The others then join a finished node, together.
        self._launch(self.nodes[0])
        self._ctl(self.nodes[0], "wait", str(self.nodes[0].directory / "pid"), "--timeout", str(START_TIMEOUT_S))
        for node in self.nodes[1:]:
            self._launch(node)
        for node in self.nodes[1:]:
            self._ctl(node, "wait", str(node.directory / "pid"), "--timeout", str(START_TIMEOUT_S))
        self._ctl(self.nodes[0], "await_online_nodes", str(len(self.nodes)), "--timeout", str(START_TIMEOUT_S))
        for node in self.nodes:
            wait_for_port(node.mqtt_port)

    def _launch(self, node: Node) -> None:
        with (node.directory / "stdout.log").open("wb") as out:
            # Its own session: the node (a shell and the Erlang VM under it) is killed as one group.
            node.process = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=node.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def _ctl(self, node: Node, *args: str) -> str:
        command = [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args]
        result = subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[1:])} failed ({result.returncode}): {result.stderr.strip()}\n"
                               f"--- {node.name} log:\n{node.log_tail()}")
        return result.stdout

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes as a surviving node sees them."""
        survivor = next(node for node in self.nodes if node.alive())
        return json.loads(self._ctl(survivor, "cluster_status", "--formatter", "json"))["running_nodes"]

    def kill(self, node: Node) -> None:
        """SIGKILL to the node's process group: no goodbye to clients or peers, as a crashed machine leaves them."""
        if node.process is None:
            return
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone, the whole group
        node.process.wait(timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)  # the data directories are thrown away: no clean stop needed
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(timeout=10)
