"""The training loop shared by MNTP, SimCSE and supervised training: LoRA, AdamW, a warmup
schedule, gradient accumulation, data parallelism, atomic checkpoints and exact resumption.

A checkpoint (``output_dir/checkpoint-N``) holds the adapter in peft's format plus
``training_state.pt`` (optimizer, scheduler, RNG states, step). It is written to a temporary
folder and renamed into place, so a run killed at any moment (SIGKILL included) leaves only
complete checkpoints; ``resume=True`` continues from the newest one with the same data order
and RNG stream, so the loss curve is the one of an uninterrupted run.

``output_dir/train_log.jsonl`` gets one line per optimizer step: step, loss, learning rate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import fsync_dir, read_json_object, write_atomically
from ..loading import load_model
from ..settings import (
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    LLM2VEC_CONFIG_FILE,
    LLM2VEC_DOC_MAX_LENGTH,
    TRAIN_CONFIG_FILE,
    resolve_training_dtype,
)
from . import distributed
from .config import TrainConfig, config_from_dict, load_config
from .data import BatchOrder
from .lora import add_lora, load_lora_state_dict, save_adapter
from .mntp import MNTPObjective
from .simcse import SimCSEObjective
from .state import JSON_FILE as STATE_JSON_FILE
from .state import load_training_state, save_training_state
from .supervised import SupervisedObjective

logger = logging.getLogger("llm2vec_fast.train")

OBJECTIVES = {"mntp": MNTPObjective, "simcse": SimCSEObjective, "supervised": SupervisedObjective}
CHECKPOINT_PREFIX = "checkpoint-"
# what a resumed run may set differently from the run that wrote the checkpoint
RESUMABLE_CHANGES = frozenset({"stop_after_n_steps", "save_steps", "logging_steps"})
PATH_KEYS = (
    "model_name_or_path",
    "peft_model_name_or_path",
    "dataset_file_path",
    "train_file",
    "output_dir",
)
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # the steps run by this call


def run(
    objective: str,
    config: TrainConfig | dict | str | Path,
    *,
    resume: bool = False,
    step_callback: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train one stage (``mntp``, ``simcse`` or ``supervised``) from a config file, dict or object.

    ``step_callback(step, loss)`` runs after every optimizer step (progress bars, tests).
    Under ``torchrun`` every process calls this; rank 0 writes the files.
    """
    if isinstance(config, (str, Path)):
        config = load_config(objective, config)
    elif isinstance(config, dict):
        config = config_from_dict(objective, config)
    elif config.objective != objective:
        raise ValueError(f"the config is for {config.objective!r}, not {objective!r}")
    context = distributed.setup()
    return Trainer(config, context).train(resume=resume, step_callback=step_callback)


def lr_lambda(kind: str, warmup: int, horizon: int) -> Callable[[int], float]:
    """transformers' schedules: linear warmup, then linear / cosine decay to 0 at ``horizon``;
    ``constant`` ignores the warmup, as transformers' does."""

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup) / max(1, horizon - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)

    return factor


