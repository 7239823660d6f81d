"""rootdefense: decoding-time jailbreak defense (Root Defense Strategies) for open LLMs."""

__version__ = "0.1.0"
