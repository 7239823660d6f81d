"""Speculative RDS: drafters guess the answer's next tokens, one target forward verifies a
whole chain and scores the harm of every drafted token, and a harmful one is corrected by
the plain decoder's exact candidate scoring."""

from .base import Drafter, NoDrafter
from .decoder import SpeculativeDecoder
from .factory import DRAFTER_NAMES, check_drafter_name, make_drafter
from .model import DraftModelDrafter
from .ngram import PromptLookupDrafter

__all__ = ["DRAFTER_NAMES", "DraftModelDrafter", "Drafter", "NoDrafter", "PromptLookupDrafter", "SpeculativeDecoder",
           "check_drafter_name", "make_drafter"]
