"""The weights of a checkpoint-averaging window: uniform (LAWA), or the merge weights that stand in for a
learning-rate decay (WSM: Tian et al., *WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
Pre-training*, ICLR 2026).

WSM. Between consecutive snapshots θ₀ … θ_K (oldest first) a constant-LR run takes updates g₁ … g_K
(θⱼ = θⱼ₋₁ − gⱼ). Merging them with weights cⱼ ≥ 0, Σcⱼ = 1, gives

    Σⱼ cⱼ θⱼ = θ₀ − Σᵢ wᵢ gᵢ,   wᵢ = Σ_{j ≥ i} cⱼ,

the run as if update i had been scaled by a decay factor wᵢ (1 ≥ w₁ ≥ … ≥ w_K ≥ 0). Conversely a decay w maps to
c₀ = 1 − w₁, cⱼ = wⱼ − wⱼ₊₁, c_K = w_K.

The named shapes. A window holding n snapshots spans K = n − 1 updates. The decay shape f (f(0) = 1, f(1) = 0) is
sampled at the n + 1 equally spaced points 0, 1/n, …, 1: wᵢ = f(i / n) for i = 1 … n − 1, so

    cⱼ = f(j / n) − f((j + 1) / n),   j = 0 … n − 1,

the decay's drop over the j-th n-th of the window — every snapshot gets its share and the weights sum to
f(0) − f(1) = 1 exactly. The shapes:

* ``"linear"``: f(x) = 1 − x, so cⱼ = 1/n: the uniform mean. This is WSM's own observation, not an accident —
  LAWA's plain mean of constant-LR checkpoints *is* a linear decay to zero over the window.
* ``"cosine"``: f(x) = (1 + cos πx) / 2: weights peak mid-window and are symmetric (small at both ends).
* ``"1-sqrt"``: f(x) = 1 − √x (the WSD "1-sqrt" cooldown): the largest weight on the oldest snapshot,
  decreasing toward the newest (a fast early decay leaves the later updates little weight).

An explicit list gives the cⱼ of a full window directly (``window`` non-negative numbers, oldest first),
normalised to sum to 1. While the window is not yet full (n < window snapshots) a named shape is sampled over the
n snapshots present; a list uses its last n numbers (the window ends at the newest snapshot), normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_soup.errors import SoupError

__all__ = ["SHAPES", "check_window_weights", "window_weights"]

SHAPES = ("uniform", "linear", "cosine", "1-sqrt")

_DECAYS = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def check_window_weights(weights: object, window: int) -> str | None:
    """Why ``weights`` is not a valid ``weights`` argument for a window of ``window`` snapshots, or None.

    Example:
        >>> check_window_weights("cosine", 4) is None
        True
        >>> check_window_weights([1, 2], 3)
        '`weights` as a list needs one number per snapshot of the window (3), oldest first, got 2'
    """
    if isinstance(weights, str):
        if weights not in SHAPES:
            return f"`weights` can be {', '.join(repr(s) for s in SHAPES)} or a list of numbers, got {weights!r}"
        return None
    if not isinstance(weights, Sequence) or isinstance(weights, bytes):
        return f"`weights` can be {', '.join(repr(s) for s in SHAPES)} or a list of numbers, got {weights!r}"
    values = list(weights)
    if isinstance(window, int) and len(values) != window:
        return (
            f"`weights` as a list needs one number per snapshot of the window ({window}), oldest first, "
            f"got {len(values)}"
        )
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
    if bad:
        return f"`weights` must be finite non-negative numbers, got {bad}"
    if values and sum(values) <= 0:
        return f"`weights` must not all be zero, got {values}"
    return None


def window_weights(weights: str | Sequence[float], count: int) -> list[float]:
    """The weights c₀ … c_{count−1} (oldest first, summing to 1) for a window that holds ``count`` snapshots.

    Args:
        weights: a shape name (``"uniform"``, ``"linear"``, ``"cosine"``, ``"1-sqrt"``) or the full window's list.
        count: how many snapshots the window holds now (at most ``len(weights)`` for a list).

    Raises:
        SoupError: a bad shape or count, or a list whose last ``count`` numbers are all zero.

    Example:
        >>> window_weights("linear", 4)
        [0.25, 0.25, 0.25, 0.25]
        >>> [round(c, 4) for c in window_weights("cosine", 4)]
        [0.1464, 0.3536, 0.3536, 0.1464]
        >>> window_weights([0, 1, 3], 2)
        [0.25, 0.75]
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SoupError(f"`count` must be a positive int, got {count!r}.")
    if isinstance(weights, str):
        if weights == "uniform":
            return [1.0 / count] * count
        if weights not in _DECAYS:
            raise SoupError(f"`weights` can be {', '.join(repr(s) for s in SHAPES)} or a list, got {weights!r}.")
        f = _DECAYS[weights]
        return [f(j / count) - f((j + 1) / count) for j in range(count)]
    values = [float(v) for v in weights]
    if count > len(values):
        raise SoupError(f"A window of {len(values)} weights cannot hold {count} snapshots.")
    last = values[len(values) - count :]
    total = sum(last)
    if total <= 0:
        raise SoupError(
            f"The window's {count} newest weights {last} are all zero (the list {values} puts weight only on "
            "snapshots older than the run has taken)."
        )
    return [v / total for v in last]
