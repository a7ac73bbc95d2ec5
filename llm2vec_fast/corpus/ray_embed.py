"""Ray Data entry point: a callable class for ``Dataset.map_batches`` that embeds a text column.

Each Ray actor builds its engine once (``load_engine``: the model, its adapters, or ``fake:``)
and then embeds every batch it is given: the batch comes back with an ``embedding`` column
(fixed_size_list<float32>[dim], as the job's shards store it) and an ``error`` column (null for
a row that was embedded, else why not; the row's embedding is then null). A bad row never raises:
a cluster job does not stop for one document. See examples/ray_embed.py::

    ds = ray.data.read_parquet("s3://bucket/docs/")
    ds = ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"model": "/models/my-encoder", "device": "cuda"},
        batch_format="pyarrow",
        batch_size=4096,
        concurrency=8,
        num_gpus=1,
    )
    ds.write_parquet("s3://bucket/embeddings/")
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llm2vec_fast.corpus.engine import load_engine
from llm2vec_fast.corpus.rows import EMPTY_TEXT  # the job's reasons, for the same rows
from llm2vec_fast.corpus.tokens import NO_TOKENS


class EmbedBatches:
    """``Dataset.map_batches(EmbedBatches, fn_constructor_kwargs={...}, batch_format="pyarrow")``.

    ``model``, ``adapters``, ``pooling_mode`` and ``engine_options`` (``max_length``,
    ``device``, ``dtype``, ``max_batch_tokens``, ``normalize``, ``causal``, ...) are those of
    :func:`llm2vec_fast.corpus.engine.load_engine`. ``instruction`` is given with every text,
    ``instruction_column`` names a column holding one per row (not pooled, as in the job).
    """

    def __init__(
        self,
        model: str | None = None,
        adapters: Sequence[str] = (),
        *,
        pooling_mode: str | None = None,
        text_column: str = "text",
        instruction: str | None = None,
        instruction_column: str | None = None,
        embedding_column: str = "embedding",
        error_column: str = "error",
        **engine_options,
    ) -> None:
        if instruction is not None and instruction_column is not None:
            raise ValueError("give instruction or instruction_column, not both")
        self.engine = load_engine(model, adapters, pooling_mode=pooling_mode, **engine_options)
        self.dim = self.engine.describe()["dim"]
        self.text_column = text_column
        self.instruction = instruction
        self.instruction_column = instruction_column
        self.embedding_column = embedding_column
        self.error_column = error_column

    def __call__(self, batch):
        """A pyarrow Table (or a dict of columns, or a pandas DataFrame) in, the same rows out as
        a pyarrow Table with the embedding and error columns appended."""
        import pyarrow as pa

        table = _as_table(batch)
        texts = table.column(self.text_column).to_pylist()
        if self.instruction_column is not None:
            instructions = table.column(self.instruction_column).to_pylist()
        else:
            instructions = [self.instruction] * len(texts)
        errors: list[str | None] = [_text_error(text) for text in texts]
        good = [row for row, error in enumerate(errors) if error is None]
        inputs = [
            (instructions[row], texts[row]) if instructions[row] else texts[row] for row in good
        ]
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        items = self.engine.tokenize(inputs) if inputs else []
        to_embed = []
        for row, item in zip(good, items):
            if any(item.pool_mask):
                to_embed.append((row, item))
            else:  # pooling nothing would give a zero vector
                errors[row] = NO_TOKENS
        self._embed(to_embed, embeddings, errors)
        failed = pa.array([error is not None for error in errors])
        values = pa.array(embeddings.reshape(-1))
        vector = pa.list_(pa.field("element", pa.float32()), self.dim)  # as Parquet names it
        vectors = pa.FixedSizeListArray.from_arrays(values, type=vector, mask=failed)
        table = table.append_column(self.embedding_column, vectors)
        return table.append_column(self.error_column, pa.array(errors, pa.string()))

    def _embed(self, rows_and_items: list, out: np.ndarray, errors: list) -> None:
        """Fill ``out``'s rows; when the batch fails, each row alone, so that only the rows that
        fail by themselves get an error."""
        if not rows_and_items:
            return
        rows = [row for row, _ in rows_and_items]
        try:
            out[rows] = self.engine.embed([item for _, item in rows_and_items])
            return
        except Exception:  # the rows that cause it are found one by one below
            pass
        for row, item in rows_and_items:
            try:
                out[row] = self.engine.embed([item])[0]
            except Exception as error:
                errors[row] = f"{type(error).__name__}: {error}"


def _text_error(text) -> str | None:
    if text is None:
        return "missing text"
    if not isinstance(text, str):
        return f"text is a {type(text).__name__}, not a string"
    if not text.strip():
        return EMPTY_TEXT
    return None


def _as_table(batch):
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table(batch)
    return pa.Table.from_pandas(batch, preserve_index=False)
