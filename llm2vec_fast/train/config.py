"""Training configuration: the ``llm2vec`` repository's JSON files (``train_configs/*/*.json``).

A config of that repository runs unchanged except for paths: data comes from local files. Keys
that only steer the Hugging Face Trainer or the hub (``attn_implementation``, ``do_eval``, ...) are
accepted and named in the log as ignored; any other unknown key is an error.

Defaults follow the LLM2Vec paper and its configs: MNTP masks 20% of the tokens with ``_`` (the
tokenizer's own mask token where it has one, as Gemma's ``<mask>``) and BERT's 80/10/10 rule
(Mistral's config: 80%, all of them replaced by the mask token), LoRA r=16, alpha=32, dropout
0.05 on q/k/v/o/gate/up/down; SimCSE dropout 0.3, lr 3e-5, batch 128, max length 128, loss
scale 20; supervised lr 2e-4, warmup 300, batch 64, loss scale 50.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import read_json_object
from ..settings import DEFAULT_MAX_LENGTH, DEFAULT_POOLING_MODE

logger = logging.getLogger(__name__)

OBJECTIVES = ("mntp", "simcse", "supervised")
MASK_TOKEN_TYPES = ("blank", "eos", "mask")
DATA_COLLATOR_TYPES = ("default", "all_mask")
LR_SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")

# Keys of the llm2vec configs (and of transformers' TrainingArguments) that steer features this
# trainer does not have or does not need; accepted so that those files run, and logged.
IGNORED_KEYS = frozenset(
    {
        "attn_implementation",
        "do_train",
        "do_eval",
        "do_predict",
        "per_device_eval_batch_size",
        "evaluation_strategy",
        "eval_strategy",
        "eval_steps",
        "overwrite_output_dir",
        "disable_tqdm",
        "remove_unused_columns",
        "save_only_model",
        "logging_dir",
        "report_to",
        "run_name",
        "preprocessing_num_workers",
        "overwrite_cache",
        "validation_split_percentage",
        "validation_file",
        "max_eval_samples",
        "streaming",
        "cache_dir",
        "use_fast_tokenizer",
        "low_cpu_mem_usage",
        "model_revision",
        "token",
        "use_auth_token",
        "trust_remote_code",
        "ddp_find_unused_parameters",
        "dataloader_num_workers",
        "dataloader_drop_last",
        "save_total_limit",
        "save_strategy",
        "logging_strategy",
        "bf16",
        "fp16",
        "tf32",
        "push_to_hub",
        "hub_model_id",
        "config_name",
        "tokenizer_name",
        "model_type",
        "config_overrides",
        "pad_to_max_length",
        "local_rank",
        "deepspeed",
        "optim",
        "dataset_config_name",
        "pad_to_multiple_of",
    }
)

_OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mntp": {
        "learning_rate": 5e-5,
        "warmup_steps": 0,
        "per_device_train_batch_size": 32,
        "max_seq_length": DEFAULT_MAX_LENGTH,
        "loss_scale": 1.0,
        "simcse_dropout": 0.0,
    },
    "simcse": {
        "learning_rate": 3e-5,
        "warmup_steps": 0,
        "per_device_train_batch_size": 128,
        "max_seq_length": 128,
        "loss_scale": 20.0,
        "simcse_dropout": 0.3,
    },
    "supervised": {
        "learning_rate": 2e-4,
        "warmup_steps": 300,
        "per_device_train_batch_size": 64,
        "max_seq_length": DEFAULT_MAX_LENGTH,
        "loss_scale": 50.0,
        "simcse_dropout": 0.0,
    },
}


@dataclass
class TrainConfig:
    """Every setting of one training run; ``None`` fields take the objective's default."""

    objective: str
    model_name_or_path: str
    output_dir: str
    peft_model_name_or_path: str | None = None
    dataset_name: str | None = None
    dataset_file_path: str | None = None
    train_file: str | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None
    warmup_steps: int | None = None
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_seq_length: int | None = None
    line_by_line: bool = False
    mask_token_type: str = "blank"
    data_collator_type: str = "default"
    mlm_probability: float = 0.2
    simcse_dropout: float | None = None
    loss_scale: float | None = None
    pooling_mode: str = DEFAULT_POOLING_MODE
    bidirectional: bool = True  # llm2vec's config key; code reads ``causal``
    lora_r: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    num_train_epochs: float = 3.0
    max_steps: int = -1
    stop_after_n_steps: int | None = None
    save_steps: int = 500
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    torch_dtype: str = "auto"
    seed: int = 42
    max_train_samples: int | None = None
    ignored: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}"
            )
        self._check_types()
        for key, value in _OBJECTIVE_DEFAULTS[self.objective].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r
        self._validate()

    def _check_types(self) -> None:
        """Each value has its field's JSON type: "false" is not False, "1e-4" not a number."""
        expected = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
        described = {
            "bool": "a boolean",
            "int": "an integer",
            "float": "a number",
            "str": "a string",
        }
        for item in dataclasses.fields(self):
            if item.name in ("objective", "ignored"):
                continue
            kind, _, optional = str(item.type).partition(" | ")
            value = getattr(self, item.name)
            if value is None and optional:
                continue
            wanted = expected[kind]
            if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
                or_null = " (or null)" if optional else ""
                raise ValueError(
                    f"config: {item.name} must be {described[kind]}{or_null}, got {value!r}"
                )

    def _validate(self) -> None:
        # here, not at the top: `llm2vec-fast --help` must not import torch
        from ..kernels.reference import POOLING_MODES
        from ..text import is_positive_int

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"config: {message}")

        for key in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "lora_r",
            "save_steps",
            "logging_steps",
        ):
            value = getattr(self, key)
            check(is_positive_int(value), f"{key} must be an integer >= 1, got {value!r}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(
            0.0 < self.mlm_probability <= 1.0,
            f"mlm_probability must be in (0, 1], got {self.mlm_probability}",
        )
        check(
            0.0 <= self.simcse_dropout < 1.0,
            f"simcse_dropout must be in [0, 1), got {self.simcse_dropout}",
        )
        check(
            0.0 <= self.lora_dropout < 1.0,
            f"lora_dropout must be in [0, 1), got {self.lora_dropout}",
        )
        check(self.loss_scale > 0, f"loss_scale must be > 0, got {self.loss_scale}")
        check(
            self.mask_token_type in MASK_TOKEN_TYPES,
            f"mask_token_type must be one of {MASK_TOKEN_TYPES}, got {self.mask_token_type!r}",
        )
        check(
            self.data_collator_type in DATA_COLLATOR_TYPES,
            f"data_collator_type must be one of {DATA_COLLATOR_TYPES},"
            f" got {self.data_collator_type!r}",
        )
        check(
            self.pooling_mode in POOLING_MODES,
            f"pooling_mode must be one of {POOLING_MODES}, got {self.pooling_mode!r}",
        )
        check(
            self.lr_scheduler_type in LR_SCHEDULERS,
            f"lr_scheduler_type must be one of {LR_SCHEDULERS}, got {self.lr_scheduler_type!r}",
        )
        check(
            self.torch_dtype in ("auto", "float32", "bfloat16", "float16"),
            f"torch_dtype must be auto, float32, bfloat16 or float16, got {self.torch_dtype!r}",
        )
        check(
            self.stop_after_n_steps is None or self.stop_after_n_steps >= 1,
            f"stop_after_n_steps must be >= 1, got {self.stop_after_n_steps}",
        )
        check(
            self.num_train_epochs > 0, f"num_train_epochs must be > 0, got {self.num_train_epochs}"
        )
        check(
            self.max_steps == -1 or self.max_steps >= 1,
            f"max_steps must be -1 (epochs decide) or >= 1, got {self.max_steps}",
        )
        check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(
            self.max_grad_norm >= 0,
            f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}",
        )
        for key in ("adam_beta1", "adam_beta2"):
            check(
                0.0 <= getattr(self, key) < 1.0,
                f"{key} must be in [0, 1), got {getattr(self, key)}",
            )
        check(self.adam_epsilon > 0, f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        check(
            self.max_train_samples is None or self.max_train_samples >= 1,
            f"max_train_samples must be >= 1 (or null), got {self.max_train_samples}",
        )

    @property
    def data_path(self) -> Path:
        """The local training data: ``dataset_file_path`` (llm2vec) or ``train_file`` (HF
        run_mlm)."""
        local = self.dataset_file_path or self.train_file
        if local:
            return Path(local).expanduser()
        if self.dataset_name:
            raise ValueError(
                f"config: dataset_name={self.dataset_name!r} names a hub dataset, which is never"
                " downloaded; set dataset_file_path (or train_file) to a local file "
                + (
                    "(one text per line)"
                    if self.objective != "supervised"
                    else "(JSONL: query, positive, negative, instruction)"
                )
            )
        raise ValueError(
            "config: no training data; set dataset_file_path (or train_file) to a local file"
        )

    @property
    def causal(self) -> bool:
        """The attention direction the runtime takes (the config file says ``bidirectional``)."""
        return not self.bidirectional

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps to run when fixed by the config (else set by the data size)."""
        limits = [
            n
            for n in (self.stop_after_n_steps, self.max_steps if self.max_steps > 0 else None)
            if n
        ]
        return min(limits) if limits else None

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ignored"
        }


def config_from_dict(
    objective: str, values: dict[str, Any], *, base_dir: Path | None = None
) -> TrainConfig:
    """A ``TrainConfig`` from an llm2vec-style dict; unknown keys raise, ignored keys are logged.

    Relative data paths are resolved against ``base_dir`` when they do not exist from the working
    directory (a config is usually written beside its data).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"objective", "ignored"}
    unknown = sorted(set(values) - known - IGNORED_KEYS)
    if unknown:
        raise ValueError(
            f"config: unknown key(s) {', '.join(unknown)} (not an llm2vec or trainer setting"
            " this trainer knows)"
        )
    ignored = {key: values[key] for key in sorted(set(values) & IGNORED_KEYS)}
    if ignored:
        logger.info("config keys accepted and ignored: %s", ", ".join(ignored))
    for required in ("model_name_or_path", "output_dir"):
        if not values.get(required):
            raise ValueError(f"config: {required} is required")
    settings = {key: value for key, value in values.items() if key in known}
    if base_dir is not None:
        for key in ("dataset_file_path", "train_file"):
            if (
                settings.get(key)
                and not Path(settings[key]).expanduser().is_absolute()
                and not Path(settings[key]).exists()
            ):
                settings[key] = str(base_dir / settings[key])
    return TrainConfig(objective=objective, ignored=ignored, **settings)


def load_config(objective: str, path: str | Path) -> TrainConfig:
    """Read a JSON config file (llm2vec's ``train_configs`` format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    return config_from_dict(objective, read_json_object(path), base_dir=path.parent)
