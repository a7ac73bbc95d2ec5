"""Turn a finished ``examples/stsb_smollm2.sh`` run into the adapters the package ships.

    python examples/package_default_adapters.py RUN_DIR [--output llm2vec_fast/default_adapters]

Writes ``OUTPUT/smollm2-135m-instruct/{mntp,simcse}``: each stage's LoRA weights in bf16
safetensors (half the size; an adapter is merged in fp32, so only the weights' rounding changes),
its ``adapter_config.json`` naming the embedded model instead of the training machine's cache
path, and for the last stage the encoder settings that STS-B was scored with (mean pooling,
``max_length`` 512, bidirectional). Score the result before committing it:

    llm2vec-fast eval sts --model "$(python -c 'from llm2vec_fast.default_model import
        default_model_path; print(default_model_path())')" --data ../shared/data/stsb/sts-test.csv
        --adapter OUTPUT/smollm2-135m-instruct/mntp --adapter OUTPUT/smollm2-135m-instruct/simcse
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llm2vec_fast.default_encoder import ADAPTER_STAGES, DEFAULT_ENCODER_NAME
from llm2vec_fast.settings import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LLM2VEC_CONFIG_FILE

BASE_NAME = "SmolLM2-135M-Instruct (llm2vec_fast.default_model.default_model_path())"
# What examples/stsb_smollm2.sh scores every stage with; the SimCSE stage trained on 32 tokens.
ENCODER_SETTINGS = {
    "pooling_mode": "mean",
    "max_length": 512,
    "doc_max_length": 400,
    "skip_instruction": True,
    "bidirectional": True,
}


def package_stage(run_stage: Path, target: Path, encoder_settings: dict | None) -> None:
    """One stage's adapter folder: bf16 weights, the adapter config, optional encoder settings."""
    weights = load_file(str(run_stage / ADAPTER_WEIGHTS_FILE))
    target.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in sorted(weights.items())},
        str(target / ADAPTER_WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    config = json.loads((run_stage / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = BASE_NAME
    (target / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    if encoder_settings is not None:
        text = json.dumps(encoder_settings, indent=2) + "\n"
        (target / LLM2VEC_CONFIG_FILE).write_text(text, "utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the OUT_DIR of examples/stsb_smollm2.sh")
    parser.add_argument("--output", type=Path, default=Path("llm2vec_fast/default_adapters"))
    args = parser.parse_args(argv)
    for stage in ADAPTER_STAGES:
        if not (args.run_dir / stage / ADAPTER_WEIGHTS_FILE).is_file():
            raise SystemExit(
                f"{args.run_dir / stage} has no {ADAPTER_WEIGHTS_FILE}: run unfinished"
            )
    for stage in ADAPTER_STAGES:
        last = stage == ADAPTER_STAGES[-1]
        target = args.output / DEFAULT_ENCODER_NAME / stage
        package_stage(args.run_dir / stage, target, ENCODER_SETTINGS if last else None)
        print(f"{stage}: {target}")


if __name__ == "__main__":
    main()
