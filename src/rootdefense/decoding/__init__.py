"""Decoding: the generation engine (one loop for every defense), exact candidate scoring,
decision rules, streamers and per-token traces."""

from .config import GenerationConfig
from .decoder import Decoder
from .engine import Engine, Request
from .generation import Generation
from .rules import RULES, PaperRule, Rule, ThresholdRule, WeightedRule, make_rule
from .streamer import Streamer, TextStreamer
from .trace import TokenStep, Trace

__all__ = [
           "RULES",
           "Decoder",
           "Engine",
           "Generation",
           "GenerationConfig",
           "PaperRule",
           "Request",
           "Rule",
           "Streamer",
           "TextStreamer",
           "ThresholdRule",
           "TokenStep",
           "Trace",
           "WeightedRule",
           "make_rule",
]
