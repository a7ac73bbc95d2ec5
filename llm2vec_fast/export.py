"""``llm2vec-fast export``: a model and its adapter chain as one sentence-transformers folder.

The folder is a plain transformers model folder (``config.json``, ``model.safetensors`` with the
adapters merged, the tokenizer) with the encoder settings in ``llm2vec_config.json`` beside the
weights, plus sentence-transformers' ``modules.json`` and ``config_sentence_transformers.json``
naming ``llm2vec_fast.sentence_transformers.LLM2VecModule`` as its one module. So the same folder
loads with ``SentenceTransformer``, ``LLM2Vec.from_pretrained`` and ``llm2vec-fast embed``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm2vec_fast.settings import (
    CONFIG_FILE,
    LLM2VEC_CONFIG_FILE,
    SAFETENSORS_FILE,
)

if TYPE_CHECKING:
    import torch

    from llm2vec_fast.encoder import LLM2Vec
    from llm2vec_fast.model import DecoderModel

# llm2vec_fast.kernels.POOLING_MODES, spelled out: building the parser must not import torch
POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
DTYPES = ("float32", "float16", "bfloat16")
# The config.json keys transformers reads the weights' dtype from (4.x, then 5.x).
CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")


def encoder_settings(encoder: LLM2Vec) -> dict[str, Any]:
    """The settings ``LLM2Vec.from_pretrained`` reads back from ``llm2vec_config.json``."""
    return {
        "pooling_mode": encoder.pooling_mode,
        "max_length": encoder.max_length,
        "doc_max_length": encoder.doc_max_length,
        "skip_instruction": encoder.skip_instruction,
        "bidirectional": encoder.enable_bidirectional,
    }


def transformers_tensors(model: DecoderModel) -> dict[str, torch.Tensor]:
    """The runtime weights under transformers' names (``model.layers.0.self_attn.q_proj.weight``),
    with the fused q/k/v and gate/up projections split again: exact copies, no rounding."""
    config = model.config
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    inner = config.intermediate_size
    fused = {
        "qkv_proj": (("q_proj", "k_proj", "v_proj"), (q_rows, kv_rows, kv_rows)),
        "gate_up_proj": (("gate_proj", "up_proj"), (inner, inner)),
    }
    tensors = {}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 2)[-2]
        parts = [(name, tensor)]
        if module in fused:
            names, rows = fused[module]
            parts = [
                (name.replace(module, part), piece)
                for part, piece in zip(names, tensor.split(rows, dim=0))
            ]
        for part_name, piece in parts:
            prefix = "" if part_name.startswith("lm_head.") else "model."
            tensors[prefix + part_name] = piece.detach().cpu().clone()  # safetensors: no views
    return tensors


def write_model_folder(encoder: LLM2Vec, folder: Path) -> None:
    """Write the encoder as a transformers folder that ``LLM2Vec.from_pretrained`` loads back to
    the same numbers: config, weights in the encoder's dtype, tokenizer, encoder settings."""
    from safetensors.torch import save_file

    loaded = getattr(encoder.model, "loaded_from", None)
    if loaded is None:
        raise ValueError("the encoder's model records no transformers config (loaded_from)")
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = dict(loaded.hf_config)
    # llm2vec's text rewrites key on the name the chain was loaded under: keep it
    hf_config.pop("_name_or_path", None)
    if encoder.model_name:
        hf_config["_name_or_path"] = encoder.model_name
    dtype_name = str(encoder.dtype).removeprefix("torch.")
    for key in CONFIG_DTYPE_KEYS:
        hf_config[key] = dtype_name
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(transformers_tensors(encoder.model), str(folder / SAFETENSORS_FILE), {"format": "pt"})
    encoder.tokenizer.save_pretrained(str(folder))
    (folder / LLM2VEC_CONFIG_FILE).write_text(
        json.dumps(encoder_settings(encoder), indent=2) + "\n"
    )


