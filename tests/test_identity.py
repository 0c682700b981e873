"""The target's identity (a hash over configuration and weights, cached) and the edge's rules built on it:
a session moves only to a verifier of the same target, and a former holder's verdicts are dropped."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sled_edge.placement import Placement, choose, describe
from sled_protocol import Status, Verdict, VerdictKind
from sled_verifier.identity import target_identity


def fake_target(directory: Path, weights: bytes = b"\x01" * 4096, **config) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, **config}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "tokenizer.json").write_text("{}")  # not part of the identity: the vocabulary hash covers it
    return directory


def test_identity_follows_weights_and_config_not_the_directory(tmp_path):
    cache = tmp_path / "cache"
    original = fake_target(tmp_path / "qwen-7b")
    identity = target_identity(original, "float32", cache)
    assert len(identity) == 16 and int(identity, 16) >= 0

    copied = shutil.copytree(original, tmp_path / "elsewhere" / "copy")
    renamed = original.rename(tmp_path / "renamed")
    assert target_identity(copied, "float32", cache) == identity
    assert target_identity(renamed, "float32", cache) == identity

    # Where and with which library a config was saved is provenance, not the model.
    config = json.loads((copied / "config.json").read_text())
    (copied / "config.json").write_text(json.dumps({**config, "_name_or_path": "/x", "transformers_version": "9"}))
    assert target_identity(copied, "float32", cache) == identity

    changed_weight = fake_target(tmp_path / "one-weight", weights=b"\x01" * 4095 + b"\x02")
    changed_config = fake_target(tmp_path / "one-setting", hidden_size=65)
    changed_generation = shutil.copytree(renamed, tmp_path / "other-eos")
    (changed_generation / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    others = {target_identity(d, "float32", cache) for d in (changed_weight, changed_config, changed_generation)}
    others.add(target_identity(renamed, "bfloat16", cache))  # the dtype the weights run in changes the outputs
    assert identity not in others and len(others) == 4


def test_identity_is_cached_by_path_size_and_mtime(tmp_path):
    cache = tmp_path / "cache"
    target = fake_target(tmp_path / "target")
    identity = target_identity(target, "float32", cache)
    [entry_file] = cache.iterdir()
    entry = json.loads(entry_file.read_text())
    # A valid entry is believed without reading the weights (that is what makes a 15 GB target start fast).
    entry_file.write_text(json.dumps({**entry, "digest": "0" * 64}))
    assert target_identity(target, "float32", cache) != identity
    # Touching a weight file invalidates it: the weights are hashed again.
    weights = target / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert target_identity(target, "float32", cache) == identity
    # An unusable cache costs a rehash, never a failure.
    entry_file.write_text("not json")
    assert target_identity(target, "float32", tmp_path / "missing" / "cache") == identity
    assert target_identity(target, "float32", cache) == identity


def test_a_directory_without_weights_has_no_identity(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        target_identity(tmp_path, "float32", tmp_path / "cache")


def status(verifier: str, target: str | None, *, vocab: str = "vocab", load: int = 0, online: bool = True) -> Status:
    return Status(verifier_id=verifier, online=online, model="m", vocab=vocab, load=load, capacity=4, target=target)


VERIFIERS = [status("a", "T1", load=1), status("b", "T2"), status("c", "T1", load=2), status("d", None),
             status("e", "T1", vocab="other"), status("f", "T1", online=False)]

PLACEMENTS = [
    # (case, need, chosen)
    ("opening: least loaded of any target", Placement("vocab"), "b"),
    ("moving: same target only, though b is idle", Placement("vocab", exclude="a", pinned=True, target="T1"), "c"),
    ("moving: the other target never", Placement("vocab", exclude="b", pinned=True, target="T2"), None),
    ("unannounced target: cannot be matched", Placement("vocab", exclude="d", pinned=True, target=None), None),
    ("configured verifier only", Placement("vocab", only="c", pinned=True, target="T1"), "c"),
    ("same target, another vocabulary: never", Placement("vocab2", pinned=True, target="T1"), None),
]


@pytest.mark.parametrize(("case", "need", "chosen"), PLACEMENTS, ids=[case for case, _, _ in PLACEMENTS])
def test_sessions_move_only_within_their_target(case, need, chosen):
    found = choose(VERIFIERS, need)
    assert (found.verifier_id if found else None) == chosen


def test_describe_names_every_online_verifiers_target():
    text = describe(VERIFIERS)
    assert "b (target T2, model m, vocab vocab)" in text and "d (target unannounced" in text and "f (" not in text


def test_a_former_verifiers_late_verdict_is_dropped():
    import asyncio

    from sled_edge.connection import EdgeConnection
    from sled_protocol.transport import parse_broker_url

    connection = EdgeConnection([parse_broker_url("mqtt://127.0.0.1:1")], "dev")
    queue: asyncio.Queue = asyncio.Queue()
    connection.waiters["s"] = queue
    connection.holders["s"] = "c"  # the session moved from a to c
    late = Verdict(kind=VerdictKind.VERIFIED, verifier_id="a", session_id="s", seq=4, accepted=1, next_token=3,
                   committed_len=9)
    connection._route(late)
    assert queue.empty()
    current = Verdict(**{**late.__dict__, "verifier_id": "c"})
    connection._route(current)
    assert queue.get_nowait() == current
