"""Generate the llm2vec 0.2.3 reference data in tests/data/llm2vec_reference/.

Run once, from the repository root, in a separate venv that has the original package:

    python3 -m venv /tmp/l2v-venv
    /tmp/l2v-venv/bin/pip install torch==2.14.1 llm2vec==0.2.3 transformers==4.44.2 peft==0.12.0
    /tmp/l2v-venv/bin/python tests/data/make_llm2vec_reference.py

It writes, under tests/data/llm2vec_reference/:
- llama/, mistral/: tiny random LlamaForCausalLM (llama3 rope scaling) and MistralForCausalLM
  checkpoints (config.json, model.safetensors) with a tiny BPE tokenizer;
- llama-lora/, mistral-lora/: random LoRA adapters (nonzero B) for each base;
- llama-mntp/, llama-mntp-simcse/: an LLM2Vec chain as llm2vec expects it (MNTP folder with
  adapter + config + tokenizer naming its base, then a SimCSE adapter on top);
- cases.json: the inputs and every case (how llm2vec was called);
- expected.safetensors: per case, llm2vec's embeddings and its token ids / embed masks.

Every ``base_model_name_or_path`` is rewritten to a path relative to the adapter folder at the end.
See tests/data/LLM2VEC_SEMANTICS.md for what the cases exercise.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from llm2vec import LLM2Vec
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GemmaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

OUT = Path(__file__).resolve().parent / "llm2vec_reference"
SEPARATOR = "!@#$%^&*()"

# Plain strings and [instruction, text] pairs. Lengths vary on purpose: with max_length=32 and
# doc_max_length=24, item 2 is cut by doc_max_length (word truncation) and item 9 by max_length.
INPUTS: list = [
    "The cat sat on the mat.",
    ["Retrieve passages that answer the question:", "what is the capital of France?"],
    "In the early morning the old fisherman walked slowly down to the harbour, checked his nets "
    "twice, talked with the other men about the weather and the price of fish, and finally set "
    "out to sea while the sun rose behind the hills and the gulls followed his small boat.",
    ["", "An empty instruction still takes the separator path."],
    "Short.",
    ["Given a claim, find documents that refute it:", "Vaccines cause autism."],
    "  Leading and trailing spaces are kept or stripped depending on the path.  ",
    ["Classify the sentiment of the review:", "I loved this film, the acting was great!"],
    "Bidirectional attention turns a decoder into an encoder.",
    [
        "Represent this scientific abstract for retrieval of related work in machine learning and "
        "natural language processing research:",
        "We show that decoder language models become strong text encoders after masked next token "
        "prediction and unsupervised contrastive learning.",
    ],
    "Numbers like 42 and 2024 appear, as do commas, periods; and semicolons.",
    ["Find the answer:", "Why is the sky blue during the day?"],
]

# Inputs that only exercise tokenization (no embeddings): empty texts, whitespace-only
# instruction, the separator inside a text, a literal "</s>" inside a text.
TOKEN_EDGE_INPUTS: list = [
    "",
    ["", ""],
    ["Find the answer:", ""],
    ["   ", "whitespace-only instruction"],
    ["Find:", "a text with the separator !@#$%^&*() inside it"],
    "a text that ends with </s>",
    "  padded text  ",
    ["  Spaces around the instruction  ", "  and around the text  "],
] + INPUTS[:3]

EXTRA_CORPUS = "\n".join(
    [
        "",
        "The quick brown fox jumps over the lazy dog. A journey"
        " of a thousand miles begins with one step.",
        "Language models predict the next token; encoders map a text to one vector.",
        "Questions, answers, claims, documents, reviews and abstracts are all texts.",
        "Whitespace, punctuation: commas, periods; semicolons!"
        " question marks? and digits 0 1 2 3 4 5 6 7 8 9.",
        "Retrieve represent classify find given the a an"
        " of to in on for with and or is are was were.",
        "[INST] user [/INST] </s> <|start_header_id|>user<|end_header_id|>"
        " <|eot_id|> <|end_of_text|>",
        "<bos><start_of_turn>user <end_of_turn> <eos> <|im_start|>user <|im_end|> <|endoftext|>",
        "",
    ]
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POOLING_MODES = ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"]
SETTING_A = {"max_length": 32, "doc_max_length": 24}
SETTING_B = {"max_length": 40, "doc_max_length": 400}


def corpus_texts() -> list[str]:
    texts = [EXTRA_CORPUS]
    for item in INPUTS + TOKEN_EDGE_INPUTS:
        texts.extend([item] if isinstance(item, str) else item)
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A sentencepiece-like BPE (metaspace, BOS added by the post-processor), vocab ~320."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus_texts() * 4, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def randomize_norms(model: torch.nn.Module) -> None:
    """RMSNorm weights away from 1 so that a missing or misplaced norm changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))


