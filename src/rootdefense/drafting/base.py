"""The drafter interface: anything that guesses how the answer goes on.

A drafter only proposes; the target model verifies every proposed token, so a bad drafter
costs speed, never correctness. The verify loop never asks which drafter it holds.
"""

from __future__ import annotations


class Drafter:
    """Proposes a chain of token ids continuing a context (prompt + answer so far).

    Proposals must be deterministic given the context and the drafter's state: speculative
    sampling treats the draft as a point mass, which is what makes it lossless.
    """

    name = "drafter"

    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to ``k`` token ids that may follow ``context`` (an empty list is allowed)."""
        raise NotImplementedError

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        """Feedback after verification: how many of the last proposal's tokens were kept."""

    def reset(self) -> None:
        """Forget everything about the previous generation."""

    def fresh(self) -> Drafter:
        """A new drafter of the same kind and settings with its own state, sharing anything
        heavy (a draft model's weights): batched decoders draft with one per prompt."""
        raise NotImplementedError(f"the {self.name} drafter cannot be copied for batched decoding")

    def describe(self) -> dict:
        return {"drafter": self.name}


class NoDrafter(Drafter):
    """Proposes nothing: every round verifies the model's own next token alone.

    With the threshold rule this is exact RDS scored lazily: one forward per harmless token,
    and candidates are scored only where the own token is flagged (the plain decoder scores
    them at every step). Same answers, fewer and smaller forwards; batches gain the most,
    since their rows share each one-token forward."""

    name = "lazy"

    def propose(self, context: list[int], k: int) -> list[int]:
        return []

    def fresh(self) -> NoDrafter:
        return NoDrafter()
