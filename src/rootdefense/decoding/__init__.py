"""Decoding: the RDS loop, exact candidate scoring, decision rules, per-token traces."""

from .config import GenerationConfig
from .loop import Decoder, Generation
from .rules import RULES, PaperRule, Rule, ThresholdRule, WeightedRule, make_rule
from .trace import TokenStep, Trace

__all__ = [
           "RULES",
           "Decoder",
           "Generation",
           "GenerationConfig",
           "PaperRule",
           "Rule",
           "ThresholdRule",
           "TokenStep",
           "Trace",
           "WeightedRule",
           "make_rule",
]
