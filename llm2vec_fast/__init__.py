"""llm2vec-fast: decoder LLMs as fast text encoders, the LLM2Vec way."""

__version__ = "0.1.0"

__all__ = ["LLM2Vec", "__version__", "read_embeddings"]


def __getattr__(name: str):
    # Lazy, so that `import llm2vec_fast.kernels` or `llm2vec-fast info` stay light.
    if name == "LLM2Vec":
        from .encoder import LLM2Vec

        return LLM2Vec
    if name == "read_embeddings":
        from .corpus.output import read_embeddings

        return read_embeddings
    raise AttributeError(f"module 'llm2vec_fast' has no attribute {name!r}")
