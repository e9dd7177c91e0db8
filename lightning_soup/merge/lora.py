"""LoRA-aware merging (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022).

A PEFT LoRA pair — ``….lora_A.<adapter>.weight`` (r×in) and ``….lora_B.<adapter>.weight`` (out×r), or the
embedding variants ``….lora_embedding_A.<adapter>`` / ``….lora_embedding_B.<adapter>`` — is one update
``ΔW = scaling · B @ A``. Factors of separate runs are not comparable (``BA = (BG)(G⁻¹A)`` for any invertible
``G``), so every merge here is defined on ΔW, never on A and B separately: averaging factors of two runs is not
the average of their updates (one run's window already gives ~10% error in practice).

Every operation is a linear combination ``M = Σ cᵢ Bᵢ Aᵢ`` per pair (a mean: ``cᵢ = wᵢ / Σw``; an interpolation:
``(1 − r, r)``; task arithmetic: ``(1 − Σλ, λ₁, …)``). A scaling shared by all inputs factors out of M, so it never
needs to be known. The result must stay a rank-r pair, so it is

- exact when M fits rank r: inputs with a zero update (PEFT initialises ``B = 0``) drop out, one remaining input
  gives ``(c·B, A)`` (a blend toward a freshly initialised adapter scales B), inputs that share A (or B) give
  ``(Σ cᵢBᵢ, A)`` (or ``(B, Σ cᵢAᵢ)``);
- otherwise the best rank-r approximation of M (Eckart–Young), computed from the factors without forming M:
  ``[c₁B₁ … cₙBₙ] = Q_B R_B``, ``[A₁; …; Aₙ]ᵀ = Q_A R_A``, SVD of the small core ``R_B R_Aᵀ = U S Vᵀ``
  (nr×nr), ``B' = Q_B U_r √S_r``, ``A' = √S_r V_rᵀ Q_Aᵀ``. The relative error ``‖B'A' − M‖_F / ‖M‖_F`` (the
  discarded singular values) is returned per pair and for the whole model, for the recipe.

Work runs one pair at a time in float32 (float64 when an input is float64) on the factors' device; results come
back in the dtype and on the device of the first input's factors. The exact result of any of these merges is
always available as dense weights: :func:`delta_weight` gives one layer's ΔW to add to its base weight.

The plain functions route here by themselves: :func:`~lightning_soup.merge.uniform_soup`,
:func:`~lightning_soup.merge.weighted_average`, :func:`~lightning_soup.merge.interpolate` and
:func:`~lightning_soup.merge.task_arithmetic` given state dicts with LoRA pairs return what the ``lora_*``
function returns, and warn (naming the worst module) when the rank-r pairs are more than
:data:`ROUTED_WARN_ERROR` from the exact ΔW result; the ``lora_*`` functions return the whole
:class:`LoraReport`. :func:`~lightning_soup.merge.task_vector` refuses LoRA pairs (a difference of factors is not
a difference of updates), and so do the methods that are not linear combinations of the updates (TIES, DARE,
SLERP, TSV, Iso-C, Iso-CTS, Model Stock): merge the adapters into their base weights first.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_soup.errors import SoupError
from lightning_soup.merge._checks import check_scales, check_state_dicts, check_weights
from lightning_soup.merge._core import acc_dtype, materialize, prepare
from lightning_soup.merge._inplace import layer_weights
from lightning_soup.merge.average import weighted_average
from lightning_soup.merge.task_arithmetic import interpolate, task_arithmetic, task_vector

__all__ = [
    "LoraPair",
    "LoraReport",
    "combine_factors",
    "combine_into_",
    "delta_weight",
    "lora_interpolate",
    "lora_keys",
    "lora_pairs",
    "lora_task_arithmetic",
    "lora_uniform_soup",
    "lora_weighted_average",
]

_A_NAMES = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}

#: The plain merges warn when their LoRA pairs are further than this (relative Frobenius error on ΔW of the worst
#: pair) from the exact ΔW result; below it the rank-r pairs are as good as the exact result for any practical use.
ROUTED_WARN_ERROR = 1e-2


@dataclass(frozen=True)
class LoraPair:
    """One LoRA update: the keys of its factors and where it lives.

    Attributes:
        a_key: key of ``A`` (r×in; r×num_embeddings for embeddings).
        b_key: key of ``B`` (out×r; embedding_dim×r for embeddings).
        module: the adapted module's key prefix, e.g. ``base_model.model.h.0.attn.c_attn``.
        adapter: the PEFT adapter name (``default``), or None in saved adapter files, which drop it.
        embedding: whether this is an embedding pair (``ΔW = scaling·(B @ A)ᵀ`` in the embedding's layout).
    """

    a_key: str
    b_key: str
    module: str
    adapter: str | None
    embedding: bool


def lora_pairs(keys: Iterable[str]) -> list[LoraPair]:
    """The LoRA pairs among state-dict keys (an ``A`` whose ``B`` is present), in the order of the ``A`` keys.

    Recognised: ``….lora_A[.<adapter>].weight`` / ``….lora_B[.<adapter>].weight`` (Linear, Conv) and
    ``….lora_embedding_A[.<adapter>]`` / ``….lora_embedding_B[.<adapter>]`` (Embedding), as in a ``PeftModel``'s
    ``state_dict()`` and in saved ``adapter_model.safetensors`` files. Biases (``lora_B.<adapter>.bias``) and
    DoRA magnitudes are not factors: they are ordinary tensors.

    Example:
        >>> keys = ["m.q.base_layer.weight", "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"]
        >>> lora_pairs(keys)
        [LoraPair(a_key='m.q.lora_A.default.weight', b_key='m.q.lora_B.default.weight', module='m.q', \
adapter='default', embedding=False)]
    """
    keys = list(keys)
    present = set(keys)
    pairs = []
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part not in _A_NAMES:
                continue
            embedding = part == "lora_embedding_A"
            rest = parts[i + 1 :]
            # Linear/Conv: lora_A[.<adapter>].weight; Embedding: lora_embedding_A[.<adapter>] (a bare Parameter)
            names = rest if embedding else rest[:-1]
            ok = len(names) <= 1 and (rest != ["weight"] if embedding else rest[-1:] == ["weight"])
            adapter = names[0] if names else None
            b_key = ".".join([*parts[:i], _A_NAMES[part], *rest])
            if ok and b_key in present:
                pairs.append(LoraPair(key, b_key, ".".join(parts[:i]), adapter, embedding))
            break
    return pairs


def lora_keys(keys: Iterable[str]) -> set[str]:
    """Every key that is a LoRA factor (``A`` or ``B`` of a pair found by :func:`lora_pairs`).

    Example:
        >>> sorted(lora_keys(["x.lora_A.weight", "x.lora_B.weight", "x.lora_B.bias", "x.base_layer.weight"]))
        ['x.lora_A.weight', 'x.lora_B.weight']
    """
    return {k for p in lora_pairs(keys) for k in (p.a_key, p.b_key)}


class _Combined(NamedTuple):
    b: Tensor
    a: Tensor
    #: ‖B'A' − M‖_F² and ‖M‖_F², for the relative error (per pair and summed over a model)
    err2: float
    norm2: float


def combine_factors(
    factors: Sequence[tuple[Tensor, Tensor]], coefficients: Sequence[float]
) -> tuple[Tensor, Tensor, float]:
    """The rank-r pair closest to ``M = Σ cᵢ Bᵢ Aᵢ`` (exact when M has rank ≤ r), and its relative error.

    Only the factors and an (n·r)×(n·r) core are formed, never M itself. Factors of Conv layers (B: out×r×1×1,
    A: r×in×k×k) are treated as matrices and returned in their own shapes.

    Args:
        factors: one ``(B, A)`` per input, all with the same shapes; B is out×r, A is r×in.
        coefficients: one finite real per input.

    Returns:
        ``(B', A', relative_error)`` with ``relative_error = ‖B'A' − M‖_F / ‖M‖_F`` (0.0 when M is zero or fits
        rank r), B' and A' in the dtype and on the device of the first input's factors.

    Raises:
        SoupError: when the factor shapes differ, or the counts of factors and coefficients differ.

    Example:
        >>> import torch
        >>> b, a = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0, 0.0]])
        >>> b2, a2, err = combine_factors([(b, a), (torch.zeros(2, 1), torch.tensor([[0.0, 5.0]]))], [0.5, 0.5])
        >>> (b2 @ a2).tolist(), err
        ([[1.0, 0.0], [0.0, 0.0]], 0.0)
    """
    if len(factors) != len(coefficients) or not factors:
        raise SoupError(
            f"`combine_factors` needs one coefficient per (B, A) pair and at least one pair, got {len(factors)} "
            f"pairs and {len(coefficients)} coefficients."
        )
    b0, a0 = factors[0]
    bad = [i for i, (b, a) in enumerate(factors) if b.shape != b0.shape or a.shape != a0.shape]
    if bad:
        raise SoupError(
            f"LoRA factors {bad} do not have the shapes of the first input's (B {tuple(b0.shape)}, A "
            f"{tuple(a0.shape)}): were the adapters trained with different ranks or target modules?"
        )
    c = _combine([(b, a) for b, a in factors], [float(x) for x in coefficients])
    return c.b, c.a, _relative(c.err2, c.norm2)


def _relative(err2: float, norm2: float) -> float:
    return math.sqrt(err2 / norm2) if norm2 > 0 and err2 > 0 else 0.0


def _is_zero(t: Tensor) -> bool:
    return not bool(t.any())


def _combine(factors: list[tuple[Tensor, Tensor]], coefficients: list[float]) -> _Combined:
    b0, a0 = factors[0]
    out_dtype, device = b0.dtype, b0.device
    acc = acc_dtype(*[t.dtype for f in factors for t in f])
    rank = a0.shape[0]
    # a zero update (PEFT's fresh B = 0, or a zero coefficient) contributes nothing: dropping it keeps results exact
    active = [(c, b, a) for c, (b, a) in zip(coefficients, factors) if c != 0.0 and not (_is_zero(b) or _is_zero(a))]

    def out(b: Tensor, a: Tensor, err2: float = 0.0, norm2: float = 0.0) -> _Combined:
        return _Combined(b.to(device=device, dtype=out_dtype), a.to(device=device, dtype=a0.dtype), err2, norm2)

    def mat(t: Tensor) -> Tensor:  # B → out×r, A → r×in (Conv kernels flattened), in the accumulation dtype
        t = t.to(device=device, dtype=acc)
        return t.reshape(t.shape[0], -1)

    if not active:
        # ΔW = 0: B = 0 with the A of the first input that counts (so ratio 0 toward a fresh adapter returns it)
        a_ref = next((a for c, (b, a) in zip(coefficients, factors) if c != 0.0), a0)
        return out(torch.zeros_like(b0), a_ref.clone())
    if all(torch.equal(a, active[0][2]) for _, _, a in active[1:]):
        # one input, or inputs sharing A (LoRA-FA): M = (Σ cᵢBᵢ) A has rank ≤ r
        b_sum = sum((mat(b) * c for c, b, _ in active[1:]), mat(active[0][1]) * active[0][0])
        return out(b_sum.reshape(b0.shape), active[0][2].clone())
    if all(torch.equal(b, active[0][1]) for _, b, _ in active[1:]):
        a_sum = sum((mat(a) * c for c, _, a in active[1:]), mat(active[0][2]) * active[0][0])
        return out(active[0][1].clone(), a_sum.reshape(a0.shape))

    bs = torch.cat([mat(b) * c for c, b, _ in active], dim=1)  # out × nr
    as_ = torch.cat([mat(a) for _, _, a in active], dim=0)  # nr × in
    q_b, r_b = torch.linalg.qr(bs)  # out×k, k×nr
    q_a, r_a = torch.linalg.qr(as_.T)  # in×k', k'×nr
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core: k×k'
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b_new = torch.zeros(bs.shape[0], rank, dtype=acc, device=device)
    a_new = torch.zeros(rank, as_.shape[1], dtype=acc, device=device)
    b_new[:, :keep] = (q_b @ u[:, :keep]) * root  # out × r
    a_new[:keep] = root[:, None] * (vh[:keep] @ q_a.T)  # r × in
    s2 = s.double().square()
    norm2 = float(s2.sum())
    err2 = float(s2[keep:].sum())
    # singular values at rounding level are not an approximation error
    if err2 <= (torch.finfo(acc).eps * 16) ** 2 * norm2:
        err2 = 0.0
    return out(b_new.reshape(b0.shape), a_new.reshape(a0.shape), err2, norm2)


@dataclass
class LoraReport:
    """How well rank-r pairs represent the exact ΔW results of a merge.

    Attributes:
        relative_error: ``‖ΔW' − ΔW‖_F / ‖ΔW‖_F`` over every pair together (0.0: exact).
        max_relative_error: the worst single pair's relative error.
        per_module: each pair's relative error, keyed by its module prefix (and adapter).
    """

    relative_error: float = 0.0
    max_relative_error: float = 0.0
    per_module: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.max_relative_error == 0.0

    def to_recipe(self) -> dict[str, Any]:
        """Plain types for a recipe (json / safetensors metadata)."""
        worst = max(self.per_module, key=self.per_module.__getitem__, default=None)
        return {
            "lora_pairs": len(self.per_module),
            "lora_exact": self.exact,
            "lora_relative_error": self.relative_error,
            "lora_max_relative_error": self.max_relative_error,
            "lora_worst_module": worst,
        }


def _pair_name(p: LoraPair) -> str:
    return p.module if p.adapter is None else f"{p.module}[{p.adapter}]"


def _merge_pairs(
    inputs: Sequence[Mapping[str, Tensor]], pairs: Sequence[LoraPair], coefficients: Sequence[Sequence[float]]
) -> tuple[dict[str, Tensor], LoraReport]:
    """Per pair j, the rank-r pair closest to ``Σᵢ coefficients[j][i]·Bᵢ Aᵢ``."""
    out: dict[str, Tensor] = {}
    report = LoraReport()
    err2 = norm2 = 0.0
    for p, cs in zip(pairs, coefficients):
        c = _combine([(sd[p.b_key], sd[p.a_key]) for sd in inputs], list(cs))
        out[p.b_key], out[p.a_key] = c.b, c.a
        rel = _relative(c.err2, c.norm2)
        report.per_module[_pair_name(p)] = rel
        report.max_relative_error = max(report.max_relative_error, rel)
        err2 += c.err2
        norm2 += c.norm2
    report.relative_error = _relative(err2, norm2)
    return out, report


def combine_into_(
    out: Mapping[str, Tensor],
    inputs: Sequence[Mapping[str, Tensor]],
    coefficients: Sequence[float] | Mapping[str, Sequence[float]],
) -> LoraReport:
    """For every LoRA pair among `out`'s keys, write the rank-r pair closest to ``Σᵢ cᵢ BᵢAᵢ`` (the factors of
    ``inputs[i]``) into `out`'s tensors, in place (for the callbacks, whose `out` is the module's live tensors).

    Args:
        out: tensors to overwrite, e.g. the module's; keys that are not LoRA factors are left alone.
        inputs: the state dicts whose factors are combined (they need only the factor keys).
        coefficients: one number per input, or ``{A key: numbers}`` per pair (e.g. per-layer blend ratios).

    Returns:
        How far the written pairs are from the exact ΔW results.

    Example:
        >>> import torch
        >>> live = {"q.lora_A.weight": torch.zeros(1, 2), "q.lora_B.weight": torch.zeros(1, 1)}
        >>> fresh = {"q.lora_A.weight": torch.ones(1, 2), "q.lora_B.weight": torch.zeros(1, 1)}
        >>> tuned = {"q.lora_A.weight": torch.tensor([[1.0, 2.0]]), "q.lora_B.weight": torch.tensor([[4.0]])}
        >>> combine_into_(live, [fresh, tuned], [0.5, 0.5]).exact, live["q.lora_B.weight"]
        (True, tensor([[2.]]))
    """
    pairs = lora_pairs(out.keys())
    if isinstance(coefficients, Mapping):
        coeffs = [[float(c) for c in coefficients[p.a_key]] for p in pairs]
    else:
        coeffs = [[float(c) for c in coefficients]] * len(pairs)
    merged, report = _merge_pairs(inputs, pairs, coeffs)
    with torch.no_grad():
        for k, v in merged.items():
            out[k].copy_(v)
    return report


def _split(sds: Sequence[Mapping[str, Tensor]]) -> tuple[list[LoraPair], list[dict[str, Tensor]]]:
    """The pairs of the first state dict, and every state dict without its factor keys."""
    pairs = lora_pairs(sds[0].keys())
    factor = {k for p in pairs for k in (p.a_key, p.b_key)}
    return pairs, [{k: v for k, v in sd.items() if k not in factor} for sd in sds]


def _assemble(ref: Mapping[str, Tensor], *parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    merged: dict[str, Tensor] = {}
    for part in parts:
        merged.update(part)
    return {k: merged[k] for k in ref}


def lora_weighted_average(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float], *, allow_unrelated: bool = False
) -> tuple[dict[str, Tensor], LoraReport]:
    """:func:`~lightning_soup.merge.weighted_average` with every LoRA pair averaged as ``ΔW = Σ wᵢ BᵢAᵢ / Σ w``.

    Other keys are averaged as usual. Use it for a soup of separate LoRA runs and for a window of one run's
    checkpoints alike.

    Args:
        state_dicts: state dicts with the same keys and shapes (a PeftModel's, or saved adapters).
        weights: one finite, non-negative number per state dict, not all zero.
        allow_unrelated: passed to :func:`~lightning_soup.merge.weighted_average` for the keys that are not factors.

    Returns:
        ``(state_dict, report)``: the merged state dict (keys in the order of ``state_dicts[0]``) and how far its
        pairs are from the exact ΔW mean.

    Raises:
        SoupError: as :func:`~lightning_soup.merge.weighted_average`.

    Example:
        >>> import torch
        >>> a = {"q.lora_A.weight": torch.tensor([[1.0, 0.0]]), "q.lora_B.weight": torch.tensor([[2.0]])}
        >>> b = {"q.lora_A.weight": torch.tensor([[0.0, 1.0]]), "q.lora_B.weight": torch.tensor([[2.0]])}
        >>> sd, report = lora_weighted_average([a, b], [1, 1])
        >>> (sd["q.lora_B.weight"] @ sd["q.lora_A.weight"]).tolist(), report.exact
        ([[1.0, 1.0]], True)
    """
    sds = prepare(check_state_dicts(state_dicts, "state_dicts"), [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    w = check_weights(weights, len(sds))
    total = sum(w)
    pairs, rest = _split(sds)
    merged, report = _merge_pairs(sds, pairs, [[x / total for x in w]] * len(pairs))
    plain = weighted_average(rest, w, allow_unrelated=allow_unrelated) if rest[0] else {}
    return _assemble(sds[0], plain, merged), report


def lora_uniform_soup(
    state_dicts: Sequence[Mapping[str, Tensor]], *, allow_unrelated: bool = False
) -> tuple[dict[str, Tensor], LoraReport]:
    """:func:`~lightning_soup.merge.uniform_soup` with every LoRA pair averaged on ΔW (see
    :func:`lora_weighted_average`).

    Example:
        >>> import torch
        >>> a = {"q.lora_A.weight": torch.tensor([[1.0, 0.0]]), "q.lora_B.weight": torch.tensor([[2.0]])}
        >>> sd, report = lora_uniform_soup([a, a])
        >>> sd["q.lora_B.weight"].tolist(), report.relative_error
        ([[2.0]], 0.0)
    """
    sds = check_state_dicts(state_dicts, "state_dicts")
    return lora_weighted_average(sds, [1.0] * len(sds), allow_unrelated=allow_unrelated)


def lora_interpolate(
    anchor: Mapping[str, Tensor],
    model: Mapping[str, Tensor],
    ratio: float,
    layer_ratios: Mapping[str, float] | None = None,
    *,
    allow_unrelated: bool = False,
) -> tuple[dict[str, Tensor], LoraReport]:
    """:func:`~lightning_soup.merge.interpolate` with every LoRA pair blended on ΔW:
    ``ΔW = ΔW_anchor + r·(ΔW_model − ΔW_anchor)``.

    Toward a freshly initialised adapter (``B = 0``) the result is exact: ``(r·B, A)``. A pair's ratio is the one
    its ``A`` key gets from `layer_ratios`.

    Args:
        anchor: the state dict at ``r = 0``.
        model: the state dict at ``r = 1``; same keys and shapes.
        ratio: `r` for keys that match no `layer_ratios` pattern.
        layer_ratios: ``{fnmatch pattern: r}``, first match wins.
        allow_unrelated: passed to :func:`~lightning_soup.merge.interpolate` for the keys that are not factors.

    Returns:
        ``(state_dict, report)``, keys in the order of `model`.

    Raises:
        SoupError: as :func:`~lightning_soup.merge.interpolate`.

    Example:
        >>> import torch
        >>> fresh = {"q.lora_A.weight": torch.tensor([[1.0, 1.0]]), "q.lora_B.weight": torch.tensor([[0.0]])}
        >>> tuned = {"q.lora_A.weight": torch.tensor([[3.0, 1.0]]), "q.lora_B.weight": torch.tensor([[2.0]])}
        >>> sd, report = lora_interpolate(fresh, tuned, 0.25)
        >>> sd["q.lora_B.weight"].tolist(), sd["q.lora_A.weight"].tolist(), report.exact
        ([[0.5]], [[3.0, 1.0]], True)
    """
    layer_weights([], ratio, layer_ratios)  # validate before reading anything
    an, md = prepare([anchor, model], ["anchor", "model"])
    pairs, (md_rest, an_rest) = _split([md, an])
    ratios = layer_weights([p.a_key for p in pairs], ratio, layer_ratios)
    merged, report = _merge_pairs([an, md], pairs, [[1.0 - r, r] for r in ratios])
    plain: dict[str, Tensor] = {}
    if md_rest:
        with warnings.catch_warnings():
            # a pattern may match only factor keys; `interpolate` cannot see those, so warn here instead
            warnings.simplefilter("ignore", UserWarning)
            plain = interpolate(an_rest, md_rest, ratio, layer_ratios, allow_unrelated=allow_unrelated)
    unused = [p for p in (layer_ratios or {}) if not any(fnmatch.fnmatchcase(k, p) for k in md)]
    if unused:
        warnings.warn(f"`layer_ratios` patterns {unused} match no key, so they have no effect.", UserWarning,
                      stacklevel=2)
    return _assemble(md, plain, merged), report


def lora_task_arithmetic(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    scales: float | Sequence[float],
    *,
    allow_unrelated: bool = False,
) -> tuple[dict[str, Tensor], LoraReport]:
    """Task arithmetic ``base + Σ λᵢ(θᵢ − base)`` with every LoRA pair computed on ΔW.

    Unlike :func:`~lightning_soup.merge.task_arithmetic` this takes the fine-tuned state dicts themselves (a task
    vector of LoRA factors means nothing); `base` is the adapter state the fine-tunes started from (often a fresh
    adapter with ``B = 0``, whose ΔW is zero).

    Args:
        base: the base state dict (same keys and shapes as every fine-tune).
        finetuned: one or more fine-tuned state dicts.
        scales: one number for every fine-tune, or one per fine-tune; any finite real.
        allow_unrelated: passed to :func:`~lightning_soup.merge.task_arithmetic` for the keys that are not factors.

    Returns:
        ``(state_dict, report)``, keys in the order of `base`.

    Raises:
        SoupError: for incompatible state dicts, an empty `finetuned`, or bad `scales`.

    Example:
        >>> import torch
        >>> base = {"q.lora_A.weight": torch.tensor([[1.0, 1.0]]), "q.lora_B.weight": torch.tensor([[0.0]])}
        >>> ft = {"q.lora_A.weight": torch.tensor([[1.0, 0.0]]), "q.lora_B.weight": torch.tensor([[4.0]])}
        >>> sd, _ = lora_task_arithmetic(base, [ft], -0.5)
        >>> (sd["q.lora_B.weight"] @ sd["q.lora_A.weight"]).tolist()
        [[-2.0, 0.0]]
    """
    fts = check_state_dicts(finetuned, "finetuned")
    lams = check_scales(scales, len(fts))
    sds = prepare([base, *fts], ["base", *[f"finetuned[{i}]" for i in range(len(fts))]])
    pairs, rest = _split(sds)
    coeffs = [1.0 - sum(lams), *lams]
    merged, report = _merge_pairs(sds, pairs, [coeffs] * len(pairs))
    plain: dict[str, Tensor] = {}
    if rest[0]:
        vectors = [task_vector(ft, rest[0], allow_unrelated=allow_unrelated) for ft in rest[1:]]
        plain = task_arithmetic(rest[0], vectors, lams, allow_unrelated=allow_unrelated)
    return _assemble(sds[0], plain, merged), report


def delta_weight(
    state_dict: Mapping[str, Tensor], pair: LoraPair, scaling: float, fan_in_fan_out: bool = False
) -> Tensor:
    """One pair's dense update ``scaling · B @ A`` in the layout of the weight it adds to (exact merges).

    Linear: out×in (in×out with ``fan_in_fan_out``, as GPT-2's Conv1D); Embedding: num_embeddings×dim; Conv: the
    kernel's shape. Computed in float32 (float64 for float64 factors); add it to the base weight in that dtype.

    Args:
        state_dict: holds the pair's factors.
        pair: from :func:`lora_pairs`.
        scaling: PEFT's ``lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA) for that module.
        fan_in_fan_out: the adapter config's ``fan_in_fan_out``.

    Example:
        >>> import torch
        >>> sd = {"q.lora_A.weight": torch.tensor([[1.0, 2.0]]), "q.lora_B.weight": torch.tensor([[1.0], [0.0]])}
        >>> delta_weight(sd, lora_pairs(sd)[0], scaling=2.0)
        tensor([[2., 4.],
                [0., 0.]])
    """
    sd = materialize(state_dict)
    a, b = sd[pair.a_key], sd[pair.b_key]
    acc = acc_dtype(a.dtype, b.dtype)
    a2 = a.to(acc).reshape(a.shape[0], -1)
    b2 = b.to(device=a.device, dtype=acc).reshape(b.shape[0], -1)
    delta = (b2 @ a2) * scaling
    if pair.embedding or fan_in_fan_out:
        return delta.T
    if a.ndim > 2:  # Conv: B is out×r×1×1 (for k×k kernels), A is r×in×k×k
        return delta.reshape(b.shape[0], *a.shape[1:])
    return delta


def _routed(
    function: str, merged: tuple[dict[str, Tensor], LoraReport], stacklevel: int = 3
) -> dict[str, Tensor]:
    """The state dict of a ``lora_*`` merge run for the plain `function`, with a warning when it is not close to
    exact (the plain functions return state dicts only; the ``lora_*`` ones return the report too)."""
    sd, report = merged
    if report.max_relative_error > ROUTED_WARN_ERROR:
        worst = max(report.per_module, key=report.per_module.__getitem__)
        warnings.warn(
            f"`{function}` merged the LoRA pairs on ΔW = scaling·B·A; the result needs more than rank r, so the "
            f"pairs are its best rank-r approximation: relative error {report.relative_error:.3g} over all pairs, "
            f"{report.max_relative_error:.3g} at the worst, `{worst}`. For the exact result merge the adapters "
            f"into their base weights (`merge.delta_weight`, CLI `--merge-into BASE`); `{_LORA_NAME[function]}` "
            "returns the whole report.",
            UserWarning,
            stacklevel=stacklevel,
        )
    return sd


_LORA_NAME = {
    "uniform_soup": "lora_uniform_soup",
    "weighted_average": "lora_weighted_average",
    "interpolate": "lora_interpolate",
    "task_arithmetic": "lora_task_arithmetic",
}


def _has_pairs(state_dict: Any) -> bool:
    return isinstance(state_dict, Mapping) and bool(lora_pairs(state_dict.keys()))


def _refuse_pairs(state_dict: Any, argument: str, method: str) -> None:
    """Raise for a merge that is not a linear combination of the updates when `state_dict` holds LoRA pairs."""
    if not isinstance(state_dict, Mapping):
        return  # the method's own checks name a bad argument
    pairs = lora_pairs(state_dict.keys())
    if pairs:
        raise SoupError(
            f"`{method}` is not defined on LoRA factors: `{argument}` holds {len(pairs)} PEFT LoRA pair(s) (e.g. "
            f"`{pairs[0].a_key}`), and applying it to A and B separately is not applying it to the updates "
            "ΔW = scaling·B·A. Merge the adapters into their base weights first (CLI `--merge-into BASE`, or "
            f"W₀ + `merge.delta_weight(...)` per pair) and run `{method}` on the dense weights; averages, blends "
            "and task arithmetic of adapters are defined on ΔW (`lora_uniform_soup`, `lora_interpolate`, "
            "`lora_task_arithmetic`)."
        )


def _route_task_arithmetic(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    scales: Sequence[float],
    plain: Any,
) -> dict[str, Tensor]:
    """:func:`~lightning_soup.merge.task_arithmetic` of a state dict with LoRA pairs: each pair's entries of
    ``τᵢ`` are read as ``θᵢ − base`` (the only way factor differences carry an update), so the pair becomes the
    rank-r pair closest to ``ΔW_base + Σ λᵢ(ΔWᵢ − ΔW_base)``, with ``θᵢ = base + τᵢ`` per factor; every other key
    is ``plain(base_rest, vectors_rest)`` exactly as without pairs."""
    pairs, rest = _split([base, *task_vectors])
    tuned = []
    for tv in task_vectors:
        tuned.append({
            k: base[k].to(acc_dtype(base[k].dtype, tv[k].dtype)) + tv[k].to(base[k].device)
            for p in pairs for k in (p.a_key, p.b_key)
        })
    merged, report = _merge_pairs([base, *tuned], pairs, [[1.0 - sum(scales), *scales]] * len(pairs))
    result = plain(rest[0], rest[1:]) if rest[0] else {}
    return _routed("task_arithmetic", (_assemble(base, result, merged), report), stacklevel=4)
