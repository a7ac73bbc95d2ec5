"""llm2vec-fast: decoder LLMs as fast text encoders, the LLM2Vec way."""

__version__ = "0.1.0"
