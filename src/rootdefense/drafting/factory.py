"""Drafters by name, as users and configs spell them.

- ``none``: no speculation (one token per forward).
- ``ngram``: prompt lookup, no training.
- ``model:NAME``: a small causal LM sharing the target's tokenizer (embedded name, hub id
  or local folder), loaded with the target's dtype and device.
- ``auto``: the best drafter available for the model without training anything: prompt
  lookup (a trained draft head will take precedence once one exists).
"""

from __future__ import annotations

from ..errors import InputError
from .base import Drafter
from .model import DraftModelDrafter
from .ngram import PromptLookupDrafter

DRAFTER_NAMES = ("none", "auto", "ngram", "model:NAME")


def check_drafter_name(name: str | None) -> None:
    if name is None or name in ("none", "auto", "ngram"):
        return
    if name.startswith("model:") and name[len("model:"):].strip():
        return
    raise InputError(f"unknown drafter '{name}'; choose one of {', '.join(DRAFTER_NAMES)}")


def make_drafter(name: str | None, lm) -> Drafter | None:
    """The drafter called ``name`` for the target ``lm`` (a LoadedModel); None for no drafts."""
    check_drafter_name(name)
    if name in (None, "none"):
        return None
    if name in ("auto", "ngram"):
        return PromptLookupDrafter()
    from ..models import load_model

    draft = load_model(name[len("model:"):].strip(), dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))
    return DraftModelDrafter(draft.model, draft.tokenizer, lm.tokenizer)
