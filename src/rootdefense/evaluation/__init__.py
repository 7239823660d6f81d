"""Evaluation harness: attacks x defenses x datasets, judged, with a report.

    from rootdefense.evaluation import EvalConfig, run_eval
    summary = run_eval(EvalConfig.from_dict({"attacks": ["none", "prefill"]}), "out/eval")
"""

from .base import AttackedPrompt, Attack, Defense, EvalContext, Judge, Verdict
from .config import EvalConfig
from .report import write_outputs
from .runner import run_eval

__all__ = ["AttackedPrompt", "Attack", "Defense", "EvalContext", "Judge", "Verdict", "EvalConfig",
           "run_eval", "write_outputs"]
