"""Gradual top-down unfreezing, and ``auto``: the reviews' protocol as one strategy.

The reviews advise (Kim et al. 2022; design.md, "Transfer strategies"): start with the frozen
feature extractor; unfreeze blocks from the top, one at a time, while validation improves; update
every layer only when that helps. Each stage trains from the best state so far. A stage that does
not beat the best validation AUC by ``MIN_DELTA`` is undone and ends the climb.

This module holds the plan and the decisions, kept apart from training so that the stopping rule
is tested on its own; ``TransferClassifier`` trains the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from medtl.errors import MedtlError

# Below the sampling error of AUC on a validation split of a few hundred images: an
# improvement this small is not worth the cost of more trainable layers.
MIN_DELTA = 0.001


@dataclass(frozen=True)
class Stage:
    """One step of the climb: ``unfreeze`` top blocks train (0 = the head alone)."""

    index: int
    name: str
    unfreeze: int


@dataclass
class StageResult:
    stage: str
    unfreeze: int
    val_auc: float
    epochs: int
    best_epoch: int
    seconds: float
    trainable_params: int
    accepted: bool = False
    decision: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plan_stages(block_names: Sequence[str], cap: int | None = None, *,
                full_name: str | None = None) -> list[Stage]:
    """The stages of ``auto`` or ``fine-tune --gradual``, bottom of the climb first.

    ``cap`` limits how many blocks may end up trainable (``--unfreeze``); by default all.
    ``full_name`` names the stage that trains every block (``auto`` calls it ``full``, as Kim
    et al. do, "fine-tuning from scratch").
    """
    n = len(block_names)
    top = n if cap is None else cap
    if not 1 <= top <= n:
        raise MedtlError(f"--unfreeze {cap}: the climb needs 1 to {n} blocks "
                         f"({', '.join(block_names)})")
    stages = [Stage(0, "feature-extractor", 0)]
    for k in range(1, top + 1):
        name = full_name if full_name and k == n else f"fine-tune top {k}"
        stages.append(Stage(k, name, k))
    return stages


def climb(
    stages: Sequence[Stage],
    train_stage: Callable[[Stage], StageResult],
    *,
    accept: Callable[[Stage, StageResult], None],
    reject: Callable[[Stage, StageResult, StageResult], None],
    done: Sequence[StageResult] = (),
    min_delta: float = MIN_DELTA,
) -> list[StageResult]:
    """Run ``stages`` in order until one fails to improve validation AUC; return every result.

    ``train_stage`` trains one stage from the current best state. ``accept(stage, result)``
    makes its state the new best; ``reject(stage, result, best)`` restores ``best``'s state.
    ``done`` holds the results of stages finished before an interruption: the climb continues
    after them (and does nothing when the last of them was rejected).
    """
    results = list(done)
    accepted = [r for r in results if r.accepted]
    best = accepted[-1] if accepted else None
    if results and not results[-1].accepted:
        return results
    for stage in stages[len(results):]:
        result = train_stage(stage)
        following = stages[stage.index + 1] if stage.index + 1 < len(stages) else None
        if best is None:
            result.accepted = True
            result.decision = "accepted: the starting point"
        elif result.val_auc > best.val_auc + min_delta:
            result.accepted = True
            result.decision = (f"accepted: +{result.val_auc - best.val_auc:.4f} over "
                               f"'{best.stage}'")
        else:
            result.accepted = False
            result.decision = (f"rejected: not above '{best.stage}' ({best.val_auc:.4f}) by "
                               f"{min_delta}; back to '{best.stage}', and stop")
        if result.accepted:
            result.decision += (f"; next: '{following.name}'" if following is not None
                                else "; no block left to unfreeze: stop")
            accept(stage, result)
            best = result
        else:
            reject(stage, result, best)
        results.append(result)
        if not result.accepted:
            break
    return results
