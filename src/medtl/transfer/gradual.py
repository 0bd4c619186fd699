"""Gradual top-down unfreezing, and ``auto``: the reviews' protocol as one strategy.

The reviews advise (Kim et al. 2022; design.md, "Transfer strategies"): start with the frozen
feature extractor; unfreeze blocks from the top, one at a time, while validation improves; update
every layer only when that helps. Each stage trains from the best state so far. A stage that does
not beat the best so far by :func:`decide`'s rule is undone and ends the climb.

The rule (docs/decisions.md, "auto on a saturated validation set"), on validation only:

1. AUC decides when it separates the two: they differ by more than ``MIN_DELTA`` and are not
   both saturated (>= ``AUC_SATURATED``, where a 0.001 rise is below the noise and often
   impossible);
2. otherwise accuracy decides when it differs by more than its standard error on validation
   (``sqrt(p(1-p)/n)``, at least one image);
3. otherwise log-loss (the cross-entropy of the stage's probabilities) decides: lower by more
   than ``LOG_LOSS_REL`` (relative) keeps the challenger;
4. otherwise the best so far stays (fewer trainable layers, less cost).

This module holds the plan and the decisions, kept apart from training so that the stopping rule
is tested on its own; ``TransferClassifier`` trains the stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from medtl.errors import MedtlError

# Below the sampling error of AUC on a validation split of a few hundred images: an
# improvement this small is not worth the cost of more trainable layers.
MIN_DELTA = 0.001
# Both AUCs at or above this: AUC no longer tells stages apart (Kermany's validation: 0.997).
AUC_SATURATED = 0.99
# A log-loss this much lower (relative) is a real gain in how confidently images are right.
LOG_LOSS_REL = 0.02


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
    val_accuracy: float | None = None
    val_log_loss: float | None = None
    n_val: int = 0
    head: str = "linear"
    # The frozen stage's heads, each with its validation figures (auto); others: empty.
    candidates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def val_figures(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | int | None]:
    """Validation AUC (accuracy where undefined), accuracy, log-loss and n: what decide reads.

    Multi-label ``y_true`` (n, K), NaN unknown: the mean AUC over labels, the accuracy of
    ``p >= 0.5`` over known entries, the mean binary cross-entropy over known entries, and n
    the number of images."""
    from medtl.training.selection import selection_score

    if np.ndim(y_true) == 2:
        return _multilabel_figures(y_true, proba)
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    p_true = np.clip(proba[np.arange(len(y_true)), y_true], 1e-7, 1.0)
    return {"val_auc": float(selection_score(y_true, proba)),
            "val_accuracy": float(np.mean(proba.argmax(axis=1) == y_true)),
            "val_log_loss": float(-np.mean(np.log(p_true))), "n_val": int(len(y_true))}


def _multilabel_figures(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | int | None]:
    from medtl.training.selection import selection_score, val_summary

    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(proba, dtype=np.float64), 1e-7, 1 - 1e-7)
    known = ~np.isnan(y)
    bce = -(np.where(y == 1, np.log(p), np.log1p(-p)))[known]
    return {"val_auc": float(selection_score(y, proba)),
            "val_accuracy": float(val_summary(y, proba)["val_accuracy"]),
            "val_log_loss": float(bce.mean()) if bce.size else float("nan"),
            "n_val": int(len(y))}


def decide(new: StageResult, best: StageResult, min_delta: float = MIN_DELTA,
           ) -> tuple[bool, str]:
    """Whether ``new`` replaces ``best`` on validation (the module's rule), and why."""
    d_auc = new.val_auc - best.val_auc
    saturated = min(new.val_auc, best.val_auc) >= AUC_SATURATED
    if abs(d_auc) > min_delta and not saturated:
        return d_auc > 0, f"AUC {new.val_auc:.4f} vs {best.val_auc:.4f}"
    why = (f"AUC tied ({new.val_auc:.4f} vs {best.val_auc:.4f}, "
           f"{'both >= ' + str(AUC_SATURATED) if saturated else 'within ' + str(min_delta)})")
    if new.val_accuracy is not None and best.val_accuracy is not None:
        n = max(new.n_val, best.n_val, 1)
        p = best.val_accuracy
        se = max(float(np.sqrt(p * (1 - p) / n)), 1.0 / n)
        d_acc = new.val_accuracy - best.val_accuracy
        if abs(d_acc) > se:
            return d_acc > 0, (f"{why}; accuracy {new.val_accuracy:.4f} vs "
                               f"{best.val_accuracy:.4f} (SE {se:.4f})")
        why += f"; accuracy tied ({new.val_accuracy:.4f} vs {best.val_accuracy:.4f})"
    if new.val_log_loss is not None and best.val_log_loss is not None:
        better = new.val_log_loss < best.val_log_loss * (1 - LOG_LOSS_REL)
        return better, (f"{why}; log-loss {new.val_log_loss:.4f} vs {best.val_log_loss:.4f}"
                        f"{'' if better else f' (not {LOG_LOSS_REL:.0%} lower)'}")
    return False, why


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
    before: Callable[[Stage, StageResult | None], str | None] | None = None,
) -> list[StageResult]:
    """Run ``stages`` in order until one fails to improve validation AUC; return every result.

    ``train_stage`` trains one stage from the current best state. ``accept(stage, result)``
    makes its state the new best; ``reject(stage, result, best)`` restores ``best``'s state.
    ``done`` holds the results of stages finished before an interruption: the climb continues
    after them (and does nothing when the last of them was rejected). ``before(stage, best)``
    may return why the climb must stop before ``stage`` (a time budget); the best is kept.
    """
    results = list(done)
    accepted = [r for r in results if r.accepted]
    best = accepted[-1] if accepted else None
    if results and not results[-1].accepted:
        return results
    for stage in stages[len(results):]:
        if before is not None and before(stage, best) is not None:
            break
        result = train_stage(stage)
        following = stages[stage.index + 1] if stage.index + 1 < len(stages) else None
        if best is None:
            result.accepted = True
            result.decision = "accepted: the starting point"
        elif result.decision.startswith("stopped"):  # train_stage gave up (time budget)
            result.accepted = False
            result.decision += f"; back to '{best.stage}', and stop"
        else:
            result.accepted, why = decide(result, best, min_delta)
            result.decision = (f"accepted over '{best.stage}': {why}" if result.accepted else
                               f"rejected against '{best.stage}': {why}; back to "
                               f"'{best.stage}', and stop")
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
