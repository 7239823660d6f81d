"""Evaluation harness: attacks x defenses x datasets, judged, with a report.

    from rootdefense.evaluation import EvalConfig, run_eval
    summary = run_eval(EvalConfig.from_dict({"attacks": ["none", "prefill"]}), "out/eval")
"""

from .base import Attack, AttackedPrompt, Defense, EvalContext, Judge, Verdict
from .config import EvalConfig
from .report import write_outputs
from .runner import run_eval

__all__ = [
           "Attack",
           "AttackedPrompt",
           "Defense",
           "EvalConfig",
           "EvalContext",
           "Judge",
           "Verdict",
           "run_eval",
           "write_outputs",
]
