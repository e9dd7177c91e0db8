"""Metric constraints such as ``"val/safety_acc>=0.9"``: parsed once at construction, checked per candidate."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lightning_soup.errors import SoupError

ACCEPTED_FORMS = (
    "`metric>=x`, `metric<=x`, `metric>x` or `metric<x` (x a finite number), several joined with ',' or ' and ' "
    "or given as a list of strings, e.g. \"val/safety_acc>=0.9, val/loss<0.5\""
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
# The metric name is everything before the first comparison sign; two-character signs are tried first.
_BOUND = re.compile(r"^\s*(?P<metric>[^<>=!\s](?:[^<>=!]*[^<>=!\s])?)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[^<>=\s]+)\s*$")
_SEPARATOR = re.compile(r"\s*,\s*|\s+and\s+")


@dataclass(frozen=True)
class Bound:
    """One ``metric op threshold`` condition."""

    metric: str
    op: str
    threshold: float

    def satisfied(self, value: float) -> bool:
        """Whether ``value`` meets the bound; NaN never does."""
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    def violation(self, value: float) -> float:
        """How far ``value`` is from meeting the bound, relative to ``|threshold|`` (absolute when it is 0).

        Zero when satisfied (and at the threshold of a strict bound), ``inf`` for NaN.
        """
        if math.isnan(value):
            return math.inf
        gap = self.threshold - value if self.op in (">=", ">") else value - self.threshold
        return max(gap, 0.0) / (abs(self.threshold) or 1.0)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_constraint(spec: str | Sequence[str] | None) -> tuple[Bound, ...]:
    """Parse ``"a>=0.9, b<0.5"``, ``"a>=0.9 and b<0.5"`` or ``["a>=0.9", "b<0.5"]`` into bounds.

    Args:
        spec: the constraint as written by the user; None or an empty list means no constraint.

    Returns:
        The bounds, in the order given.

    Raises:
        SoupError: a part cannot be parsed, listing every such part and the accepted forms.

    Example:
        >>> [str(b) for b in parse_constraint("val/a_acc>=0.9 and val/loss<0.5")]
        ['val/a_acc>=0.9', 'val/loss<0.5']
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        items: list[object] = [spec]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise SoupError(f"`constraint` must be a string or a list of strings, got {spec!r}. Accepted forms: {ACCEPTED_FORMS}.")
    bounds: list[Bound] = []
    bad: list[str] = []
    for item in items:
        if not isinstance(item, str):
            bad.append(repr(item))
            continue
        parts = [p for p in _SEPARATOR.split(item.strip()) if p]
        if not parts:
            bad.append(repr(item))
        for part in parts:
            bound = _parse_bound(part)
            if bound is None:
                bad.append(repr(part))
            else:
                bounds.append(bound)
    if bad:
        raise SoupError(f"`constraint` could not be parsed: {', '.join(bad)}. Accepted forms: {ACCEPTED_FORMS}.")
    return tuple(bounds)


def _parse_bound(text: str) -> Bound | None:
    match = _BOUND.match(text)
    if match is None:
        return None
    try:
        threshold = float(match["value"])
    except ValueError:
        return None
    if not math.isfinite(threshold):
        return None
    return Bound(match["metric"], match["op"], threshold)


def satisfies(bounds: Sequence[Bound], values: Mapping[str, float]) -> bool:
    """Whether every bound holds for ``values`` (metric name → value)."""
    return all(b.satisfied(values[b.metric]) for b in bounds)


def total_violation(bounds: Sequence[Bound], values: Mapping[str, float]) -> float:
    """The sum of the bounds' normalised violations: how far ``values`` are from satisfying all of them."""
    return math.fsum(b.violation(values[b.metric]) for b in bounds)


def choose(
    scores: Sequence[float] | None,
    values: Sequence[Mapping[str, float]],
    mode: str,
    bounds: Sequence[Bound],
    prefer: Sequence[float] | None = None,
) -> tuple[int, bool | None]:
    """The chosen candidate: the best score among those meeting every bound, else the closest to meeting them.

    Ties go to the candidate with the largest ``prefer`` value (the first listed without ``prefer``, or among
    equal ones); a NaN score ranks last. Without bounds the best score wins (``met`` is None); when
    no candidate meets them, the one with the smallest :func:`total_violation` wins (``met`` is False), ties broken
    by score, then order.

    Args:
        scores: each candidate's monitored value, or None to rank by order (the first candidate is best).
        values: each candidate's value of every bound's metric.
        mode: ``"max"`` or ``"min"``, for `scores`.
        bounds: the parsed constraint.
        prefer: a tie-breaker per candidate, larger first (a blend passes its ratios: the trained weights win).

    Returns:
        ``(index, met)``.

    Example:
        >>> choose([0.9, 0.8, 0.7], [{"s": 0.1}, {"s": 0.95}, {"s": 0.99}], "max", parse_constraint("s>=0.9"))
        (1, True)
    """

    def rank(i: int) -> float:  # larger is better; NaN last
        if scores is None:
            return -float(i)
        score = scores[i]
        return -math.inf if math.isnan(score) else (score if mode == "max" else -score)

    def tie(i: int) -> tuple[float, int]:  # larger wins
        return (prefer[i] if prefer is not None else 0.0, -i)

    candidates = range(len(values))
    if not bounds:
        return max(candidates, key=lambda i: (rank(i), *tie(i))), None
    feasible = [i for i in candidates if satisfies(bounds, values[i])]
    if feasible:
        return max(feasible, key=lambda i: (rank(i), *tie(i))), True
    return max(candidates, key=lambda i: (-total_violation(bounds, values[i]), rank(i), *tie(i))), False