def export_sentence_transformers(
    encoder: LLM2Vec,
    output: str | Path,
    *,
    query_instruction: str = "",
    document_instruction: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``encoder`` as a sentence-transformers folder at ``output``, atomically.

    The instructions become the folder's ``query`` and ``document`` prompts, which
    ``encode_query`` / ``encode_document`` hand to the encoder as llm2vec instructions (not
    pooled with ``skip_instruction``). An existing non-empty ``output`` is refused unless
    ``overwrite``; the folder appears complete or not at all.
    """
    from sentence_transformers import SentenceTransformer

    from llm2vec_fast.sentence_transformers import LLM2VecModule

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output} exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(
        modules=[LLM2VecModule(encoder)],
        prompts={"query": query_instruction, "document": document_instruction},
        similarity_fn_name="cosine",
        device=str(encoder.device),
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save(str(staging), create_model_card=False)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if output.exists():
            retired = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def run(args: argparse.Namespace) -> int:
    from llm2vec_fast.encoder import LLM2Vec

    output = Path(args.output).resolve()
    for source in (args.model, *args.adapter):
        if Path(source).resolve() == output:
            raise ValueError(f"--output {args.output} is one of the folders being exported")
    encoder = LLM2Vec.from_pretrained(
        args.model,
        adapters=args.adapter,
        pooling_mode=args.pooling_mode,
        max_length=args.max_length,
        doc_max_length=args.doc_max_length,
        enable_bidirectional=False if args.causal else None,
        dtype=args.dtype,
        device="cpu",
    )
    export_sentence_transformers(
        encoder,
        output,
        query_instruction=_instruction(args.query_instruction, encoder, "query"),
        document_instruction=_instruction(args.document_instruction, encoder, "document"),
        overwrite=args.overwrite,
    )
    direction = "causal" if encoder.causal else "bidirectional"
    print(
        f"wrote {output}: {encoder.pooling_mode} pooling, {direction} attention,"
        f" max_length {encoder.max_length}, {encoder.embedding_dim} dimensions"
    )
    return 0


def _instruction(given: str | None, encoder: LLM2Vec, prompt_name: str) -> str:
    """The instruction given, else the prompt of that name the model folder has, else none."""
    return given if given is not None else encoder.prompts.get(prompt_name, "")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a model and its adapters as a sentence-transformers folder",
        description="Merge the adapters into the model and write one folder that loads with"
        " SentenceTransformer(DIR, trust_remote_code=True) (or"
        " llm2vec_fast.sentence_transformers.load_sentence_transformer(DIR)),"
        " LLM2Vec.from_pretrained(DIR) and `llm2vec-fast embed --model DIR`. Settings not given"
        " come from the last adapter's llm2vec_config.json / train_config.json, as for embed.",
    )
    parser.add_argument("--model", required=True, help="model folder, GGUF file or MNTP folder")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH",
        help="PEFT LoRA adapter folder merged on top, in order (repeat: --adapter MNTP"
        " --adapter SIMCSE)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--pooling-mode", default=None, choices=POOLING_MODES)
    parser.add_argument("--max-length", type=_positive, default=None, help="tokens per text")
    parser.add_argument(
        "--doc-max-length", type=_positive, default=None, help="llm2vec's word cut, in tokens"
    )
    parser.add_argument(
        "--causal",
        action="store_true",
        help="keep causal attention (default: bidirectional, or what the adapter was trained with)",
    )
    parser.add_argument(
        "--query-instruction",
        default=None,
        help="the instruction encode_query puts before queries (default: the model"
        " folder's query prompt, else none)",
    )
    parser.add_argument(
        "--document-instruction",
        default=None,
        help="the instruction encode_document puts before documents (default: the model"
        " folder's document prompt, else none)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of the written weights; adapters are merged in it (default: float32)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder"
    )
    parser.set_defaults(run=run)
