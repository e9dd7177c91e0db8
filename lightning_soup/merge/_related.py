"""Do models share a base? The statistic behind ``allow_unrelated``.

Merging models that were not fine-tuned from one checkpoint "works" and produces garbage, so the merge functions
measure, for each input against its reference (the base, the anchor, or the first of several inputs), two figures
over the model *as a whole*:

* the cosine similarity of the weights, ``⟨θ, ref⟩ / (‖θ‖·‖ref‖)``, and
* the relative distance ``‖θ − ref‖ / ‖ref‖`` (for a fine-tune: its task vector's norm relative to the base's).

Each tensor's mean is removed first (over that tensor), so that what every initialisation shares carries no
weight: LayerNorm weights are all ones and biases all zeros in *any* two models, and without centering they make
two independent random initialisations of a small GPT-2 look 0.9-similar. After centering, two independent
initialisations are nearly orthogonal (cosine ≈ 0 ± 1/√N, distance ≈ √2), while a fine-tune stays close to its base.

Sums are accumulated tensor by tensor on the tensors' device, in float32 chunks whose sums add up in float64 (at most
one pass over the data — a tensor of more than 2 Mi entries is measured on 8 evenly spaced runs of 256 Ki — no float64
copy of it, no host synchronisation until :meth:`Relatedness.check`), so a streaming caller (the CLI) feeds one key
at a time and decides at the end. A model
is judged as a whole: a fine-tune that trained a freshly initialised head from scratch has one unrelated tensor
among many related ones and is never refused.

Threshold (:data:`MIN_COSINE`), from ``python benchmarks/bench_related.py --steps 300``: a tiny GPT-2 built from a
transformers config (2 layers, width 64, untied head), an MLP with LayerNorm and a CNN with BatchNorm; each
"pretrained" for 300 steps on task A from two seeds, then fine-tuned from seed 0's weights for 300 steps on task B
with Adam 1e-4, Adam 1e-3 and SGD 0.05, each with the pretrained head kept and with a freshly initialised head
(CPU, float32). Centered cosine / distance against the base (one run's checkpoints: against the run's last)::

                                           GPT-2            MLP              CNN
    fine-tunes, head kept (min cos)        0.80 / 0.72      0.80 / 0.63      0.92 / 0.42
    fine-tunes, fresh head (min cos)       0.35 / 1.18      0.78 / 0.71      0.77 / 0.69
    one from-scratch run, ckpt 1 of 6      0.77 / 0.67      0.90 / 0.43      0.94 / 0.33
    independent random initialisations    +0.007 / 1.41    +0.007 / 1.41    −0.025 / 1.43
    independently pretrained models       +0.008 / 1.41    +0.013 / 1.41    −0.042 / 1.46
    (uncentered cosine, inits)             0.89             0.59             0.61

Unrelated models sit at 0 within the noise (its standard deviation: 0.003 GPT-2, 0.008 MLP, 0.02 CNN); the most
moved fine-tune (Adam 1e-3 with a fresh untied LM head, a distance above 1: it moved further than the base's own
norm) keeps 0.35; uncentered, independent GPT-2 initialisations (0.89) would look *more* alike than that fine-tune
(0.76). Refusing below 0.15 leaves that fine-tune a 2.3x margin and lies over 6 standard deviations above
every unrelated pair measured. Models too small for the cosine of independent weights to be told from the limit
(its standard deviation, computed from the tensor sizes, above ``MIN_COSINE / 4``) are not judged: random toy state
dicts of a few hundred entries are neither refused nor vouched for. Real fine-tunes of large models move far less (distances
of a few percent), so their figures are close to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_soup.errors import SoupError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["MIN_COSINE", "Relatedness", "Relation", "check_related"]

#: Below this (centered, whole-model) cosine similarity to its reference an input is refused as unrelated.
MIN_COSINE = 0.15
#: A model is judged only when independent weights would land this many standard deviations below MIN_COSINE.
_SIGMAS = 4.0
#: Elements per chunk: two 1 MiB float32 temporaries whatever the tensor size.
_CHUNK = 1 << 18
#: A larger tensor is measured on this many evenly spaced runs of ``_CHUNK`` entries (2 Mi entries) instead of all of
#: it: the figures are sums over hundreds of thousands of entries per tensor either way (their noise, computed from
#: the entries used, stays far below the limit), and the check then costs a fraction of one pass over a large model.
_RUNS = 8
#: Keys per block of per-key sums.
_BLOCK = 256


@dataclass(frozen=True)
class Relation:
    """How one input relates to its reference, over every floating tensor seen.

    Attributes:
        name: the input.
        cosine: centered cosine similarity to the reference (NaN when it cannot be measured: a constant reference).
        distance: ``‖θ − ref‖ / ‖ref‖`` on the centered tensors (for a fine-tune: relative task-vector norm).
        noise: standard deviation of ``cosine`` for weights independent of the reference, given the tensor sizes.
        numel: entries compared (those of tensors that are not constant in the reference).
        worst: the largest tensor (by the reference's centered energy) among those below :data:`MIN_COSINE`, or
            the largest tensor when none is; ``(key, cosine)``; None when nothing was compared.
    """

    name: str
    cosine: float
    distance: float
    noise: float
    numel: int
    worst: tuple[str, float] | None

    @property
    def judged(self) -> bool:
        """Whether the model is large enough (and its reference non-constant) for the cosine to decide."""
        return math.isfinite(self.cosine) and self.noise * _SIGMAS <= MIN_COSINE

    @property
    def related(self) -> bool:
        """False only when the model is judged and its cosine to the reference is below :data:`MIN_COSINE`."""
        return not self.judged or self.cosine >= MIN_COSINE


class Relatedness:
    """Accumulate, one tensor at a time, how each input relates to a reference; refuse unrelated ones at the end.

    Args:
        names: the inputs compared, in the order their tensors are passed to :meth:`update`.
        reference: the reference's name (``"base"``, ``"anchor"``, a file).
        derived: True when the inputs should be fine-tunes *of* the reference (a base or an anchor); False when
            the inputs should merely share a base with it (the inputs of a soup).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> base = torch.randn(512, 64, generator=g)
        >>> rel = Relatedness(["ft", "other"], "base")
        >>> rel.update("w", base, [base + 0.1 * torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g)])
        >>> [(r.name, round(r.cosine, 2), round(r.distance, 2), r.related) for r in rel.relations()]
        [('ft', 1.0, 0.1, True), ('other', -0.01, 1.42, False)]
    """

    def __init__(self, names: Sequence[str], reference: str, *, derived: bool = True) -> None:
        self.names = list(names)
        self.reference = reference
        self.derived = derived
        self._keys: list[str] = []
        self._numels: list[int] = []
        # per key: (inputs, 5) float64 [Σy, Σy², Σd, Σd², Σyd] on the tensors' device, as rows of a few large
        # blocks: thousands of small long-lived tensors between the streamed ones would keep the heap from shrinking
        self._blocks: list[Tensor] = []  # (_BLOCK, inputs, 5)
        self._rows: list[tuple[int, int]] = []  # per key: (block, row)

    def update(self, key: str, reference: Tensor, others: Sequence[Tensor]) -> None:
        """Add one tensor: the reference's and each input's (same shape); non-floating tensors are ignored."""
        self._update(key, reference, others, deltas=False)

    def update_deltas(self, key: str, reference: Tensor, deltas: Sequence[Tensor]) -> None:
        """Add one tensor given each input as a difference from the reference (a task vector ``θ − ref``)."""
        self._update(key, reference, deltas, deltas=True)

    def _update(self, key: str, reference: Tensor, others: Sequence[Tensor], *, deltas: bool) -> None:
        import torch

        if len(others) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors for {key!r}, got {len(others)}")
        if not reference.is_floating_point() or reference.device.type == "meta" or reference.numel() < 2:
            return
        numel, device = reference.numel(), reference.device
        dtype = torch.float64 if torch.float64 in (reference.dtype, *(t.dtype for t in others)) else torch.float32
        y_flat = reference.reshape(-1)
        flats = [t.reshape(-1) for t in others]
        # Sums of y shifted by its first entry: the covariances are unchanged, and tensors with a large common value
        # (LayerNorm weights near 1) lose nothing to cancellation. Each chunk is reduced in float32 (or float64 when an
        # input is), and the per-chunk sums accumulate in float64: no float64 copy of the data is ever made.
        shift = y_flat[:1].to(dtype)
        sums = self._row(device)
        self._keys.append(key)
        ranges = _measured_ranges(numel)
        self._numels.append(sum(stop - start for start, stop in ranges))
        for start, stop in ranges:
            y = y_flat[start:stop].to(dtype) - shift  # (c,), a fresh tensor
            sums[:, 0] += y.sum()
            sums[:, 1] += torch.dot(y, y)
            for i, f in enumerate(flats):  # one input at a time: two chunk-sized temporaries whatever their number
                d = f[start:stop].to(device=device, dtype=dtype)  # (c,), may be the input itself: never modified
                if not deltas:
                    d = d - y_flat[start:stop].to(dtype)
                sums[i, 2] += d.sum()
                sums[i, 3] += torch.dot(d, d)
                sums[i, 4] += torch.dot(d, y)

    def _row(self, device: torch.device) -> Tensor:
        """A zeroed ``(inputs, 5)`` float64 row for the next key, in the current block when it is on `device`."""
        import torch

        block = len(self._blocks) - 1
        used = self._rows[-1][1] + 1 if self._rows else 0
        if block < 0 or used == _BLOCK or self._blocks[block].device != device:
            self._blocks.append(torch.zeros(_BLOCK, len(self.names), 5, dtype=torch.float64, device=device))
            block, used = len(self._blocks) - 1, 0
        self._rows.append((block, used))
        return self._blocks[block][used]

    def relations(self) -> list[Relation]:
        """The figures so far, one per input (one host transfer)."""

        m = len(self.names)
        if not self._keys:
            return [Relation(n, math.nan, math.nan, math.inf, 0, None) for n in self.names]
        blocks = [b.cpu().tolist() for b in self._blocks]
        sums = [blocks[b][r] for b, r in self._rows]  # (keys, inputs, 5)
        out = []
        for i, name in enumerate(self.names):
            c_yy, c_xy, c_xx, c_dd, var = 0.0, 0.0, 0.0, 0.0, 0.0
            per_key = []
            numel = 0
            for key, n, rows in zip(self._keys, self._numels, sums):
                sy, syy, sd, sdd, syd = rows[i]
                yy = syy - sy * sy / n
                if yy <= 1e-6 * syy:
                    # a constant reference (zero biases, LayerNorm's ones, a LoRA B of zeros) carries no identity:
                    # any two models share it, and a trained model moving away from it says nothing either
                    continue
                dd = max(sdd - sd * sd / n, 0.0)
                yd = syd - sy * sd / n
                xx = max(yy + 2 * yd + dd, 0.0)
                xy = yy + yd
                c_yy, c_xy, c_xx, c_dd = c_yy + yy, c_xy + xy, c_xx + xx, c_dd + dd
                var += xx * yy / n  # Var⟨x, y⟩ for x independent of y, entries exchangeable
                numel += n
                per_key.append((key, yy, xy / math.sqrt(xx * yy) if xx > 0 else math.nan))
            denom = math.sqrt(c_xx * c_yy)
            cosine = c_xy / denom if denom > 0 else math.nan
            noise = math.sqrt(var) / denom if denom > 0 else math.inf
            distance = math.sqrt(c_dd / c_yy) if c_yy > 0 else math.nan
            ranked = sorted(per_key, key=lambda item: -item[1])
            low = [item for item in ranked if not item[2] >= MIN_COSINE]
            pick = (low or ranked)[0] if ranked else None
            worst = None if pick is None else (pick[0], pick[2])
            out.append(Relation(name, cosine, distance, noise, numel, worst))
        assert len(out) == m
        return out

    def check(self, hint: str = "pass `allow_unrelated=True` if they do share a base") -> list[Relation]:
        """Raise a :class:`SoupError` naming every unrelated input; return the relations otherwise.

        Args:
            hint: how to override, appended to the message (the CLI says ``--allow-unrelated``).
        """
        relations = self.relations()
        bad = [r for r in relations if not r.related]
        if bad:
            raise SoupError(self.message(bad, hint))
        return relations

    def message(self, bad: Sequence[Relation], hint: str) -> str:
        """One paragraph naming each unrelated input, the largest unrelated tensor and the measured figures."""
        ref = self.reference
        lines = []
        for r in bad:
            what = f"does not look fine-tuned from `{ref}`" if self.derived else f"does not share a base with `{ref}`"
            line = (
                f"`{r.name}` {what}: over {r.numel:,} weights its cosine similarity to it is {r.cosine:.4f} and "
                f"its relative distance ‖θ − ref‖ / ‖ref‖ is {r.distance:.2f}"
            )
            if r.worst is not None:
                line += f" (largest such tensor: {r.worst[0]!r}, cosine {r.worst[1]:.4f})"
            lines.append(line)
        return (
            "\n".join(lines)
            + f".\nFine-tunes of one base measure a cosine of 0.35 to 1 (a distance mostly below 1); independent "
            f"initialisations measure about 0 (a distance of about 1.41); the limit is {MIN_COSINE} (tensor means "
            f"removed). Merging models that do not share a base produces garbage: check that these are the "
            f"checkpoints you meant, or {hint}."
        )


def _measured_ranges(numel: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` runs of a flattened tensor that enter the figures: all of it in chunks, or ``_RUNS``
    evenly spaced chunks of a tensor larger than that.

    Example:
        >>> _measured_ranges(10)
        [(0, 10)]
        >>> runs = _measured_ranges(80 * _CHUNK)  # 8 runs of one chunk, 10 chunks apart
        >>> len(runs), runs[1] == (10 * _CHUNK, 11 * _CHUNK)
        (8, True)
    """
    if numel <= _RUNS * _CHUNK:
        return [(start, min(start + _CHUNK, numel)) for start in range(0, numel, _CHUNK)]
    step = numel // _RUNS  # >= _CHUNK: the runs never overlap
    return [(i * step, i * step + _CHUNK) for i in range(_RUNS)]


def check_related(
    reference: Mapping[str, Tensor],
    others: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    reference_name: str,
    *,
    derived: bool = True,
    deltas: bool = False,
) -> None:
    """Refuse inputs unrelated to `reference` (see :class:`Relatedness`), over the floating keys of `reference`.

    Args:
        reference: the base / anchor / first input, already compatible with `others` (same keys and shapes).
        others: the inputs to judge (task vectors when `deltas`).
        names: how to call each of `others` in the message.
        reference_name: how to call `reference`.
        derived: the inputs should be fine-tunes of `reference` (else: share a base with it).
        deltas: `others` hold ``θ − reference`` rather than θ.

    Raises:
        SoupError: naming each unrelated input, its figures and the largest unrelated tensor.
    """
    rel = Relatedness(names, reference_name, derived=derived)
    update = rel.update_deltas if deltas else rel.update
    for key, ref in reference.items():
        if ref.is_floating_point():
            update(key, ref, [o[key] for o in others])
    rel.check()
