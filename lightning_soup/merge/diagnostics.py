"""What ``lightning-soup inspect`` measures: compatibility of state dicts and how their task vectors relate.

Two pure parts, no file I/O:

* :func:`compare` reads only shapes and dtypes (meta tensors work) and lists what differs: missing and unexpected
  keys, shape mismatches, keys floating in one input and not in another, differing floating dtypes. The merge
  commands use the same comparison to refuse incompatible inputs with a one-line message.
* :class:`TaskVectorStats` streams task vectors τᵢ = θᵢ − base tensor by tensor and accumulates, in float64, their
  Gram matrix (norms and pairwise cosine similarity, as in Ilharco et al. 2023, *Editing Models with Task
  Arithmetic*) and sign-conflict counts (the interference TIES-merging resolves, Yadav et al. 2023). An entry
  *conflicts* when at least one task vector is positive there and another negative (zeros never conflict).

:func:`report_json` turns both into plain data; the CLI (:mod:`lightning_soup.cli.inspect`) renders them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

#: Elements per chunk of a flattened tensor: bounds the float64 working set to n × 8 MiB; float32 indicator
#: products stay exact (< 2²⁴ per chunk).
_CHUNK = 1 << 20
_LISTED = 3  # keys named in a one-line message


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _few(keys: Sequence[str], n: int = _LISTED) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", … and {len(keys) - n} more" if len(keys) > n else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class ModelSummary:
    """Counts for one state dict: tensors, elements (all / floating), bytes, and elements per dtype."""

    name: str
    num_tensors: int
    num_params: int
    num_floating: int
    nbytes: int
    dtypes: dict[str, int]


@dataclass(frozen=True)
class Mismatch:
    """One key whose shape or dtype differs between ``name`` and the reference ``ref``."""

    key: str
    name: str
    ref: str
    value: str
    expected: str


@dataclass(frozen=True)
class Compatibility:
    """What differs between state dicts, against the first one (the reference).

    Attributes:
        models: per-input counts, in input order.
        missing: per input name, the reference keys it lacks.
        unexpected: per input name, its keys the reference lacks.
        prefixes: per input name, the prefix its keys have in addition to the reference's (or the reference's in
            addition to its own, negated as ``"-prefix"``) when the key sets differ exactly by one.
        shapes: keys whose shape differs from the reference's.
        kinds: keys floating point in one input and not in the other (cannot be merged).
        dtypes: keys with a different floating dtype (mergeable: computed in float32 or better).
        common: reference keys present in every input with the same shape and kind, in reference order.
    """

    models: list[ModelSummary]
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: dict[str, list[str]] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)
    shapes: list[Mismatch] = field(default_factory=list)
    kinds: list[Mismatch] = field(default_factory=list)
    dtypes: list[Mismatch] = field(default_factory=list)
    common: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        """True when the inputs can be merged: same keys, shapes and kinds (floating dtypes may differ)."""
        return not (any(self.missing.values()) or any(self.unexpected.values()) or self.shapes or self.kinds)

    def problems(self) -> list[str]:
        """Every incompatibility as one line naming the input and key, the most fundamental first."""
        ref = self.models[0].name
        lines = []
        for summary in self.models[1:]:
            name = summary.name
            missing, unexpected = self.missing.get(name, []), self.unexpected.get(name, [])
            if not (missing or unexpected):
                continue
            prefix = self.prefixes.get(name)
            if prefix is not None:
                added, source, other = (prefix[1:], ref, name) if prefix.startswith("-") else (prefix, name, ref)
                lines.append(
                    f"{source}: it holds the keys of {other} under the prefix {added!r}; pass --prefix {added}"
                )
                continue
            parts = []
            if missing:
                parts.append(f"missing {_plural(len(missing), 'key')} of {ref}: {_few(missing)}")
            if unexpected:
                parts.append(f"{_plural(len(unexpected), 'key')} not in {ref}: {_few(unexpected)}")
            lines.append(f"{name}: " + "; ".join(parts))
        for m in self.shapes:
            lines.append(f"{m.name}: key {m.key!r} has shape {m.value}, expected {m.expected} as in {m.ref}")
        for m in self.kinds:
            lines.append(
                f"{m.name}: key {m.key!r} has dtype {m.value}, expected {m.expected} as in {m.ref} (a key must be "
                "floating point in every input or in none)"
            )
        return lines


def _summary(name: str, meta: Mapping[str, Any]) -> ModelSummary:
    dtypes: dict[str, int] = {}
    params = floating = nbytes = 0
    for t in meta.values():
        n = math.prod(_shape(t))
        params += n
        nbytes += n * t.dtype.itemsize
        if t.dtype.is_floating_point:
            floating += n
        dtypes[_dtype_name(t.dtype)] = dtypes.get(_dtype_name(t.dtype), 0) + n
    return ModelSummary(name, len(meta), params, floating, nbytes, dtypes)


def _prefix_between(missing: list[str], unexpected: list[str]) -> str | None:
    """The prefix under which one input holds all the other's keys (``"-p"`` when the reference holds them), or None.

    A Lightning checkpoint holds the network's keys under its attribute name (``model.``) and often more (a loss
    module, metrics), so the prefixed keys only need to include the other's.
    """
    for longer, shorter, sign in ((unexpected, missing, ""), (missing, unexpected, "-")):
        if not shorter or len(longer) < len(shorter):
            continue
        tail, pool = shorter[0], set(longer)
        for head in longer:
            if head.endswith("." + tail):
                prefix = head[: len(head) - len(tail)]
                if all(prefix + k in pool for k in shorter):
                    return sign + prefix
    return None


def compare(metas: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Compatibility:
    """Compare state dicts key by key against the first; reads only ``.shape`` and ``.dtype``.

    Args:
        metas: state dicts (meta tensors are enough), the reference first.
        names: how to call each one in messages (file names).

    Returns:
        A :class:`Compatibility`; its :meth:`~Compatibility.problems` are empty when the inputs can be merged.

    Example:
        >>> import torch
        >>> a = {"fc.weight": torch.zeros(4, 4), "fc.bias": torch.zeros(4)}
        >>> b = {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4, dtype=torch.bfloat16)}
        >>> c = compare([a, b], ["A.safetensors", "B.safetensors"])
        >>> c.compatible, c.problems()
        (False, ["B.safetensors: key 'fc.weight' has shape (4, 3), expected (4, 4) as in A.safetensors"])
        >>> [(m.key, m.value) for m in c.dtypes]
        [('fc.bias', 'bfloat16')]
    """
    metas, names = list(metas), list(names)
    ref, ref_name = metas[0], names[0]
    result = Compatibility(models=[_summary(n, m) for n, m in zip(names, metas)])
    ref_keys = list(ref)
    for name, meta in zip(names[1:], metas[1:]):
        missing = [k for k in ref_keys if k not in meta]
        unexpected = [k for k in meta if k not in ref]
        if missing:
            result.missing[name] = missing
        if unexpected:
            result.unexpected[name] = unexpected
        prefix = _prefix_between(missing, unexpected)
        if prefix is not None:
            result.prefixes[name] = prefix
    for key in ref_keys:
        r = ref[key]
        r_shape, r_float = _shape(r), r.dtype.is_floating_point
        ok = True
        for name, meta in zip(names[1:], metas[1:]):
            t = meta.get(key)
            if t is None:
                ok = False
            elif _shape(t) != r_shape:
                result.shapes.append(Mismatch(key, name, ref_name, str(_shape(t)), str(r_shape)))
                ok = False
            elif t.dtype.is_floating_point != r_float:
                expected = f"a floating dtype ({_dtype_name(r.dtype)})" if r_float else _dtype_name(r.dtype)
                result.kinds.append(Mismatch(key, name, ref_name, _dtype_name(t.dtype), expected))
                ok = False
            elif t.dtype != r.dtype:
                result.dtypes.append(Mismatch(key, name, ref_name, _dtype_name(t.dtype), _dtype_name(r.dtype)))
        if ok:
            result.common.append(key)
    return result


@dataclass(frozen=True)
class TaskVectorReport:
    """Statistics of task vectors τᵢ = θᵢ − base over the compared entries (all floating, in float64).

    Attributes:
        names: the models.
        num_params: entries compared (every floating entry of the common keys).
        num_tensors: tensors compared.
        base_norm: ‖base‖₂ over those entries.
        norms: ‖τᵢ‖₂.
        cosine: pairwise cosine similarity ⟨τᵢ, τⱼ⟩ / (‖τᵢ‖ ‖τⱼ‖); NaN where a task vector is zero.
        conflict_fraction: fraction of entries where some τᵢ > 0 and some τⱼ < 0.
        pairwise_conflicts: fraction of entries where τᵢ and τⱼ have opposite signs.
        top_conflicts: ``(key, numel, fraction)`` for the tensors with the highest conflict fraction.
    """

    names: list[str]
    num_params: int
    num_tensors: int
    base_norm: float
    norms: list[float]
    cosine: list[list[float]]
    conflict_fraction: float
    pairwise_conflicts: list[list[float]]
    top_conflicts: list[tuple[str, int, float]]

    @property
    def relative_norms(self) -> list[float]:
        """‖τᵢ‖ / ‖base‖ (NaN for an all-zero base)."""
        return [n / self.base_norm if self.base_norm > 0 else math.nan for n in self.norms]


class TaskVectorStats:
    """Accumulate task-vector statistics one tensor at a time, on whatever device the tensors live.

    Per tensor: a float64 Gram matrix of the task vectors, the base's squared norm, and sign-conflict counts, in
    chunks of ``2**20`` elements, so the extra memory is a few MiB per model whatever the tensor size. Nothing
    is copied to the host until :meth:`result`.

    Args:
        names: the models, in the order their tensors are passed to :meth:`update`.

    Example:
        >>> import torch
        >>> stats = TaskVectorStats(["a", "b"])
        >>> base = torch.zeros(4)
        >>> stats.update("w", base, [torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([1.0, -2.0, 3.0, -1.0])])
        >>> r = stats.result()
        >>> round(r.norms[0] ** 2, 6), round(r.norms[1] ** 2, 6), round(r.cosine[0][1], 4), r.conflict_fraction
        (6.0, 15.0, -0.2108, 0.25)
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._gram: Tensor | None = None  # (n, n) Σ ⟨τᵢ, τⱼ⟩
        self._pairs: Tensor | None = None  # (n, n) count of τᵢ > 0 with τⱼ < 0 (asymmetric; symmetrised at the end)
        self._base_sq: Tensor | None = None
        self._keys: list[str] = []
        self._numels: list[int] = []
        self._conflicts: list[Tensor] = []  # 0-dim int64 per tensor, kept on the device until result()

    def update(self, key: str, base: Tensor, models: Sequence[Tensor]) -> None:
        """Add one tensor: ``base`` and each model's tensor for ``key`` (same shape, floating, one device)."""
        import torch

        if len(models) != len(self.names):
            raise ValueError(f"expected {len(self.names)} model tensors for {key!r}, got {len(models)}")
        n, numel = len(models), base.numel()
        device = base.device
        if self._gram is None:
            self._gram = torch.zeros(n, n, dtype=torch.float64, device=device)
            self._pairs = torch.zeros(n, n, dtype=torch.float64, device=device)
            self._base_sq = torch.zeros((), dtype=torch.float64, device=device)
        assert self._pairs is not None and self._base_sq is not None
        flat_base = base.reshape(-1)
        flat = [m.reshape(-1) for m in models]
        conflicts = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, numel, _CHUNK):
            stop = min(start + _CHUNK, numel)
            b = flat_base[start:stop].to(torch.float64)  # (c,)
            tau = torch.stack([m[start:stop].to(torch.float64) for m in flat]).sub_(b)  # (n, c)
            self._gram.addmm_(tau, tau.T)
            self._base_sq.add_(torch.dot(b, b))
            pos, neg = tau > 0, tau < 0  # (n, c) bool
            conflicts.add_((pos.any(0) & neg.any(0)).sum())
            if n > 1:
                # exact in float32: at most 2**20 ones per dot product
                self._pairs.add_((pos.to(torch.float32) @ neg.to(torch.float32).T).to(torch.float64))
        self._keys.append(key)
        self._numels.append(numel)
        self._conflicts.append(conflicts)

    def result(self, top: int = 10) -> TaskVectorReport:
        """The statistics so far (one host transfer), with the ``top`` most-conflicting tensors."""
        import torch

        n = len(self.names)
        if self._gram is None:
            nan = [[math.nan] * n for _ in range(n)]
            return TaskVectorReport(self.names, 0, 0, 0.0, [0.0] * n, nan, math.nan, nan, [])
        gram = self._gram.cpu().tolist()
        pairs = (self._pairs + self._pairs.T).cpu().tolist()  # type: ignore[union-attr]
        base_norm = math.sqrt(float(self._base_sq.cpu()))  # type: ignore[union-attr]
        counts = torch.stack(self._conflicts).cpu().tolist()
        total = sum(self._numels)
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
        cosine = [
            [gram[i][j] / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else math.nan for j in range(n)]
            for i in range(n)
        ]
        pairwise = [[pairs[i][j] / total if total else math.nan for j in range(n)] for i in range(n)]
        fractions = [(k, numel, c / numel) for k, numel, c in zip(self._keys, self._numels, counts) if numel]
        fractions.sort(key=lambda item: (-item[2], -item[1]))
        return TaskVectorReport(
            names=self.names,
            num_params=total,
            num_tensors=len(self._keys),
            base_norm=base_norm,
            norms=norms,
            cosine=cosine,
            conflict_fraction=sum(counts) / total if total else math.nan,
            pairwise_conflicts=pairwise,
            top_conflicts=fractions[:top],
        )


