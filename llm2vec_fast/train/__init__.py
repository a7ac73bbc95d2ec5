"""Training the LLM2Vec way with LoRA: MNTP, unsupervised SimCSE, supervised contrastive.

``run(objective, config)`` trains one stage; ``llm2vec-fast train mntp|simcse|supervised
CONFIG.json`` does the same from the command line (``torchrun`` for several processes).
"""

from .config import TrainConfig, config_from_dict, load_config
from .loop import TrainResult, run

__all__ = ["TrainConfig", "TrainResult", "config_from_dict", "load_config", "run"]