def save_base(folder: Path, model_cls, config, tokenizer, name_or_path: str) -> None:
    model = model_cls(config)
    randomize_norms(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    set_name_or_path(folder, name_or_path)


def set_name_or_path(folder: Path, name_or_path: str) -> None:
    """llm2vec's text rewrites key on config.json's ``_name_or_path``; set it explicitly."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["_name_or_path"] = name_or_path
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_lora(folder: Path, base_folder: Path, base_model_cls) -> None:
    """A LoRA adapter on the bare decoder (as llm2vec trains it), with random nonzero B."""
    base = base_model_cls.from_pretrained(base_folder, torch_dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").unlink()


def make_relative(adapter_folder: Path) -> None:
    path = adapter_folder / "adapter_config.json"
    config = json.loads(path.read_text())
    base = Path(config["base_model_name_or_path"])
    config["base_model_name_or_path"] = os.path.relpath(base, adapter_folder)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_models(tokenizer) -> None:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llama_config = LlamaConfig(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **common,
    )
    # sliding_window shorter than the longest inputs: llm2vec's bidirectional Mistral ignores it.
    mistral_config = MistralConfig(rms_norm_eps=1e-6, rope_theta=1e6, sliding_window=8, **common)

    torch.manual_seed(1)
    save_base(OUT / "llama", LlamaForCausalLM, llama_config, tokenizer, "tiny-random-llama")
    torch.manual_seed(2)
    save_base(
        OUT / "mistral",
        MistralForCausalLM,
        mistral_config,
        tokenizer,
        "mistralai/Mistral-7B-Instruct-v0.2",
    )
    torch.manual_seed(3)
    save_lora(OUT / "llama-lora", OUT / "llama", LlamaModel)
    torch.manual_seed(4)
    save_lora(OUT / "mistral-lora", OUT / "mistral", MistralModel)

    # MNTP folder: adapter + the base's config (its _name_or_path picks llm2vec's text format)
    # + tokenizer; adapter_config.json names the base whose weights transformers loads.
    torch.manual_seed(5)
    mntp = OUT / "llama-mntp"
    save_lora(mntp, OUT / "llama", LlamaModel)
    shutil.copy(OUT / "llama" / "config.json", mntp / "config.json")
    set_name_or_path(mntp, "meta-llama/Llama-2-7b-chat-hf")
    tokenizer.save_pretrained(mntp)
    torch.manual_seed(6)
    save_lora(OUT / "llama-mntp-simcse", mntp, LlamaModel)


def as_pair(item) -> list[str]:
    return ["", item] if isinstance(item, str) else list(item)


class RecordingLLM2Vec(LLM2Vec):
    """LLM2Vec that remembers the features of every string it tokenized."""

    def tokenize(self, texts):
        features = super().tokenize(texts)
        if not hasattr(self, "seen"):
            self.seen = {}
        for row, text in enumerate(texts):
            attention = features["attention_mask"][row].bool()
            length = int(attention.sum())
            embed_mask = features["embed_mask"][row]
            assert int(embed_mask[: embed_mask.numel() - length].sum()) == 0, "mask in padding"
            self.seen[text] = (
                features["input_ids"][row][attention].tolist(),
                embed_mask[-length:].tolist() if length else [],
            )
        return features


def tokens_of(l2v: RecordingLLM2Vec, items: list) -> tuple[list, list]:
    ids, masks = [], []
    for instruction, text in map(as_pair, items):
        prepared = l2v.prepare_for_tokenization(l2v._convert_to_str(instruction, text))
        if prepared not in getattr(l2v, "seen", {}):
            l2v.tokenize([prepared])
        row_ids, row_mask = l2v.seen[prepared]
        ids.append(row_ids)
        masks.append(row_mask)
    return ids, masks


def flat_tokens(prefix: str, ids: list, masks: list) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.lengths": torch.tensor([len(r) for r in ids], dtype=torch.int32),
        f"{prefix}.input_ids": torch.tensor([t for r in ids for t in r], dtype=torch.int32),
        f"{prefix}.embed_mask": torch.tensor([m for r in masks for m in r], dtype=torch.int8),
    }


def embedding_cases() -> list[dict]:
    chains = [
        ("llama", "none", {"base": "llama"}),
        ("llama", "lora", {"base": "llama", "peft": "llama-lora", "merge_peft": False}),
        ("mistral", "none", {"base": "mistral"}),
        ("mistral", "lora", {"base": "mistral", "peft": "mistral-lora", "merge_peft": False}),
        (
            "llama",
            "mntp-simcse",
            {"base": "llama-mntp", "peft": "llama-mntp-simcse", "merge_peft": True},
        ),
    ]
    cases = []
    for model, adapter, load in chains:
        for pooling_mode in POOLING_MODES:
            for skip in (True, False):
                settings = [("A", SETTING_A)]
                if adapter in ("none", "lora") and (model, adapter) != ("mistral", "none"):
                    settings.append(("B", SETTING_B))
                for setting_name, setting in settings:
                    cases.append(
                        {
                            "id": f"{model}-{adapter}-{pooling_mode}-skip{int(skip)}-"
                            f"{setting_name}",
                            "kind": "embeddings",
                            "load": load,
                            "enable_bidirectional": True,
                            "pooling_mode": pooling_mode,
                            "skip_instruction": skip,
                            **setting,
                        }
                    )
    cases.append(
        {
            "id": "llama-none-mean-skip1-A-causal",
            "kind": "embeddings",
            "load": {"base": "llama"},
            "enable_bidirectional": False,
            "pooling_mode": "mean",
            "skip_instruction": True,
            **SETTING_A,
        }
    )
    return cases


def token_edge_cases() -> list[dict]:
    """Tokenization only, for every branch of llm2vec's model-dependent text rewrites."""
    identities = [
        ("LlamaConfig", "tiny-random-llama"),
        ("MistralConfig", "mistralai/Mistral-7B-Instruct-v0.2"),
        ("LlamaConfig", "meta-llama/Llama-2-7b-chat-hf"),
        ("LlamaConfig", "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("LlamaConfig", "meta-llama/Meta-Llama-3-8B"),
        ("GemmaConfig", "google/gemma-2-9b-it"),
        ("Qwen2Config", "Qwen/Qwen2-7B-Instruct"),
        ("Qwen2Config", "tiny-random-qwen2"),
    ]
    cases = []
    for config_class, name in identities:
        for pooling_mode in ("mean", "eos_token"):
            for setting_name, setting in (("A", SETTING_A), ("B", SETTING_B)):
                cases.append(
                    {
                        "id": f"tokens-{config_class}-{name.replace('/', '_')}-{pooling_mode}-"
                        f"{setting_name}",
                        "kind": "tokens",
                        "config_class": config_class,
                        "model_type": CONFIG_CLASSES[config_class].model_type,
                        "name_or_path": name,
                        "pooling_mode": pooling_mode,
                        **setting,
                    }
                )
    return cases


CONFIG_CLASSES = {
    "LlamaConfig": LlamaConfig,
    "MistralConfig": MistralConfig,
    "GemmaConfig": GemmaConfig,
    "Qwen2Config": Qwen2Config,
}


class ConfigOnly(torch.nn.Module):
    """Stands in for a model where llm2vec only reads ``model.config``."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def run_embedding_case(case: dict) -> dict[str, torch.Tensor]:
    load = case["load"]
    kwargs = {}
    if "peft" in load:
        kwargs = {
            "peft_model_name_or_path": str(OUT / load["peft"]),
            "merge_peft": load["merge_peft"],
        }
    l2v = RecordingLLM2Vec.from_pretrained(
        str(OUT / load["base"]),
        enable_bidirectional=case["enable_bidirectional"],
        pooling_mode=case["pooling_mode"],
        max_length=case["max_length"],
        doc_max_length=case["doc_max_length"],
        skip_instruction=case["skip_instruction"],
        torch_dtype=torch.float32,
        **kwargs,
    )
    pairs = [as_pair(item) for item in INPUTS]
    embeddings = l2v.encode(pairs, batch_size=5, show_progress_bar=False, device="cpu")
    assert embeddings.shape == (len(INPUTS), 64) and torch.isfinite(embeddings).all()
    ids, masks = tokens_of(l2v, INPUTS)
    case["name_or_path"] = l2v.model.config._name_or_path
    case["model_type"] = l2v.model.config.model_type
    return {
        f"{case['id']}.embeddings": embeddings.contiguous(),
        **flat_tokens(case["id"], ids, masks),
    }


def run_token_case(case: dict, tokenizer) -> dict[str, torch.Tensor]:
    config = CONFIG_CLASSES[case["config_class"]]()
    config._name_or_path = case["name_or_path"]
    l2v = RecordingLLM2Vec(
        ConfigOnly(config),
        tokenizer,
        pooling_mode=case["pooling_mode"],
        max_length=case["max_length"],
        doc_max_length=case["doc_max_length"],
    )
    ids, masks = tokens_of(l2v, TOKEN_EDGE_INPUTS)
    return flat_tokens(case["id"], ids, masks)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    build_models(tokenizer)
    loading_tokenizer = PreTrainedTokenizerFast.from_pretrained(OUT / "llama")
    loading_tokenizer.pad_token = loading_tokenizer.eos_token
    loading_tokenizer.padding_side = "left"

    tensors: dict[str, torch.Tensor] = {}
    cases = embedding_cases()
    for case in cases:
        tensors.update(run_embedding_case(case))
    edge_cases = token_edge_cases()
    for case in edge_cases:
        tensors.update(run_token_case(case, loading_tokenizer))

    for adapter in ("llama-lora", "mistral-lora", "llama-mntp", "llama-mntp-simcse"):
        make_relative(OUT / adapter)
    save_file(tensors, OUT / "expected.safetensors")
    manifest = {
        "generated_with": {
            "llm2vec": "0.2.3",
            "transformers": "4.44.2",
            "peft": "0.12.0",
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "embedding_dim": 64,
        "batch_size": 5,
        "inputs": INPUTS,
        "token_edge_inputs": TOKEN_EDGE_INPUTS,
        "cases": cases + edge_cases,
    }
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(cases)} embedding cases, {len(edge_cases)} token cases written to {OUT}")


if __name__ == "__main__":
    main()
