"""Decoding: the RDS loop, exact candidate scoring, decision rules, per-token traces."""

from .config import GenerationConfig
from .loop import Decoder, Generation
from .rules import RULES, PaperRule, Rule, ThresholdRule, WeightedRule, make_rule
from .trace import TokenStep, Trace

__all__ = ["GenerationConfig", "Decoder", "Generation", "RULES", "Rule", "PaperRule",
           "ThresholdRule", "WeightedRule", "make_rule", "TokenStep", "Trace"]
