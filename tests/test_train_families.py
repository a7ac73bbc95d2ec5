"""MNTP, SimCSE and supervised LoRA training on Qwen3 and Gemma 3 (tiny random models).

Each base folder carries a word-level tokenizer laid out like its family's: Qwen's has no BOS
and no mask token, and ``_`` in its vocabulary; Gemma's adds ``<bos>`` and has ``<mask>`` as its
mask token (as transformers' ``GemmaTokenizer`` has), with ``_`` in its vocabulary too, so that
llm2vec's rule (the tokenizer's own mask token first) is what picks it.

Every run has one batch of all its examples, so each step sees the same texts (new masks and
dropout draws): a model that learns nothing keeps its first loss, up to that noise.
"""

import copy
import json
import statistics

import pytest
import torch
from gemma3_helpers import FULL, SLIDING, gemma3_hidden_states, tiny_gemma3
from model_helpers import (
    VOCAB,
    assert_matches_oracle,
    random_sequences,
    runtime_from_hf,
    runtime_hidden_states,
    save_tiny_folder,
    tiny_hf_model,
)
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llm2vec_fast import LLM2Vec
from llm2vec_fast.adapters import TARGET_MODULES
from llm2vec_fast.loading import load_model
from llm2vec_fast.model import forward_and_pool
from llm2vec_fast.packed import Packed
from llm2vec_fast.settings import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from llm2vec_fast.train import mntp, run
from llm2vec_fast.train.lora import add_lora, load_lora_state_dict, lora_modules, save_adapter
from llm2vec_fast.train.mntp import mask_token_id

FAMILIES = ("qwen3", "gemma3_text")
STEPS = 20
BATCH = 8
LORA_R = 4
# The specials at the start of each family's vocabulary, and their roles.
SPECIALS = {
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], {"eos": 0, "pad": 0}),
    "gemma3_text": (
        ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
        {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4},
    ),
}


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Specials, ``_``, then words ``w<id>`` up to the tiny vocabulary's size."""
    specials, roles = SPECIALS[family]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab["_"] = len(vocab)
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials[roles.get("unk", 0)]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if "bos" in roles:  # Gemma's tokenizer opens every text with <bos>
        bos = specials[roles["bos"]]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, roles["bos"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{role}_token": specials[index] for role, index in roles.items()},
    )


def family_base(family: str, folder):
    """A tiny random base model folder of the family with its tokenizer: one Qwen3 layer; a
    Gemma 3 sliding layer (its bidirectional band, |i - j| <= 2, shorter than the texts) and a
    global one."""
    _, roles = SPECIALS[family]
    ids = dict(pad_token_id=roles["pad"], eos_token_id=roles["eos"], bos_token_id=roles.get("bos"))
    if family == "gemma3_text":
        hf_model = tiny_gemma3(
            seed=3, num_hidden_layers=2, layer_types=[SLIDING, FULL], sliding_window=4, **ids
        )
    else:
        hf_model = tiny_hf_model(family, seed=3, num_hidden_layers=1, **ids)
    save_tiny_folder(hf_model, folder)
    family_tokenizer(family).save_pretrained(folder)  # replaces model_helpers' tokenizer
    return folder, hf_model.config.num_hidden_layers


def expected_mask_id(family: str) -> int:
    tokenizer = family_tokenizer(family)
    name = "<mask>" if family == "gemma3_text" else "_"
    return tokenizer.convert_tokens_to_ids(name)


