"""Loading folders written by transformers and adapters written by peft, and every refusal.

Numerical checks use the same fp64-oracle rule as test_model.py (``assert_matches_oracle``).
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import (
    assert_matches_oracle,
    hf_hidden_states,
    random_sequences,
    runtime_hidden_states,
    save_tiny_folder,
    tiny_hf_model,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from llm2vec_fast.loading import load_model

FIRST_TARGETS = ["q_proj", "v_proj", "down_proj"]
SECOND_TARGETS = ["k_proj", "o_proj", "gate_proj", "up_proj"]


def write_adapter(hf_model, folder: Path, *, targets, seed, base: str | None, **options) -> Path:
    """A peft LoRA adapter on a copy of ``hf_model`` with random (non-zero) A and B."""
    peft_model = get_peft_model(
        copy.deepcopy(hf_model), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))  # delta ~30% of W
    peft_model.save_pretrained(folder)
    edit_json(folder / "adapter_config.json", base_model_name_or_path=base)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def peft_merged(hf_model, adapters: list[Path], dtype: torch.dtype):
    """transformers + peft reference: each adapter loaded and merged with ``merge_and_unload``."""
    model = copy.deepcopy(hf_model).to(dtype)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama written by save_pretrained (with tokenizer) and two peft adapters on it."""
    root = tmp_path_factory.mktemp("loading")
    hf_model = tiny_hf_model("llama", seed=21)
    base = save_tiny_folder(hf_model, root / "base")
    first = write_adapter(hf_model, root / "first", targets=FIRST_TARGETS, seed=1, base="../base")
    second = write_adapter(
        hf_model, root / "second", targets=SECOND_TARGETS, seed=2, base=str(base), use_rslora=True
    )
    return {"hf": hf_model, "root": root, "base": base, "first": first, "second": second}


def assert_same_as_transformers(ours, hf32, hf64, *, causal: bool) -> None:
    sequences = random_sequences([6, 11], seed=5)
    for ids, states in zip(sequences, runtime_hidden_states(ours, sequences, causal=causal)):
        assert_matches_oracle(
            states,
            hf_hidden_states(hf32, ids, causal=causal),
            hf_hidden_states(hf64, ids, causal=causal),
            f"len {len(ids)}",
        )


def test_single_file_folder(tiny):
    model, tokenizer = load_model(tiny["base"])
    for name, expected in tiny["hf"].state_dict().items():
        if name.endswith("q_proj.weight"):
            layer = name.split(".")[2]
            fused = model.layers[int(layer)].self_attn.qkv_proj.weight
            assert torch.equal(fused[:64], expected)
    assert_same_as_transformers(model, tiny["hf"], copy.deepcopy(tiny["hf"]).double(), causal=False)
    assert tokenizer("w5 w7", add_special_tokens=False)["input_ids"] == [5, 7]
    assert not model.training
    recorded = model.loaded_from
    assert recorded.config.model_type == "llama" and recorded.adapters == ()
    assert {path.name for path in recorded.files} == {"config.json", "model.safetensors"}


def test_sharded_folder_equals_single_file(tiny, tmp_path):
    sharded = save_tiny_folder(tiny["hf"], tmp_path / "sharded", max_shard_size="60KB")
    model, _ = load_model(sharded)
    single, _ = load_model(tiny["base"])
    shards = [path for path in model.loaded_from.files if path.name.startswith("model-")]
    assert len(shards) > 1 and any(
        path.name == "model.safetensors.index.json" for path in model.loaded_from.files
    )
    for (name, param), (_, expected) in zip(
        model.state_dict().items(), single.state_dict().items()
    ):
        assert torch.equal(param, expected), name


def test_dtype_and_device(tiny):
    model, _ = load_model(tiny["base"], dtype=torch.bfloat16, device="cpu")
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    assert model.rope_inv_freq.dtype == torch.float32


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_lora_adapter_merged_like_peft(tiny, causal):
    model, tokenizer = load_model(tiny["first"])
    hf32 = peft_merged(tiny["hf"], [tiny["first"]], torch.float32)
    hf64 = peft_merged(tiny["hf"], [tiny["first"]], torch.float64)
    assert_same_as_transformers(model, hf32, hf64, causal=causal)
    assert model.loaded_from.adapters == (tiny["first"],)
    assert tokenizer("w9", add_special_tokens=False)["input_ids"] == [9]  # the base's tokenizer


