"""Start the project's dev/test Mosquitto (broker/mosquitto-dev.conf) on a chosen port, for tests and the demo."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DEV_CONF = Path(__file__).resolve().parent.parent / "broker" / "mosquitto-dev.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


def start_dev_broker(workdir: Path, port: int | None = None, conf: Path = DEV_CONF) -> tuple[subprocess.Popen, int]:
    """Copy ``conf`` with its listener moved to ``port`` (default: a free one), start mosquitto, wait for it."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        raise FileNotFoundError("mosquitto not found: apt-get install -y mosquitto mosquitto-clients (make setup does)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf_copy, log_path = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    conf_copy.write_text(re.sub(r"(?m)^listener \d+ ", f"listener {port} ", conf.read_text()))
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([mosquitto, "-c", str(conf_copy)], stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        raise RuntimeError(f"mosquitto did not start: {log_path.read_text(errors='replace')}") from None
    return process, port
