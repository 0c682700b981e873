"""Export any Hugging Face causal LM draft on disk to ONNX for the edge (optimum, with past key values),
optionally int8 (onnxruntime dynamic quantisation), and check that a draft and a target share a vocabulary."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

from sled_protocol.vocab import vocab_hash
from sled_verifier.gguf import model_directory

# Written beside the ONNX model so that the device has the target's tokenizer, chat template and stop ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


class VocabularyMismatch(ValueError):
    """A draft whose tokenizer is not the target's: its tokens would be verified into garbage."""


def export_draft(hf_dir: Path, out_dir: Path, int8: bool = False, fp16: bool = False) -> Path:
    """``hf_dir`` (config, weights, tokenizer.json; or a .gguf file) -> ``out_dir`` with model.onnx, config,
    tokenizer and chat template.

    ``fp16``: weights, activations and the KV cache in float16, for GPU providers (CUDA, TensorRT,
    CoreML); optimum traces the model in float16 on the CPU too. On a CPU provider fp16 is slower than
    fp32 (no fp16 arithmetic) and keeps the exported copying cache: use fp32 or int8 there."""
    if int8 and fp16:
        raise ValueError("choose one of int8 (CPUs) and fp16 (GPUs)")
    from optimum.exporters.onnx import main_export

    hf_dir, out_dir = model_directory(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json: the edge needs a fast tokenizer beside the model")
    target_dir = out_dir.with_name(out_dir.name + ".fp32-tmp") if int8 else out_dir
    quiet = [logging.getLogger(name) for name in ("optimum.onnx.transformations_utils", "transformers.configuration_utils")]
    levels = [logger.level for logger in quiet]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own tracer chatter
        for logger in quiet:  # its notes on tied weights and on its own use of a deprecated argument
            logger.setLevel(logging.ERROR)
        try:
            main_export(str(hf_dir), output=str(target_dir), task="text-generation-with-past",
                        local_files_only=True, do_validation=False, dtype="fp16" if fp16 else "fp32")
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
    if int8:
        quantize_int8(target_dir, out_dir)
        shutil.rmtree(target_dir)
    for name in TOKENIZER_FILES:  # the exporter saves the tokenizer, not always its chat template
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    return out_dir


def quantize_int8(onnx_dir: Path, out_dir: Path) -> Path:
    """Dynamic int8 quantisation of the weights (activations stay float): smaller and faster on ARM CPUs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _copy_beside_model(onnx_dir, out_dir)
    quantize_dynamic(str(onnx_dir / "model.onnx"), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8)
    return out_dir


def quantize_blockwise(onnx_dir: Path, out_dir: Path, bits: int, block_size: int = 32, symmetric: bool = False) -> Path:
    """Every product with a constant weight (the head included) as onnxruntime's MatMulNBits: ``bits`` 4 or 8,
    one scale (and zero point unless ``symmetric``) per ``block_size`` weights along the input; int8 activations
    in the product (accuracy level 4, the fast CPU kernels). The embedding table stays float: a lookup reads
    one row of it a token."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a product
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    _copy_beside_model(onnx_dir, out_dir)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(onnx_dir / "model.onnx")), bits=bits, block_size=block_size,
                                     is_symmetric=symmetric, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_dir / "model.onnx"), use_external_data_format=True)
    return out_dir


def _copy_beside_model(onnx_dir: Path, out_dir: Path) -> None:
    """Everything of an export but its ONNX graph and weights (config, tokenizer, chat template) into ``out_dir``,
    which a quantizer then fills with its own model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in onnx_dir.iterdir():
        if item.is_file() and ".onnx" not in item.name:  # model.onnx, model.onnx_data, model.onnx.data
            shutil.copy2(item, out_dir / item.name)


def check_vocab(draft_dir: Path, target_dir: Path) -> str:
    """The shared vocabulary hash, or VocabularyMismatch saying how the two differ (either may be a .gguf)."""
    draft_dir, target_dir = model_directory(draft_dir), model_directory(target_dir)
    draft_hash, target_hash = vocab_hash(draft_dir), vocab_hash(target_dir)
    if draft_hash != target_hash:
        from tokenizers import Tokenizer

        draft_vocab = Tokenizer.from_file(str(Path(draft_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)
        target_vocab = Tokenizer.from_file(str(Path(target_dir) / "tokenizer.json")).get_vocab(with_added_tokens=True)
        differing = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()), key=lambda item: item[1])[:5]
        raise VocabularyMismatch(
            f"vocabularies differ: draft {draft_dir} has {len(draft_vocab)} tokens (hash {draft_hash}), "
            f"target {target_dir} has {len(target_vocab)} (hash {target_hash}); first differences: {differing}"
        )
    return draft_hash
