"""Build the tiny test models (the ``tiny_models`` fixture's) into a directory, for the edge-only venv.

Runs in the full venv (torch, optimum); ``make test-edge`` then points the edge venv's tests at the result
with ``SLED_EDGE_FIXTURES``. Reuses a finished build.

    .venv/bin/python scripts/edge-fixtures.py build/edge-fixtures
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sled_models.tiny import DRAFT_GPT2, TARGET_LLAMA, build_model, build_tokenizer, export_onnx  # noqa: E402


def main(out: Path) -> int:
    done = out / "done"
    if done.is_file():
        print(f"edge fixtures: reusing {out}")
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter about its own internals
        build_tokenizer(out / "tokenizer")
        for spec, name in ((TARGET_LLAMA, "target"), (DRAFT_GPT2, "gpt2")):
            build_model(spec, out / "tokenizer", out / name)
            export_onnx(out / name, out / f"{name}-onnx")
    done.write_text("ok\n")
    print(f"edge fixtures: built {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/edge-fixtures")))
