"""Training the LLM2Vec way with LoRA: MNTP, unsupervised SimCSE, supervised contrastive.

``run(objective, config)`` trains one stage; ``llm2vec-fast train mntp|simcse|supervised
CONFIG.json`` does the same from the command line (``torchrun`` for several processes).
"""

__all__ = ["TrainConfig", "TrainResult", "config_from_dict", "load_config", "run"]


def __getattr__(name: str):
    # Lazy, so that `llm2vec-fast --help` (which imports train.cli) does not import torch.
    if name in ("TrainConfig", "config_from_dict", "load_config"):
        from . import config

        return getattr(config, name)
    if name in ("TrainResult", "run"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'llm2vec_fast.train' has no attribute {name!r}")
