"""Model back ends: load any transformers causal LM, plus the embedded SmolLM2."""

from .chat import encode_chat, normalize_messages
from .loading import EMBEDDED_MODELS, LoadedModel, load_model, resolve_model_path

__all__ = [
    "EMBEDDED_MODELS",
    "LoadedModel",
    "encode_chat",
    "load_model",
    "normalize_messages",
    "resolve_model_path",
]
