"""``auto``'s plan and clock: how long the climb's stages will take, and ``--time-budget``.

The estimate is a deliberately simple cost model, refined by every epoch measured: an epoch with
the top ``k`` of ``n`` blocks trainable costs a forward pass over the data, ``f``, plus a
backward pass through the trainable part, about twice its forward share: ``f * (1 + 2 k / n)``.
``f`` is first guessed from the frozen stage's feature pass (one forward pass over train + val,
without augmentation), then taken from the last epoch measured. A stage costs up to
``epochs`` such epochs (early stopping can only make it shorter).

With a budget, a stage the estimate says cannot finish before the budget ends is not started,
and an epoch ending past the budget stops the climb (``BudgetReached``); the best stage so far
is kept either way. Time already spent before a ``--resume`` counts against the budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from medtl.transfer.gradual import Stage


def now() -> float:
    """The climb's clock (tests replace it rather than sleep)."""
    return time.monotonic()


class BudgetReached(Exception):  # noqa: N818 - a signal, not an error: the run goes on
    """The time budget ended during a stage: the climb keeps its best stage so far."""


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


@dataclass
class ClimbPlan:
    """The stages still to run, their estimated seconds, and the budget (seconds; None: none)."""

    stages: Sequence[Stage]
    n_blocks: int
    epochs: int
    budget_s: float | None = None
    spent_s: float = 0.0  # before this process: a resumed climb's finished stages
    forward_s: float | None = None  # f: seconds of one forward pass over an epoch's data
    frozen_s: float | None = None
    start: float = field(default_factory=lambda: now())  # noqa: PLW0108 - now is replaced in tests

    # ------------------------------------------------------------------ measurements
    def observe_frozen(self, seconds: float, feature_s: float) -> None:
        self.frozen_s = seconds
        if self.forward_s is None and feature_s > 0:
            self.forward_s = feature_s  # a first guess; the first epoch replaces it

    def observe_epoch(self, unfreeze: int, seconds: float) -> None:
        self.forward_s = seconds / (1 + 2 * unfreeze / self.n_blocks)

    # ------------------------------------------------------------------ estimates
    def elapsed(self) -> float:
        return self.spent_s + now() - self.start

    def epoch_s(self, unfreeze: int) -> float | None:
        if self.forward_s is None:
            return None
        return self.forward_s * (1 + 2 * unfreeze / self.n_blocks)

    def stage_s(self, stage: Stage, epochs_done: int = 0) -> float | None:
        if stage.unfreeze == 0:
            return self.frozen_s
        per_epoch = self.epoch_s(stage.unfreeze)
        return None if per_epoch is None else per_epoch * max(self.epochs - epochs_done, 0)

    def left_s(self, stages: Sequence[Stage]) -> float | None:
        """Estimated seconds of ``stages`` that fit the budget; None when unknown."""
        left = self._left(stages)
        return None if left is None else left[0]

    def _left(self, stages: Sequence[Stage]) -> tuple[float, int] | None:
        """(seconds, how many) of the first ``stages`` that fit the budget."""
        times = [self.stage_s(s) for s in stages]
        if any(t is None for t in times):
            return None
        total, clock, n = 0.0, self.elapsed(), 0
        for t in times:
            if self.budget_s is not None and clock + total + t > self.budget_s:
                break  # this stage will not be started, nor any after it
            total, n = total + t, n + 1
        return total, n

    def fits(self, stage: Stage) -> bool:
        """Whether ``stage`` can start and finish within the budget, as far as is known."""
        if self.budget_s is None:
            return True
        t = self.stage_s(stage)
        return self.elapsed() + (t or 0.0) <= self.budget_s

    def over(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    # ------------------------------------------------------------------ words
    def announce(self, name: str) -> str:
        """The plan line logged before the climb starts."""
        budget = (f"time budget {minutes(self.budget_s)}" if self.budget_s is not None
                  else "no time budget")
        return (f"{name} plan: {len(self.stages)} stages "
                f"({' -> '.join(repr(s.name) for s in self.stages)}), up to {self.epochs} "
                f"epochs each; {budget}; the time estimate follows the first stage")

    def progress(self, following: Sequence[Stage]) -> str:
        """Where the climb stands: elapsed, estimated left, and the budget left."""
        known = self._left(following)
        text = f"{minutes(self.elapsed())} elapsed"
        if known is not None and following:
            left, n = known
            f = self.epoch_s(1)
            per = f", {f:.1f} s per epoch with the top block trainable" if f else ""
            skipped = (f"; {len(following) - n} more would not fit the budget"
                       if n < len(following) else "")
            text += (f"; estimated {minutes(left)} left for {n} more stage(s){per}"
                     f"{skipped}; {minutes(self.elapsed() + left)} in all")
        if self.budget_s is not None:
            text += f"; budget {minutes(max(self.budget_s - self.elapsed(), 0.0))} left"
        return text
