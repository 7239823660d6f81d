"""Drafters by name, as users and configs spell them.

- ``none``: no speculation (one token per forward).
- ``lazy``: no drafts, but the speculative loop: candidates are scored only where the
  model's own token is flagged (threshold rule), not at every step. Same answers as ``none``.
- ``ngram``: prompt lookup, no training.
- ``model:NAME``: a small causal LM sharing the target's tokenizer (embedded name, hub id
  or local folder), loaded with the target's dtype and device.
- ``head`` / ``head:FOLDER``: the model's trained draft head (``rootdefense draft train``).
- ``ngram+head``: prompt lookup where the context repeats at least two tokens (a copy),
  the draft head elsewhere. Against lookup from one-token matches, this kept 4.0% and 2.5%
  more tokens per unit of verify cost (forward cost by width, as the bench profiles it) on
  held-out MT-bench prompts 5-12 and 13-20 (``scripts/draft_policy_replay.py``; the 5-prompt
  bench uses 0-4).
- ``auto``: prompt lookup, with the model's draft head behind it (``ngram+head``) when a
  head is trained and its held-out acceptance is at least ``HEAD_MIN_ACCEPTED`` tokens of 4
  (a weaker head costs more than it saves), so nothing ever waits for a training. The tuned
  defaults draft with it.
"""

from __future__ import annotations

from ..errors import InputError
from .base import Drafter, FirstOfDrafter, NoDrafter
from .model import DraftModelDrafter
from .ngram import PromptLookupDrafter

DRAFTER_NAMES = ("none", "lazy", "auto", "ngram", "head", "ngram+head", "head:FOLDER", "model:NAME")
# held-out tokens accepted of 4 for ``auto`` to add the head. Measured on the embedded model
# (results/bench): a head at 0.38 made speculative RDS slower than no drafts; one at 0.72,
# behind prompt lookup, made it faster than prompt lookup alone.
HEAD_MIN_ACCEPTED = 0.6
_PLAIN_NAMES = tuple(n for n in DRAFTER_NAMES if ":" not in n)  # the names without an argument


def head_pays(folder) -> bool:
    """Whether the trained head in ``folder`` drafts well enough for ``auto``."""
    import json
    from pathlib import Path

    meta = Path(folder) / "head.json"
    if not meta.exists():
        return False
    try:
        accepted = json.loads(meta.read_text()).get("train", {}).get("val_mean_accepted_of_4")
    except (OSError, ValueError, AttributeError):
        return False
    return accepted is not None and accepted >= HEAD_MIN_ACCEPTED


def check_drafter_name(name: str | None) -> None:
    if name is None or name in _PLAIN_NAMES:
        return
    for prefix in ("model:", "head:"):
        if name.startswith(prefix) and name[len(prefix):].strip():
            return
    raise InputError(f"unknown drafter '{name}'; choose one of {', '.join(DRAFTER_NAMES)}")


def make_drafter(name: str | None, lm) -> Drafter | None:
    """The drafter called ``name`` for the target ``lm`` (a LoadedModel); None for no drafts."""
    check_drafter_name(name)
    if name in (None, "none"):
        return None
    from ..paths import head_dir
    from .head import HeadDrafter, load_head

    if name == "auto":
        return make_drafter("ngram+head" if head_pays(head_dir(lm.model_id)) else "ngram", lm)
    if name == "ngram":
        return PromptLookupDrafter()
    if name == "lazy":
        return NoDrafter()
    if name == "ngram+head":  # a one-token match is a weak guess: the head guesses better there
        return FirstOfDrafter([PromptLookupDrafter(min_ngram=2),
                               HeadDrafter(lm.model, load_head(head_dir(lm.model_id), lm)[0])])
    if name == "head" or name.startswith("head:"):
        folder = head_dir(lm.model_id) if name == "head" else name[len("head:"):].strip()
        return HeadDrafter(lm.model, load_head(folder, lm)[0])
    from ..models import load_model

    draft = load_model(name[len("model:"):].strip(), dtype=str(lm.dtype).replace("torch.", ""), device=str(lm.device))
    return DraftModelDrafter(draft.model, draft.tokenizer, lm.tokenizer)
