"""rds-expert's correction: a monitor flags a harmful answer, the hook rolls it back, and
steering with the safety expert writes it again; a guard stops loops."""

from .guard import DegenerationGuard
from .hook import Correction, RowCorrection, Verdict
from .monitor import RecoveryMonitor
from .settings import CorrectionSettings
from .steering import BASE, EXPERT, steer_choice, steer_stages, union_pool

__all__ = ["BASE", "EXPERT", "Correction", "CorrectionSettings", "DegenerationGuard", "RecoveryMonitor",
           "RowCorrection", "Verdict", "steer_choice", "steer_stages", "union_pool"]
