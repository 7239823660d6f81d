"""The safety expert: a LoRA adapter on the same model that refuses or redirects harmful
requests and answers benign ones as the base model does. A second source of candidate
tokens for correction, and the expert of the SafeDecoding baseline."""

from .adapter import EXPERT_ADAPTER, ExpertInfo, load_expert
from .train import ExpertSpec, build_examples, train_expert

__all__ = ["EXPERT_ADAPTER", "ExpertInfo", "ExpertSpec", "build_examples", "load_expert", "train_expert"]
