"""Candidate sources for speculative decoding: drafters guess the answer's next tokens; the
engine (:mod:`rootdefense.decoding.engine`) verifies a whole chain in one forward and
scores the harm of every drafted token there."""

from .base import Drafter, NoDrafter
from .factory import DRAFTER_NAMES, check_drafter_name, make_drafter
from .model import DraftModelDrafter
from .ngram import PromptLookupDrafter

__all__ = ["DRAFTER_NAMES", "DraftModelDrafter", "Drafter", "NoDrafter", "PromptLookupDrafter",
           "check_drafter_name", "make_drafter"]
