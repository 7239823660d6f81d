"""Warnings a user of the commands cannot act on, silenced at the command line's entry.

Only these: each is named by category and by the module that raises it, so a warning about
the user's own input or setup still shows. Library callers keep their own filters."""

from __future__ import annotations

import warnings

# (category, module regex): deprecations inside dependencies, raised by calls they make
# themselves (e.g. transformers' `is_gradient_checkpointing` alias, read by peft when the
# expert adapter is attached); nothing a user of rootdefense can change
UNACTIONABLE = (
    (FutureWarning, r"transformers(\.|$)"),
)


def silence_unactionable_warnings() -> None:
    for category, module in UNACTIONABLE:
        warnings.filterwarnings("ignore", category=category, module=module)
