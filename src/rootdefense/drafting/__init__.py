"""Speculative RDS: drafters guess the answer's next tokens, one target forward verifies a
whole chain and scores the harm of every drafted token, and a harmful one is corrected by
the plain decoder's exact candidate scoring."""

from .base import Drafter
from .decoder import SpeculativeDecoder
from .model import DraftModelDrafter
from .ngram import PromptLookupDrafter

__all__ = ["DraftModelDrafter", "Drafter", "PromptLookupDrafter", "SpeculativeDecoder"]
