"""A draft head for the target, in the spirit of EAGLE: one decoder layer that reads the
target's own features and predicts its next feature, token by token.

- :mod:`.network`: the head (:class:`DraftHead`) and its save / load;
- :mod:`.drafter`: :class:`HeadDrafter`, the drafter speculative decoding uses;
- :mod:`.data`: its training data (the target's features and greedy choices), saved and reused;
- :mod:`.spec`: :class:`HeadSpec`, what a head is made from;
- :mod:`.training`: :func:`train_head` and the ``rootdefense draft train`` recipe.
"""

from .data import (
    distillation_data,
    load_rows,
    reference_data,
    save_rows,
    saved_rows,
    tap_note,
    tap_tag,
)
from .drafter import HeadDrafter
from .network import DraftHead, check_taps, load_head, save_head
from .spec import HeadSpec
from .training import head_meta, train_from_sharegpt, train_head

__all__ = ["DraftHead", "HeadDrafter", "HeadSpec", "check_taps", "distillation_data", "head_meta", "load_head",
           "load_rows", "reference_data", "save_head", "save_rows", "saved_rows", "tap_note", "tap_tag",
           "train_from_sharegpt", "train_head"]
