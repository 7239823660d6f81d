"""What a draft head is made from: the sizes of its data and its training settings, one
spec, saved in the head's head.json."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError


@dataclass
class HeadSpec:
    prompts: int = 1500  # ShareGPT conversations (fit split)
    answer_tokens: int = 256
    draft_vocab: int = 8192  # the tokens the target chose most often in the answers
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 8
    window: int = 96  # training sequence length (tokens), ending inside the answer
    feature_weight: float = 1.0
    token_weight: float = 0.1
    gen_batch: int = 16
    seed: int = 0
    schedule: str = "constant"  # learning rate: constant, or cosine (decays to 0 over the epochs)
    # training passes over each window: 1 reads the target's features only; each further pass
    # reads the head's own predicted features of the pass before (shifted one position), as
    # it does from its second drafted token on
    unroll: int = 1
    # extra target layers the head reads, as EAGLE-3 does (low and middle features beside the
    # final one): indices into the model's hidden states (i = the output of decoder layer i - 1)
    taps: tuple[int, ...] = ()

    def __post_init__(self):
        self.taps = tuple(int(t) for t in self.taps)
        if any(t < 1 for t in self.taps) or len(set(self.taps)) != len(self.taps) \
                or list(self.taps) != sorted(self.taps):
            raise InputError(f"draft head taps must be distinct increasing layer indices >= 1, got {self.taps}")
        for name in ("prompts", "answer_tokens", "draft_vocab", "epochs", "batch_size", "window", "gen_batch",
                     "unroll"):
            if getattr(self, name) < 1:
                raise InputError(f"draft head setting '{name}' must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine"):
            raise InputError(f"draft head schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0 < self.lr < 1:
            raise InputError(f"lr must lie in (0, 1), got {self.lr}")