def test_chain_of_two_adapters(tiny):
    model, _ = load_model(tiny["first"], adapters=[tiny["second"]])
    hf32 = peft_merged(tiny["hf"], [tiny["first"], tiny["second"]], torch.float32)
    hf64 = peft_merged(tiny["hf"], [tiny["first"], tiny["second"]], torch.float64)
    assert_same_as_transformers(model, hf32, hf64, causal=False)
    from_base, _ = load_model(tiny["base"], adapters=[tiny["first"], tiny["second"]])
    for (name, param), (_, expected) in zip(
        from_base.state_dict().items(), model.state_dict().items()
    ):
        assert torch.equal(param, expected), name
    names = [path.name for path in model.loaded_from.files]
    assert names.count("adapter_model.safetensors") == 2


def test_fan_in_fan_out_means_nothing_for_linear_weights(tiny, tmp_path):
    flipped = Path(shutil.copytree(tiny["first"], tmp_path / "flipped"))
    edit_json(
        flipped / "adapter_config.json",
        fan_in_fan_out=True,
        base_model_name_or_path=str(tiny["base"]),
    )
    ours, _ = load_model(flipped)
    plain, _ = load_model(tiny["first"])
    for (name, param), (_, expected) in zip(ours.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(param, expected), name


def test_adapter_with_its_own_tokenizer(tiny, tmp_path):
    adapter = Path(shutil.copytree(tiny["first"], tmp_path / "with_tokenizer"))
    edit_json(adapter / "adapter_config.json", base_model_name_or_path=str(tiny["base"]))
    tokenizer_config = json.loads((tiny["base"] / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "model_max_length": 77})
    )
    shutil.copy(tiny["base"] / "tokenizer.json", adapter / "tokenizer.json")
    _, tokenizer = load_model(adapter)
    assert tokenizer.model_max_length == 77


# --- refusals -------------------------------------------------------------------------------------


def copy_base(tiny, folder: Path) -> Path:
    return Path(shutil.copytree(tiny["base"], folder))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found: .*nowhere"):
        load_model(tmp_path / "nowhere")