def task_vector_stats(
    base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], names: Sequence[str], top: int = 10
) -> TaskVectorReport:
    """:class:`TaskVectorStats` over every floating key of ``base`` (a convenience for in-memory state dicts).

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3), "step": torch.tensor(1)}
        >>> r = task_vector_stats(base, [{"w": torch.tensor([3.0, 0.0, 4.0])}], ["ft"])
        >>> r.norms, r.num_params
        ([5.0], 3)
    """
    stats = TaskVectorStats(names)
    for key, b in base.items():
        if b.dtype.is_floating_point:
            stats.update(key, b, [m[key] for m in models])
    return stats.result(top)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def report_json(
    compat: Compatibility, task_vectors: TaskVectorReport | None = None, base_name: str | None = None
) -> dict[str, Any]:
    """The report as JSON-ready data (NaN becomes ``null``).

    Example:
        >>> import torch
        >>> c = compare([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], ["a", "b"])
        >>> doc = report_json(c)
        >>> doc["compatible"], doc["models"][0]["num_params"]
        (True, 2)
    """
    doc: dict[str, Any] = {
        "compatible": compat.compatible,
        "models": [
            {
                "name": m.name,
                "num_tensors": m.num_tensors,
                "num_params": m.num_params,
                "num_floating": m.num_floating,
                "nbytes": m.nbytes,
                "dtypes": m.dtypes,
            }
            for m in compat.models
        ],
        "problems": compat.problems(),
        "missing": compat.missing,
        "unexpected": compat.unexpected,
        "shape_mismatches": [m.__dict__ for m in compat.shapes],
        "kind_mismatches": [m.__dict__ for m in compat.kinds],
        "dtype_differences": [m.__dict__ for m in compat.dtypes],
        "num_common": len(compat.common),
    }
    if task_vectors is not None:
        r = task_vectors
        doc["task_vectors"] = {
            "base": base_name,
            "models": r.names,
            "num_params": r.num_params,
            "num_tensors": r.num_tensors,
            "base_norm": _finite(r.base_norm),
            "norms": [_finite(x) for x in r.norms],
            "relative_norms": [_finite(x) for x in r.relative_norms],
            "cosine": [[_finite(x) for x in row] for row in r.cosine],
            "conflict_fraction": _finite(r.conflict_fraction),
            "pairwise_conflicts": [[_finite(x) for x in row] for row in r.pairwise_conflicts],
            "top_conflicts": [{"key": k, "numel": n, "fraction": f} for k, n, f in r.top_conflicts],
        }
    return doc
