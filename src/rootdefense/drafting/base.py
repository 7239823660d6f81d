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


class FirstOfDrafter(Drafter):
    """Asks its drafters in order and takes the first non-empty proposal; only the drafter
    that proposed hears how much of it was accepted. Prompt lookup first and the draft head
    after it: copies cost nothing to find and are often long, the head covers the rest."""

    def __init__(self, drafters: list[Drafter]):
        if not drafters:
            raise ValueError("FirstOfDrafter needs at least one drafter")
        self.drafters = list(drafters)
        self.name = "+".join(d.name for d in self.drafters)
        self.needs_target_features = any(getattr(d, "needs_target_features", False) for d in self.drafters)
        self._last: Drafter | None = None

    def propose(self, context: list[int], k: int) -> list[int]:
        self._last = None
        for d in self.drafters:
            draft = d.propose(context, k)
            if draft:
                self._last = d
                return draft
        return []

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        if self._last is not None:
            self._last.accepted(n_proposed, n_accepted)

    def reset(self) -> None:
        self._last = None
        for d in self.drafters:
            d.reset()

    def fresh(self) -> FirstOfDrafter:
        return FirstOfDrafter([d.fresh() for d in self.drafters])

    def close(self) -> None:
        for d in self.drafters:
            if hasattr(d, "close"):
                d.close()

    def describe(self) -> dict:
        return {"drafter": self.name, "parts": [d.describe() for d in self.drafters]}