def test_missing_files_are_named(tiny, tmp_path):
    no_config = copy_base(tiny, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_model(no_config)
    no_weights = copy_base(tiny, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(no_weights)
    no_tokenizer = copy_base(tiny, tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(no_tokenizer)


def test_missing_shard_is_named(tiny, tmp_path):
    sharded = save_tiny_folder(tiny["hf"], tmp_path / "sharded", max_shard_size="60KB")
    (sharded / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="shard model-00002-of-00005.safetensors listed in .* is missing"
    ):
        load_model(sharded)


def test_pickle_weights_are_refused(tiny, tmp_path):
    pickled = copy_base(tiny, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only PyTorch pickle weights \\(pytorch_model.bin\\)"):
        load_model(pickled)


def test_unsupported_architecture(tiny, tmp_path):
    folder = copy_base(tiny, tmp_path / "gpt2")
    edit_json(folder / "config.json", model_type="gpt2")
    with pytest.raises(
        ValueError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"
    ):
        load_model(folder)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(tmp_path / "weights.bin")


def test_weights_that_do_not_fit_the_config(tiny, tmp_path):
    folder = copy_base(tiny, tmp_path / "broken")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.7.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 weight.*: layers.1.mlp.up_proj.weight"):
        load_model(folder)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(80, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        ValueError, match="1 weight\\(s\\) the llama config does not use: layers.7.mlp.extra.weight"
    ):
        load_model(folder)
    del tensors["model.layers.7.mlp.extra.weight"]
    save_file(tensors, folder / "model.safetensors")
    edit_json(folder / "config.json", intermediate_size=81)
    with pytest.raises(
        ValueError,
        match="do not fit.*layers.0.mlp.gate_proj.weight "
        "\\(80, 64\\) \\(config needs \\(81, 64\\)\\)",
    ):
        load_model(folder)


def adapter_copy(tiny, name: str, tmp_path: Path, **config_changes) -> Path:
    folder = Path(shutil.copytree(tiny["first"], tmp_path / name))
    edit_json(
        folder / "adapter_config.json",
        **{"base_model_name_or_path": str(tiny["base"]), **config_changes},
    )
    return folder


def test_adapter_without_base_names_the_key(tiny, tmp_path):
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        load_model(adapter_copy(tiny, "no_base", tmp_path, base_model_name_or_path=None))
    with pytest.raises(
        FileNotFoundError, match="base model 'meta-llama/Llama-2-7b' \\(base_model_name_or_path in"
    ):
        load_model(
            adapter_copy(
                tiny, "hub_base", tmp_path, base_model_name_or_path="meta-llama/Llama-2-7b"
            )
        )


def test_unsupported_adapter_options(tiny, tmp_path):
    with pytest.raises(ValueError, match="unsupported LoRA option\\(s\\) use_dora=True"):
        load_model(adapter_copy(tiny, "dora", tmp_path, use_dora=True))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        load_model(adapter_copy(tiny, "ia3", tmp_path, peft_type="IA3"))
    no_weights = adapter_copy(tiny, "pickled", tmp_path)
    (no_weights / "adapter_model.safetensors").rename(no_weights / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors.*pickle"):
        load_model(no_weights)


def test_adapter_target_module_missing_from_base(tiny, tmp_path):
    with pytest.raises(
        ValueError, match="targets module\\(s\\) missing from the base model: c_attn"
    ):
        load_model(
            adapter_copy(tiny, "gpt2_targets", tmp_path, target_modules=["q_proj", "c_attn"])
        )


def test_adapter_of_another_model_does_not_fit(tiny, tmp_path):
    wider = tiny_hf_model("llama", seed=3, hidden_size=32, num_hidden_layers=3)
    adapter = write_adapter(
        wider, tmp_path / "wider", targets=["q_proj"], seed=3, base=str(tiny["base"])
    )
    with pytest.raises(
        ValueError, match="does not fit its base at layers.0.self_attn.q_proj: lora_A \\(4, 32\\)"
    ):
        load_model(adapter)
    tensors = {
        k: v
        for k, v in load_file(adapter / "adapter_model.safetensors").items()
        if ".layers.2." in k
    }
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(
        ValueError, match="targets layers.2.self_attn.q_proj, but the base model has no such weight"
    ):
        load_model(adapter)


def test_gguf_file_goes_through_transformers(tiny, tmp_path, monkeypatch):
    """The GGUF branch's plumbing, with transformers' (slow) dequantization replaced by a tiny
    model; the real dequantization runs in test_default_model.py."""
    from llm2vec_fast import weights

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    tokenizer_calls = []
    monkeypatch.setattr(
        weights, "load_gguf_as_transformers", lambda path: copy.deepcopy(tiny["hf"])
    )
    monkeypatch.setattr(
        weights,
        "auto_tokenizer",
        lambda folder, **kwargs: tokenizer_calls.append((folder, kwargs)),
    )
    model, _ = load_model(gguf)
    assert tokenizer_calls == [(tmp_path, {"gguf_file": "tiny.gguf"})]
    assert model.loaded_from.files == (gguf,)
    expected, _ = load_model(tiny["base"])
    for (name, param), (_, reference) in zip(
        model.state_dict().items(), expected.state_dict().items()
    ):
        assert torch.equal(param, reference), name


def test_a_bare_decoder_checkpoint_encodes_but_has_no_lm_head(tiny, tmp_path):
    """llm2vec's save() writes the bare decoder (no lm_head, untied): enough to encode."""
    bare = tmp_path / "bare"
    tiny["hf"].model.save_pretrained(bare)
    shutil.copy(tiny["base"] / "tokenizer.json", bare)
    shutil.copy(tiny["base"] / "tokenizer_config.json", bare)
    model, _ = load_model(bare)
    full, _ = load_model(tiny["base"])
    sequences = random_sequences([6, 11], seed=5)
    for ours, expected in zip(
        runtime_hidden_states(model, sequences, causal=False),
        runtime_hidden_states(full, sequences, causal=False),
    ):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no lm_head.weight .*MNTP training needs"):
        _ = model.lm_head_weight


def test_damaged_files_are_named(tiny, tmp_path):
    truncated = copy_base(tiny, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=r"truncated/model.safetensors: not a readable safetensors file"
    ):
        load_model(truncated)
    bad_json = copy_base(tiny, tmp_path / "bad_json")
    (bad_json / "config.json").write_text('{"model_type": "llama",\n}')
    with pytest.raises(
        ValueError, match=r"bad_json/config.json: not valid JSON \(.* at line 2, column 1\)"
    ):
        load_model(bad_json)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00junk")
    with pytest.raises(ValueError, match=r"junk.gguf: cannot read this GGUF file"):
        load_model(tmp_path / "junk.gguf")