class Trainer:
    def __init__(self, config: TrainConfig, context: distributed.DistContext) -> None:
        self.config = config
        self.context = context
        self.output_dir = Path(config.output_dir)
        self.dtype = resolve_training_dtype(config.torch_dtype, context.device)

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        adapters = [config.peft_model_name_or_path] if config.peft_model_name_or_path else []
        self.model, self.tokenizer = load_model(
            config.model_name_or_path,
            adapters=adapters,
            dtype=self.dtype,
            device=self.context.device,
        )
        add_lora(
            self.model, r=config.lora_r, alpha=float(config.lora_alpha), dropout=config.lora_dropout
        )
        if config.gradient_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.model.train()
        self.objective = OBJECTIVES[config.objective](
            config, self.tokenizer, self.model, self.context
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.forward_model = distributed.data_parallel(self.model, self.context)
        self.order = BatchOrder(
            len(self.objective),
            config.per_device_train_batch_size,
            self.context.world,
            config.seed,
            groups=getattr(self.objective, "groups", None),
        )
        self.objective.data_report.dropped_tail_examples = self.order.unused_per_epoch
        if (
            config.max_steps <= 0
            and self.order.batches_per_epoch < config.gradient_accumulation_steps
        ):
            raise ValueError(
                "config: one optimizer step takes gradient_accumulation_steps="
                f"{config.gradient_accumulation_steps} batches, but an epoch has "
                f"{self.order.batches_per_epoch}: lower it, or set max_steps"
            )
        steps_per_epoch = max(1, self.order.batches_per_epoch // config.gradient_accumulation_steps)
        self.horizon = (
            config.max_steps
            if config.max_steps > 0
            else max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
        )
        self.total_steps = min(self.horizon, config.stop_after_n_steps or self.horizon)
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.lr_scheduler_type, config.warmup_steps, self.horizon)
        )
        if config.lr_scheduler_type == "constant" and config.warmup_steps and self.context.is_main:
            logger.warning(
                "lr_scheduler_type constant ignores warmup_steps=%d, as transformers' does"
                " (constant_with_warmup uses it)",
                config.warmup_steps,
            )

    # ------------------------------------------------------------------ training

    def train(
        self, *, resume: bool, step_callback: Callable[[int, float], None] | None
    ) -> TrainResult:
        config = self.config
        if self.context.is_main:
            self._check_output_dir(resume)
        distributed.barrier(self.context)
        checkpoint = self._resume_checkpoint() if resume else None
        self._build()
        self._log_start()
        step = self._restore(checkpoint) if checkpoint is not None else 0
        if self.context.is_main:
            self._truncate_log(step)
        result = TrainResult(self.output_dir, step)
        accumulation = config.gradient_accumulation_steps
        while step < self.total_steps:
            started = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=self.context.device)
            for micro in range(accumulation):
                micro_batch = step * accumulation + micro
                indices = self.order.indices(micro_batch, self.context.rank)
                # DDP averages the gradients once, in the backward pass of the last micro-batch
                sync = micro == accumulation - 1 or not self.context.distributed
                with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                    loss = (
                        self.objective.loss(
                            self.forward_model, indices, self.order.epoch_of(micro_batch)
                        )
                        / accumulation
                    )
                    loss.backward()
                step_loss += loss.detach()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            step += 1
            loss_value = float(distributed.all_reduce_mean(step_loss, self.context))
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss became {loss_value} at step {step}; lower learning_rate or check the"
                    " data"
                )
            result.losses.append(loss_value)
            if self.context.is_main:
                self._append_log(
                    {
                        "step": step,
                        "loss": loss_value,
                        "lr": lr,
                        "seconds": time.perf_counter() - started,
                    }
                )
                if step % config.logging_steps == 0 or step == 1:
                    logger.info(
                        "step %d/%d loss %.4f lr %.3g", step, self.total_steps, loss_value, lr
                    )
            if step % config.save_steps == 0 and step < self.total_steps:
                self._save_checkpoint(step)
            if step_callback is not None:
                step_callback(step, loss_value)
        self._save_checkpoint(step)
        if self.context.is_main:
            self._save_final()
        distributed.barrier(self.context)
        result.steps = step
        return result

    # ------------------------------------------------------------------ files

    def _check_output_dir(self, resume: bool) -> None:
        output = self.output_dir.expanduser().resolve()
        if output.exists() and not output.is_dir():
            raise FileExistsError(f"config: output_dir {output} is a file, not a folder")
        for key in ("model_name_or_path", "peft_model_name_or_path"):
            source = getattr(self.config, key)
            if source and Path(source).expanduser().resolve() == output:
                raise ValueError(
                    f"config: output_dir is the {key} folder ({output}); the new adapter would"
                    " overwrite the model it trains on: choose another output_dir"
                )
        if not resume and self.output_dir.is_dir() and any(_checkpoints(self.output_dir)):
            raise FileExistsError(
                f"{self.output_dir} already holds checkpoints; pass --resume (resume=True) to"
                " continue that run, or choose another output_dir"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # the temporary folders of a save killed before its rename
        for leftover in self.output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
            if leftover.is_dir() and leftover.suffix in (".tmp", ".stale"):
                shutil.rmtree(leftover)

    def _resume_checkpoint(self) -> Path:
        """The newest complete checkpoint, written by a run with this config (up to the settings a
        resumed run may change); checked before the model is loaded."""
        checkpoints = _checkpoints(self.output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir} to resume from")
        folder = checkpoints[-1][1]
        saved_path = folder / TRAIN_CONFIG_FILE
        if not saved_path.is_file():  # nothing to compare the config with
            logger.warning(
                "%s does not record its config (%s): resuming without checking it",
                folder,
                TRAIN_CONFIG_FILE,
            )
            return folder
        saved = read_json_object(saved_path)
        current = _with_resolved_paths(self.config.to_dict())
        changed = [
            f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current))
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
        ]
        if changed:
            raise ValueError(
                f"--resume: {folder} was trained with another config ({'; '.join(changed[:6])});"
                " resume with the same config, or start a new output_dir"
            )
        return folder

    def _log_start(self) -> None:
        if not self.context.is_main:
            return
        config = self.config
        logger.info("data: %s", self.objective.data_report.summary())
        logger.info(
            "%s on %s (%s, %d process(es)): %d step(s) of %d x %d x %d example(s), lr %g,"
            " LoRA r=%d alpha=%g",
            config.objective,
            config.model_name_or_path,
            str(self.dtype).removeprefix("torch."),
            self.context.world,
            self.total_steps,
            config.per_device_train_batch_size,
            self.context.world,
            config.gradient_accumulation_steps,
            config.learning_rate,
            config.lora_r,
            config.lora_alpha,
        )

    def _base_path(self) -> str:
        """What the adapter applies to: the previous stage's adapter folder when there is one (it
        names its own base, so ``load_model(adapter)`` rebuilds the whole chain), else the base."""
        previous = self.config.peft_model_name_or_path or self.config.model_name_or_path
        return str(Path(previous).expanduser().resolve())

    def _write_base_config(self, folder: Path) -> None:
        """The base model's config.json in an adapter folder, as llm2vec's own adapter folders
        have it: the llm2vec package reads it, and its ``_name_or_path`` (the base's identity,
        which picks llm2vec's text wrappers) is what training used, however the stages are loaded
        later."""
        base_config = Path(self.config.model_name_or_path).expanduser() / CONFIG_FILE
        if not base_config.is_file():  # a GGUF base: no config.json to carry (nor a stale one)
            (folder / CONFIG_FILE).unlink(missing_ok=True)
            return
        # a copy keeps the base's _name_or_path, which model_identity reads from this file
        write_atomically(folder / CONFIG_FILE, lambda tmp: shutil.copyfile(base_config, tmp))

    def _save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint-<step>`` atomically (temporary folder renamed into place)."""
        if not self.context.is_main:
            distributed.barrier(self.context)
            return
        tmp = Path(
            tempfile.mkdtemp(
                dir=self.output_dir, prefix=f".{CHECKPOINT_PREFIX}{step}.", suffix=".tmp"
            )
        )
        self._write_base_config(tmp)
        save_adapter(self.model, tmp, self._base_path())
        save_training_state(tmp, step, self.context.world, self.optimizer, self.scheduler)
        (tmp / TRAIN_CONFIG_FILE).write_text(
            json.dumps(_with_resolved_paths(self.config.to_dict()), indent=2) + "\n"
        )
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        target = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        if target.exists():
            stale = target.with_name(f".{target.name}.stale")
            os.replace(target, stale)
            os.replace(tmp, target)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, target)
        fsync_dir(self.output_dir)
        distributed.barrier(self.context)

    def _restore(self, folder: Path) -> int:
        """Load a checkpoint into the model, optimizer, scheduler and RNG; returns its step."""
        from safetensors.torch import load_file

        load_lora_state_dict(self.model, load_file(str(folder / ADAPTER_WEIGHTS_FILE)))
        step, world = load_training_state(folder, self.optimizer, self.scheduler)
        if world != self.context.world:
            raise ValueError(
                f"{folder} was written by {world} process(es); resume with the same number"
                f" (this run has {self.context.world})"
            )
        if self.context.is_main:
            logger.info("resumed from %s (step %d)", folder, step)
        return step

    def _append_log(self, record: dict[str, Any]) -> None:
        with open(self.output_dir / LOG_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _truncate_log(self, step: int) -> None:
        """Keep the log lines up to ``step``: the steps after it are run again."""
        path = self.output_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and _complete_step(line, step)
        ]
        write_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def _save_final(self) -> None:
        """The trained adapter in ``output_dir``, with the tokenizer and encoder settings beside
        it."""
        # the base config before the adapter: its identity never lags the weights
        self._write_base_config(self.output_dir)
        save_adapter(self.model, self.output_dir, self._base_path())
        self.tokenizer.save_pretrained(str(self.output_dir))
        # llm2vec's own keys only: its LLM2Vec.__init__ takes every key of this file. The attention
        # direction the encoder restores comes from train_config.json's "bidirectional". Training
        # cut texts at max_seq_length tokens alone; a doc_max_length of at least llm2vec's default
        # keeps that, without capping a larger max_length given at load below llm2vec's own 400.
        settings = {
            "pooling_mode": self.config.pooling_mode,
            "max_length": self.config.max_seq_length,
            "doc_max_length": max(self.config.max_seq_length, LLM2VEC_DOC_MAX_LENGTH),
            "skip_instruction": True,
        }
        write_atomically(
            self.output_dir / LLM2VEC_CONFIG_FILE,
            lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"),
        )
        write_atomically(
            self.output_dir / TRAIN_CONFIG_FILE,
            lambda tmp: tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n"),
        )
        logger.info("saved the adapter to %s", self.output_dir)


def _with_resolved_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The config with absolute paths: the same files compare equal however the path was written."""
    return {
        key: str(Path(value).expanduser().resolve()) if key in PATH_KEYS and value else value
        for key, value in config.items()
    }


def _complete_step(line: str, step: int) -> bool:
    try:
        return json.loads(line)["step"] <= step
    except (json.JSONDecodeError, KeyError, TypeError):
        return False  # a line cut by a kill


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are not)."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
        if path.is_dir() and suffix.isdigit() and (path / STATE_JSON_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)
