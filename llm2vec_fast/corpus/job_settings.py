"""The options of one embedding job, checked in one place before any input is read."""

from __future__ import annotations

from dataclasses import dataclass

from llm2vec_fast.corpus.inputs import Fields
from llm2vec_fast.settings import DEFAULT_MAX_BATCH_TOKENS

ON_LONG = ("truncate", "error")
OUTPUT_DTYPES = ("float32", "float16")
QUANTIZE = ("int8", "uint8", "binary", "ubinary")  # sentence-transformers' precisions
# rows of the job (the first embedded ones, in work order) whose min/max per dimension calibrate
# int8/uint8
CALIBRATION_ROWS = 10000
DEFAULT_SHARD_ROWS = 10000
# The settings that decide which rows a job holds and how it stores them: the manifest records
# them, and a job continues only with the same values.
RECORDED = (
    "id_field",
    "text_field",
    "instruction",
    "instruction_field",
    "on_long",
    "shard_rows",
    "output_dtype",
    "limit",
)
# recorded only when set, so that a job without them keeps the identity it had without them
RECORDED_WHEN_SET = ("quantize", "keep_float")
# each recorded only when given, for the same reason
RECORDED_WHEN_GIVEN = ("dim", "prompt", "prompt_name")


@dataclass(frozen=True)
class JobSettings:
    """Everything ``llm2vec-fast embed`` takes besides its inputs and output folder.

    The model options (``model`` to ``device``) are unused when the job is given a ready engine.
    """

    # which rows, and how they are stored (recorded in the manifest)
    id_field: str | None = None
    text_field: str = "text"
    instruction: str | None = None
    instruction_field: str | None = None
    on_long: str = "truncate"
    shard_rows: int = DEFAULT_SHARD_ROWS
    output_dtype: str = "float32"
    limit: int | None = None
    quantize: str | None = None  # int8, uint8, binary or ubinary codes instead of the floats
    keep_float: bool = False  # store the float column beside the codes
    dim: int | None = None  # Matryoshka: keep the first dim dimensions of each embedding
    prompt: str | None = None  # before every text without --instruction-field's instruction
    prompt_name: str | None = None  # one of the model's prompts (sentence-transformers folders)
    # what embeds them (the engine's description is recorded instead)
    model: str | None = None
    adapters: tuple[str, ...] = ()
    pooling_mode: str | None = None  # None: the adapter's llm2vec_config.json, else the default
    max_length: int | None = None  # None: the adapter's llm2vec_config.json, else the default
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    normalize: bool = False
    causal: bool = False
    cuda_graphs: bool = False
    dtype: str | None = None
    device: str | None = None
    # how this run goes
    resume: bool = False
    overwrite: bool = False
    # reader + tokenizer processes; 0: in this process; None: the default (0 for custom engines)
    workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(str(a) for a in self.adapters))
        if self.on_long not in ON_LONG:
            raise ValueError(f"on_long must be one of {ON_LONG}, got {self.on_long!r}")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ValueError(
                f"output_dtype must be one of {OUTPUT_DTYPES}, got {self.output_dtype!r}"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.quantize is None and self.keep_float:
            raise ValueError(
                "--keep-float keeps the floats beside --quantize codes: give --quantize"
            )
        if self.instruction is not None and self.instruction_field is not None:
            raise ValueError("give --instruction or --instruction-field, not both")
        given = [name for name in ("instruction", "prompt", "prompt_name") if getattr(self, name)]
        if len(given) > 1 or (self.prompt is not None and self.prompt_name is not None):
            raise ValueError("give one of --instruction, --prompt and --prompt-name")
        for name in ("shard_rows", "max_batch_tokens", "max_length", "dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.resume and self.overwrite:  # checked before the inputs are hashed
            raise ValueError(
                "--resume continues the job in the output folder and --overwrite deletes it:"
                " give one"
            )

    @property
    def fields(self) -> Fields:
        """Where the input rows keep their text, id and instruction."""
        return Fields(text=self.text_field, id=self.id_field, instruction=self.instruction_field)

    def recorded(self) -> dict:
        """The manifest's ``settings``."""
        recorded = {name: getattr(self, name) for name in RECORDED}
        if self.quantize is not None:
            recorded.update({name: getattr(self, name) for name in RECORDED_WHEN_SET})
        recorded.update(
            {
                name: getattr(self, name)
                for name in RECORDED_WHEN_GIVEN
                if getattr(self, name) is not None
            }
        )
        return recorded
