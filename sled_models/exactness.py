"""``sled-models check --prompt``: a prompt's greedy SLED output against the server's own output.

SLED is exact when its output is token for token what the verifier's engine decodes alone, one token per
step, on the same runtime (``sled_verifier.reference.decode_alone``). This runs both in one process, no
broker: the draft (an ONNX export, as a device runs it) proposes ``draft_tokens`` per round and the engine
verifies, then the same engine decodes the prompt alone; the report says where they first differ, if they do.
"""

from __future__ import annotations

from pathlib import Path

from sled_edge.draft_model import OnnxDraftModel
from sled_edge.drafter import Drafter
from sled_edge.session import EdgeSession
from sled_verifier.engine import VerifierEngine
from sled_verifier.gguf import model_directory
from sled_verifier.reference import decode_alone
from sled_verifier.runtime import load_target
from sled_verifier.stats import VerifierStats


def compare_with_reference(draft_dir: Path, target: Path, prompt: str, max_new_tokens: int = 64,
                           draft_tokens: int = 4, runtime: str = "transformers") -> dict:
    """SLED's and the reference's continuations of ``prompt`` (tokenized by the target's tokenizer.json)."""
    from tokenizers import Tokenizer

    if not (draft_dir / "model.onnx").is_file():
        raise FileNotFoundError(f"{draft_dir / 'model.onnx'}: --prompt runs the draft as a device does (an ONNX "
                                "export: sled-models export-draft)")
    target_dir = model_directory(target)
    tokenizer = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    engine = VerifierEngine(load_target(target, runtime, "cpu"), "check", max_sessions=2, stats=VerifierStats())
    session = EdgeSession("sled", "check", "", list(ids), len(ids) + max_new_tokens)
    drafter = Drafter(OnnxDraftModel(draft_dir))
    while session.finish is None:
        draft = session.draft(drafter.propose(session.committed, min(draft_tokens, session.budget - 1)).tokens)
        [outcome] = engine.step_until_answered([draft])
        session.apply(draft, outcome.verdict)
        drafter.rollback(outcome.verdict.committed_len, draft.base_len, outcome.verdict.accepted)
    sled = session.committed[len(ids):]
    alone = decode_alone(engine, ids, max_new_tokens)
    first = next((i for i, (a, b) in enumerate(zip(sled, alone)) if a != b), None)
    if first is None and len(sled) != len(alone):
        first = min(len(sled), len(alone))
    return {"prompt_tokens": len(ids), "runtime": runtime, "batch_invariance": engine.target.batch_invariance,
            "rounds": session.stats.rounds, "mean_acceptance_length": round(session.stats.mean_acceptance_length, 3),
            "identical": first is None, "first_difference": first, "sled": tokenizer.decode(sled),
            "reference": tokenizer.decode(alone)}
