"""Shared by the merges that combine the task vectors of one tensor as a whole (TSV, Iso-C, Iso-CTS, Model Stock).

Each of those methods is a function ``delta(taus) -> Δ`` of one key's task vectors, stacked as ``taus`` (``T × shape``,
float32 or float64, on base's device); the result for that key is ``base + alpha·Δ``. :func:`merge_state_dicts`
checks the inputs and maps :func:`merge_tensor` over the keys, so merging one key at a time (the CLI streams that
way) gives exactly the whole-dict result. No host sync: every branch is on shapes and Python numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_soup.errors import SoupError
from lightning_soup.merge._checks import check_real, check_state_dict, check_state_dicts
from lightning_soup.merge._core import acc_dtype, copy_non_floating, move, prepare
from lightning_soup.merge._related import check_related

#: ``delta(taus)``: the merged update of one tensor from its stacked task vectors ``(T, *shape)``
Delta = Callable[[Tensor], Tensor]


#: ``per_key(base, finetuned)``: the merged tensor of one floating key, in base's dtype, on base's device
PerKey = Callable[[Tensor, Sequence[Tensor]], Tensor]


def merge_state_dicts(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    delta: Delta | None,
    alpha: float,
    min_finetuned: int = 1,
    per_key: PerKey | None = None,
    allow_unrelated: bool = False,
) -> dict[str, Tensor]:
    """``base + alpha·delta(τ₁ … τ_T)`` (or ``per_key(base, finetuned)``) for every floating key; non-floating
    tensors copied from `base`.

    Raises:
        SoupError: for a non-mapping or incompatible input, fewer than `min_finetuned` fine-tunes, or a
            non-finite `alpha`, or (unless `allow_unrelated`) a fine-tune that does not look fine-tuned from `base`.
    """
    bs = check_state_dict(base, "base")
    fts = check_state_dicts(finetuned, "finetuned")
    if len(fts) < min_finetuned:
        raise SoupError(
            f"`finetuned` holds {len(fts)} state dict{'' if len(fts) == 1 else 's'}; this method needs at least "
            f"{min_finetuned} fine-tunes of `base`."
        )
    alpha = check_real(alpha, "alpha")
    names = ["base"] + [f"finetuned[{i}]" for i in range(len(fts))]
    bs, *fts = prepare([bs, *fts], names)
    if not allow_unrelated:
        check_related(bs, fts, names[1:], "base")
    result = copy_non_floating(bs, [k for k, t in bs.items() if not t.is_floating_point()])
    for k, b in bs.items():
        if not b.is_floating_point():
            continue
        if per_key is not None:
            result[k] = per_key(b, [ft[k] for ft in fts])
        else:
            assert delta is not None
            result[k] = merge_tensor(b, [ft[k] for ft in fts], delta, alpha)
    return {k: result[k] for k in bs}


def merge_tensor(base: Tensor, finetuned: Sequence[Tensor], delta: Delta, alpha: float) -> Tensor:
    """One key: stack ``τᵢ = finetunedᵢ − base`` in float32 (float64 if any input is) on base's device, apply
    `delta`, return ``base + alpha·Δ`` rounded once into base's dtype. Peak: about ``3·T`` copies of the tensor
    in the accumulation dtype (the task vectors and the SVD factors), whatever the model size."""
    acc = acc_dtype(base.dtype, *(t.dtype for t in finetuned))
    b = move(base, acc, base.device)
    taus = torch.empty((len(finetuned), *base.shape), dtype=acc, device=base.device)
    for i, ft in enumerate(finetuned):
        torch.sub(move(ft, acc, base.device), b, out=taus[i])
    out = torch.add(b, delta(taus), alpha=alpha)
    return out if out.dtype == base.dtype else out.to(base.dtype)


def is_matrix(taus: Tensor) -> bool:
    """Whether the SVD formulas apply: a 2-D tensor with at least one entry (``taus`` is ``T × m × n``)."""
    return taus.ndim == 3 and taus.shape[1] > 0 and taus.shape[2] > 0


def significant(s: Tensor, m: int, n: int, scale: Tensor | None = None) -> Tensor:
    """Which singular values are not numerically zero: ``s > eps·max(m, n)·scale`` (NumPy's ``matrix_rank`` rule).

    `scale` defaults to the largest value of each row of `s`. The singular vectors of a numerically zero singular
    value are an arbitrary basis of a null space (LAPACK's choice, device dependent): every formula here keeps them
    out, so that a low-rank task vector (a LoRA update merged into dense weights) has one well-defined merge.
    """
    ref = s.amax(-1, keepdim=True) if scale is None else scale
    return s > torch.finfo(s.dtype).eps * max(m, n) * ref


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced ``torch.linalg.svd(x)``, retried in float64 when LAPACK's float32 divide-and-conquer fails to converge.

    gesdd can fail on ill-conditioned float32 input (seen on one CPU thread with real fine-tunes' task vectors); the
    float64 retry gives the same factors to float32 rounding, returned in `x`'s dtype.
    """
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor ``P @ Qh`` of ``x = P·Σ·Qh`` (reduced SVD), batched over leading dimensions.

    It is the semi-orthogonal matrix nearest to `x` in Frobenius norm (orthonormal columns when `x` is tall,
    orthonormal rows when it is wide): TSV's "orthogonalisation" of the concatenated singular vectors. When `x` is
    rank-deficient (zeroed null directions, or directions of several tasks that span fewer dimensions than their
    count) the pairs of numerically zero ``Σ`` are left out: the unique partial isometry on `x`'s range, where
    ``P @ Qh`` would add an arbitrary (device-dependent) map between the null spaces.
    """
    p, sigma, qh = svd(x)
    m, n = x.shape[-2:]
    return (p * significant(sigma, m, n).unsqueeze(-2)) @ qh


def polar_pair(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """``polar(u), polar(vh)``, as one batched SVD when ``u`` and ``vhᵀ`` have the same shape (square weights)."""
    if u.shape == vh.mT.shape:
        both = polar(torch.stack((u, vh.mT)))
        return both[0], both[1].mT
    return polar(u), polar(vh)


def concat_top(u: Tensor, s: Tensor, vh: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-`k` parts of T batched SVDs side by side, task by task: ``m × Tk``, ``Tk``, ``Tk × n``.

    Column ``i·k + j`` of the first is ``u[i][:, j]``, row ``i·k + j`` of the last is ``vh[i][j]``.
    """
    t, m, _ = u.shape
    n = vh.shape[-1]
    return (
        u[:, :, :k].permute(1, 0, 2).reshape(m, t * k),
        s[:, :k].reshape(t * k),
        vh[:, :k, :].reshape(t * k, n),
    )


def check_fraction(value: object, name: str) -> float:
    """Return `value` as a float in ``[0, 1]``; raise :class:`SoupError` naming `name` otherwise."""
    x = None
    try:
        x = check_real(value, name)
    except SoupError:
        pass
    if x is None or not 0.0 <= x <= 1.0 or math.isnan(x):
        raise SoupError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    return x
