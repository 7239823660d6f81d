"""Model back ends: load any transformers causal LM, plus the embedded SmolLM2."""

from .loading import EMBEDDED_MODELS, LoadedModel, load_model, resolve_model_path
from .chat import encode_chat, normalize_messages

__all__ = [
    "EMBEDDED_MODELS",
    "LoadedModel",
    "load_model",
    "resolve_model_path",
    "encode_chat",
    "normalize_messages",
]