def _write_data(tmp_path) -> None:
    # SimCSE: texts alike but for one word, so that telling the copies from the others is learnt.
    # MNTP: the shared words are predictable once learnt. Supervised: query i's word w<20+i> goes
    # with w<40+i> (its positive), not w<60+i> (its negative), which only training can tell.
    shared = " ".join(f"w{i}" for i in range(10, 20))
    lines = [f"{shared} w{30 + i}" for i in range(BATCH)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    records = [
        {
            "query": f"w10 w11 w{20 + i}",
            "positive": f"w13 w14 w{40 + i}",
            "negative": f"w13 w14 w{60 + i}",
            "instruction": "w8",
        }
        for i in range(BATCH)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _config(tmp_path, base, objective: str, steps: int) -> dict:
    return {
        "model_name_or_path": str(base),
        "output_dir": str(tmp_path / objective),
        "dataset_file_path": str(
            tmp_path / ("pairs.jsonl" if objective == "supervised" else "corpus.txt")
        ),
        "per_device_train_batch_size": BATCH,
        "max_seq_length": 16,
        "line_by_line": True,  # MNTP: one block per text, BATCH blocks
        "max_steps": steps,
        "lora_r": LORA_R,
        "learning_rate": 2e-2,
        "warmup_steps": 0,
        "torch_dtype": "float32",
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_token_is_llm2vecs_choice(family):
    """Gemma keeps its own <mask> whatever mask_token_type says; Qwen has none and takes '_'
    (blank) or its EOS token."""
    tokenizer = family_tokenizer(family)
    chosen = {kind: mask_token_id(tokenizer, kind) for kind in ("blank", "eos")}
    if family == "gemma3_text":
        assert chosen == {"blank": 4, "eos": 4} and mask_token_id(tokenizer, "mask") == 4
    else:
        assert chosen == {"blank": tokenizer.convert_tokens_to_ids("_"), "eos": 0}
        with pytest.raises(ValueError, match="no mask token"):
            mask_token_id(tokenizer, "mask")


@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_and_every_lora_matrix_trains(tmp_path, monkeypatch, family, objective):
    base, layers = family_base(family, tmp_path / "base")
    _write_data(tmp_path)
    mask_ids = set()
    masking = mntp.mask_block

    def recording_mask_block(ids, special, probability, all_mask, mask_id, *rest):
        mask_ids.add(mask_id)
        return masking(ids, special, probability, all_mask, mask_id, *rest)

    monkeypatch.setattr(mntp, "mask_block", recording_mask_block)
    losses = run(objective, _config(tmp_path, base, objective, STEPS)).losses

    assert len(losses) == STEPS
    # untrained (lr ~0), the mean of the last five stays at 0.97-1.7x the first loss (SimCSE's
    # dropout draws move it); trained, it falls under half of it (0.18-0.37 for MNTP)
    assert statistics.mean(losses[-5:]) < 0.5 * losses[0], losses
    if objective == "mntp":
        assert mask_ids == {expected_mask_id(family)}

    folder = tmp_path / objective
    saved = load_file(str(folder / ADAPTER_WEIGHTS_FILE))
    modules = {
        f"layers.{i}.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}"
        f".{name}"
        for i in range(layers)
        for name in TARGET_MODULES
    }
    assert set(saved) == {
        f"base_model.model.{module}.lora_{which}.weight" for module in modules for which in "AB"
    }
    for key, value in saved.items():  # B starts at zero: it moved only if gradients reached it
        assert key.endswith("lora_A.weight") or value.abs().max() > 0, key
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["target_modules"] == list(TARGET_MODULES)


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapter_encodes_as_the_trained_model(tmp_path, family):
    """The output folder loads with LLM2Vec.from_pretrained (adapter merged, bidirectional and
    mean pooling from the saved settings) and gives the embeddings of the unmerged LoRA model."""
    base, _ = family_base(family, tmp_path / "base")
    _write_data(tmp_path)
    run("supervised", _config(tmp_path, base, "supervised", 2))
    folder = tmp_path / "supervised"
    encoder = LLM2Vec.from_pretrained(folder, torch_dtype="float32")
    texts = [["w8", "w10 w11 w21 w12"], "w13 w14 w41", "w13"]
    embeddings = encoder.encode(texts, show_progress_bar=False)  # (3, hidden)

    model, _ = load_model(base)
    add_lora(model, r=LORA_R, alpha=2.0 * LORA_R)
    load_lora_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS_FILE)))
    packed = Packed.from_tokenized(encoder.tokenize(texts))
    with torch.no_grad():
        trained = forward_and_pool(model.eval(), packed, "mean", causal=False)  # (3, hidden)
    torch.testing.assert_close(embeddings, trained, rtol=1e-4, atol=1e-5)
    untrained = LLM2Vec.from_pretrained(base, torch_dtype="float32").encode(
        texts, show_progress_bar=False
    )
    assert (embeddings - untrained).abs().max() > 1e-3


def test_gemma3_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    """peft on transformers' Gemma3ForCausalLM reads our adapter: the q/k/v/o and GeGLU
    gate/up/down names, and the rows of our fused qkv and gate_up projections, land where
    peft's LoRA goes (before the q/k norms), so the causal states agree."""
    from peft import PeftModel

    hf_model = tiny_gemma3(seed=5)
    ours = add_lora(runtime_from_hf(hf_model), r=4, alpha=8.0).eval()
    trainable = [name for name, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 7 * 2  # layers x projections x (A, B): no norm trains
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():  # non-zero B matrices (B starts at zero), so every delta shows
        for _, module in lora_modules(ours):
            for b in module.lora_B:
                b.copy_(0.05 * torch.randn(b.shape, generator=generator))
    folder = save_adapter(ours, tmp_path / "adapter", "unused", layout="causal_lm")

    peft_models = []
    for dtype in (torch.float32, torch.float64):
        base = copy.deepcopy(hf_model).to(dtype)
        PeftModel.from_pretrained(base, str(folder)).eval()  # injects the LoRA layers in place
        peft_models.append(base.model)
    sequences = random_sequences([7, 12], seed=7)  # 12: longer than the sliding window of 8
    states = runtime_hidden_states(ours, sequences, causal=True)
    for ids, state in zip(sequences, states):
        peft32, peft64 = (gemma3_hidden_states(model, ids) for model in peft_models)
        assert_matches_oracle(state, peft32, peft64, f"gemma3 + LoRA, len {len(ids)}")
    plain = runtime_hidden_states(runtime_from_hf(hf_model), sequences, causal=True)
    assert (plain[1] - states[1]).abs().max() > 1e-3
