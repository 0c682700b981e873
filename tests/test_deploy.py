"""Deployment keeps secrets where they belong (issue 19, item 7): `make deploy-*` copies what `make deploy-files`
lists, which holds no broker key, password file or env file even when a checkout has them; the copy lands in a
fresh root-owned `mktemp -d` on the host; the broker scripts keep their secrets outside the checkout."""

from __future__ import annotations

import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

# What an operator's checkout may hold after `make broker-certs BROKER_DIR=broker/prod` in an older version,
# a filled-in env file kept beside the examples, and the like: none of it may leave the machine.
PLANTED = ["broker/prod/ca.key", "broker/prod/server.key", "broker/prod/passwords", "broker/prod/acl",
           "broker/prod/ca.crt", "deploy/env/edge.env", "deploy/env/verifier.env", ".env", "sled_edge/stray.key",
           "certs/device.pem", "secrets/api-token", "broker/passwords"]
NEEDED = ["Makefile", "pyproject.toml", "README.md", "sled_edge/api.py", "sled_verifier/__main__.py",
          "deploy/env/edge.env.example", "deploy/env/verifier.env.example", "deploy/systemd/sled-verifier.service.in",
          "deploy/deploy.sh", "broker/mosquitto-prod.conf", "broker/acl.base"]


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of this checkout's files (tracked and new) with secrets planted where people put them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path / "checkout"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    for name in PLANTED:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text(f"SECRET {name}\n")
    return copy


def test_the_deploy_file_list_holds_no_secret(checkout):
    listed = make(checkout, "deploy-files")
    assert listed.returncode == 0, listed.stderr
    files = set(listed.stdout.split())
    assert [name for name in PLANTED if name in files] == []
    assert [name for name in NEEDED if name not in files] == []


def test_what_deploy_runs_copies_no_secret(checkout, tmp_path):
    """The very rsync command of the deploy plan, run to a local directory instead of the host's."""
    plan = make(checkout, "deploy-edge", "HOST=pi@pi5", "DRY_RUN=1")
    assert plan.returncode == 0, plan.stderr
    rsync = shlex.split(next(line for line in plan.stdout.splitlines() if line.startswith("+ rsync"))[2:])
    assert rsync[-1] == "pi@pi5:$SRC/" and "--exclude-from=deploy/exclude" in rsync
    target = tmp_path / "host-src"
    done = subprocess.run([arg for arg in rsync[:-1] if not arg.startswith("--rsync-path")] + [f"{target}/"],
                          cwd=checkout, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    copied = {str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()}
    assert [name for name in PLANTED if name in copied] == [] and not any("SECRET" in (target / name).read_text(
        errors="replace") for name in copied if (target / name).stat().st_size < 100)
    assert [name for name in NEEDED if name not in copied] == []
    assert copied == set(make(checkout, "deploy-files").stdout.split())  # the listing is what deploy copies


def test_deploy_dry_run_prints_the_plan():
    edge = make(ROOT, "deploy-edge", "HOST=pi@pi5.local", "INSTANCE=kitchen", "DRY_RUN=1")
    assert edge.returncode == 0, edge.stderr
    plan = edge.stdout.splitlines()
    # a fresh root-owned directory (mktemp -d: 0700, unguessable), never a fixed /tmp/sled-src
    assert plan[0] == "+ ssh pi@pi5.local sudo mktemp -d /tmp/sled-src.XXXXXXXXXX" and "/tmp/sled-src/" not in edge.stdout
    assert plan[1].startswith("+ rsync ") and "--rsync-path=sudo rsync" in plan[1] and "--no-owner" in plan[1]
    assert any("cd $SRC && sudo make install ROLE=edge INSTANCE=kitchen" in line for line in plan)
    assert any("systemctl enable sled-edge@kitchen" in line and "restart sled-edge@kitchen" in line for line in plan)
    assert plan[-1] == "+ ssh pi@pi5.local sudo rm -rf $SRC"
    verifier = make(ROOT, "deploy-verifier", "HOST=root@server", "DRY_RUN=1")
    assert verifier.returncode == 0 and "ROLE=verifier" in verifier.stdout and "restart sled-verifier" in verifier.stdout
    assert make(ROOT, "deploy-edge", "DRY_RUN=1").returncode != 0  # HOST is required
    install = make(ROOT, "install", "DRY_RUN=1", "ROLE=edge", "DESTDIR=/tmp/sled-stage")
    assert "torch" not in install.stdout and ".[service]" in install.stdout  # no torch on a device
    assert "torch==2.13.0" in make(ROOT, "install", "DRY_RUN=1", "ROLE=verifier", "DESTDIR=/tmp/sled-stage").stdout


def test_broker_secrets_are_kept_outside_the_checkout(tmp_path):
    assert "/etc/sled/broker" in make(ROOT, "broker-certs", "DRY_RUN=1").stdout  # the default, outside
    for script, args in (("broker-certs.sh", ["localhost"]), ("broker-credentials.sh", ["localhost"])):
        argv = [ROOT / "scripts" / script, ROOT / "broker" / "prod", *args] if script == "broker-certs.sh" else \
            [ROOT / "scripts" / script, "device", "d1", ROOT / "broker" / "prod" / ".." / "prod", *args]
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 78 and "inside the checkout" in refused.stderr
        assert not (ROOT / "broker" / "prod").exists()
    secrets = tmp_path / "broker"
    subprocess.run([ROOT / "scripts" / "broker-certs.sh", secrets, "localhost"], check=True, capture_output=True)
    line = subprocess.run([ROOT / "scripts" / "broker-credentials.sh", "device", "d1", secrets, "localhost"],
                          check=True, capture_output=True, text=True).stdout
    assert line.startswith("SLED_MQTT_URL=mqtts://d1:")
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for name in ("ca.key", "server.key", "passwords"):
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name


def test_the_units_cap_their_memory(tmp_path):
    """MemoryMax in both units (a runaway is killed and restarted, the host keeps its broker and sshd); the
    broker host's drop-in caps Mosquitto above its own memory_limit. systemd-analyze checks the syntax
    (tests/test_service.py)."""
    done = make(ROOT, "install-units", f"DESTDIR={tmp_path}", "PREFIX=/opt/sled", "SYSCONFDIR=/etc/sled")
    assert done.returncode == 0, done.stderr
    units = tmp_path / "etc" / "systemd" / "system"
    for unit in ("sled-verifier.service", "sled-edge@.service"):
        assert any(line.startswith("MemoryMax=") for line in (units / unit).read_text().splitlines()), unit
    drop_in = (ROOT / "deploy" / "systemd" / "mosquitto.service.d" / "sled.conf").read_text()
    assert "[Service]" in drop_in and "MemoryMax=1536M" in drop_in
