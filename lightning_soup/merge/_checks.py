"""Checks run before any arithmetic: state-dict compatibility and argument validation.

Every check raises one :class:`~lightning_soup.SoupError` that lists *all* the problems of its kind (every missing
key of every input, every shape mismatch, every bad weight), names the argument in backticks, shows the bad value
and says what is allowed. Only ``.shape`` and ``.dtype`` of the tensors are read, so the checks work on meta
tensors (``LazyStateDict.meta()``) before any data is loaded.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_soup.errors import SoupError

__all__ = [
    "check_compatible",
    "check_density",
    "check_mode",
    "check_real",
    "check_scales",
    "check_seed",
    "check_state_dict",
    "check_state_dicts",
    "check_task_vectors",
    "check_weights",
]

#: Keys listed per problem before the message says "... and N more" (a prefix mismatch lists every key).
_MAX_LISTED = 20
#: Names of tensors whose first dimension is a vocabulary or a number of classes.
_VOCAB_LIKE = re.compile(r"embed|wte|wpe|lm_head|head|classifier|vocab", re.IGNORECASE)


def _keys_text(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _describe(value: Any) -> str:
    if isinstance(value, (str, bytes)):
        return f"{value!r} ({type(value).__name__})"
    if isinstance(value, Tensor):
        return f"a tensor of shape {_shape(value)}"
    return repr(value) if isinstance(value, (numbers.Number, type(None))) else f"{value!r} ({type(value).__name__})"


def _value(value: Any) -> str:
    return str(value) if isinstance(value, float) else repr(value)


def _check_count(values: list[Any], count: int, name: str, what: str, hint: str) -> None:
    """Raise unless there is one value per input (`what` names the inputs)."""
    if len(values) != count:
        raise SoupError(
            f"`{name}` has {len(values)} values but there {'is' if count == 1 else 'are'} "
            f"{_plural(count, what)}; {hint}."
        )


def _as_list(value: Any, name: str, expected: str) -> list[Any]:
    if isinstance(value, Tensor) and value.ndim == 1:
        return value.tolist()
    if isinstance(value, (str, bytes, Mapping, Tensor)) or not isinstance(value, (Sequence, list, tuple)):
        if not (hasattr(value, "__len__") and hasattr(value, "__iter__")) or isinstance(
            value, (str, bytes, Mapping, Tensor)
        ):
            raise SoupError(f"`{name}` must be {expected}, got {_describe(value)}.")
    return list(value)


def _prefix_hint(ref_name: str, name: str, missing: list[str], unexpected: list[str]) -> str | None:
    """Say so when two key sets differ only by a prefix (``model.`` from a LightningModule attribute, ...)."""
    if not missing or len(missing) != len(unexpected):
        return None
    candidates = ((unexpected, missing, name, ref_name), (missing, unexpected, ref_name, name))
    for longer, shorter, added_to, other in candidates:
        head, tail = longer[0], shorter[0]
        if head.endswith(tail) and len(head) > len(tail):
            prefix = head[: len(head) - len(tail)]
            if {prefix + k for k in shorter} == set(longer):
                return (
                    f"HINT: the keys of `{added_to}` are those of `{other}` with the prefix {prefix!r} added; load it "
                    f"without that prefix (e.g. `open_state_dict(path, prefix={prefix!r})`) or rename its keys."
                )
    return None


def _vocab_like(key: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """A first-dimension-only mismatch on an embedding / output-head / classifier tensor, or any 2-D weight."""
    if len(a) != len(b) or not a or a[0] == b[0] or a[1:] != b[1:]:
        return False
    return bool(_VOCAB_LIKE.search(key)) or len(a) == 2


def layout(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Shapes and dtypes without reading data: ``state_dict.meta()`` for lazy on-disk mappings, else itself."""
    meta = getattr(state_dict, "meta", None)
    if callable(meta) and not isinstance(state_dict, dict):
        return meta()
    return state_dict


def check_state_dict(state_dict: Any, name: str) -> Mapping[str, Any]:
    """Check that `state_dict` is a mapping (its values are checked by :func:`check_compatible`); return it.

    Raises:
        SoupError: naming `name` when it is not a mapping.
    """
    if not isinstance(state_dict, Mapping):
        raise SoupError(
            f"`{name}` must be a state dict (a mapping of parameter names to tensors), got {type(state_dict).__name__}."
        )
    return state_dict


def check_state_dicts(state_dicts: Any, name: str) -> list[Mapping[str, Any]]:
    """Check that `state_dicts` is a non-empty sequence of mappings; return it as a list.

    Raises:
        SoupError: naming `name` when it is a single mapping, not a sequence, empty, or holds a non-mapping.
    """
    if isinstance(state_dicts, Mapping):
        raise SoupError(
            f"`{name}` must be a sequence of state dicts, got a single mapping; wrap it in a list: `[{name}]`."
        )
    if isinstance(state_dicts, (str, bytes, Tensor)) or not hasattr(state_dicts, "__iter__"):
        raise SoupError(f"`{name}` must be a sequence of state dicts, got {type(state_dicts).__name__}.")
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise SoupError(f"`{name}` is empty: give at least one state dict to merge.")
    bad = [f"{name}[{i}] is {type(sd).__name__}" for i, sd in enumerate(state_dicts) if not isinstance(sd, Mapping)]
    if bad:
        raise SoupError(
            f"`{name}` must hold state dicts (mappings of parameter names to tensors): " + "; ".join(bad) + "."
        )
    return state_dicts


def check_compatible(state_dicts: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> None:
    """Check that state dicts have the same keys and, key by key, the same shapes; the first one is the reference.

    Values only need ``.shape`` and ``.dtype`` (meta tensors work), and a lazy mapping with a ``meta()`` method
    (``LazyStateDict``) is checked through it, without reading any data. A key must be floating point in every input
    or in none; floating dtypes may differ (they are computed in float32 or better).

    Args:
        state_dicts: the state dicts to compare (at least one).
        names: how to call each input in messages, e.g. ``["anchor", "model"]``; default ``state_dicts[i]``.

    Raises:
        SoupError: listing, per input, the missing and unexpected keys, then every shape mismatch (naming the key
            and both shapes, with a hint when a vocabulary-like first dimension differs) and every
            floating/non-floating mismatch; or naming the inputs that are empty or hold non-tensors.

    Example:
        >>> import torch
        >>> check_compatible([{"w": torch.zeros(2)}, {"w": torch.ones(2)}], names=["a", "b"])
        >>> check_compatible([{"w": torch.zeros(2)}, {"v": torch.ones(2)}], names=["a", "b"])
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: The state dicts do not have the same keys:
          `b` is missing 1 key of `a`: 'w'
          `b` has 1 unexpected key not in `a`: 'v'
    """
    state_dicts = [layout(sd) for sd in state_dicts]
    if not state_dicts:
        raise SoupError("No state dicts to merge: got an empty sequence; give at least one state dict.")
    names = [f"state_dicts[{i}]" for i in range(len(state_dicts))] if names is None else list(names)
    if len(names) != len(state_dicts):
        raise SoupError(f"`names` has {len(names)} entries for {len(state_dicts)} state dicts.")

    empty = [f"`{n}`" for n, sd in zip(names, state_dicts) if len(sd) == 0]
    if empty:
        raise SoupError(
            f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (no tensors). Check the file and the "
            "`prefix` it was loaded with."
        )
    not_tensors = [
        f"`{n}`[{k!r}] is {type(v).__name__}"
        for n, sd in zip(names, state_dicts)
        for k, v in sd.items()
        if not (hasattr(v, "shape") and hasattr(v, "dtype"))
    ]
    if not_tensors:
        raise SoupError(
            "State dicts must map parameter names to tensors, but "
            + "; ".join(not_tensors[:_MAX_LISTED])
            + (f"; ... and {len(not_tensors) - _MAX_LISTED} more" if len(not_tensors) > _MAX_LISTED else "")
            + ". Is this a whole checkpoint? Pass its `['state_dict']`."
        )

    ref_name, ref = names[0], state_dicts[0]
    ref_set = set(ref.keys())
    key_lines: list[str] = []
    for name, sd in zip(names[1:], state_dicts[1:]):
        missing = [k for k in ref.keys() if k not in sd]
        unexpected = [k for k in sd.keys() if k not in ref_set]
        if missing:
            key_lines.append(
                f"  `{name}` is missing {_plural(len(missing), 'key')} of `{ref_name}`: {_keys_text(missing)}"
            )
        if unexpected:
            key_lines.append(
                f"  `{name}` has {_plural(len(unexpected), 'unexpected key')} not in `{ref_name}`: "
                + _keys_text(unexpected)
            )
        hint = _prefix_hint(ref_name, name, missing, unexpected)
        if hint:
            key_lines.append("  " + hint)

    shape_lines: list[str] = []
    vocab = False
    for key, ref_t in ref.items():
        ref_shape, ref_float = _shape(ref_t), ref_t.dtype.is_floating_point
        for name, sd in zip(names[1:], state_dicts[1:]):
            if key not in sd:
                continue
            t = sd[key]
            shape = _shape(t)
            if shape != ref_shape:
                line = f"  {key!r}: `{ref_name}` has shape {ref_shape}, `{name}` has shape {shape}"
                if _vocab_like(key, ref_shape, shape):
                    line += " (first dimension differs: vocabulary or number of classes)"
                    vocab = True
                shape_lines.append(line)
            elif t.dtype.is_floating_point != ref_float:
                shape_lines.append(
                    f"  {key!r}: `{ref_name}` has dtype {ref_t.dtype}, `{name}` has dtype {t.dtype} (a key must be "
                    "floating point in every input or in none)"
                )

    if not key_lines and not shape_lines:
        return
    parts = []
    if key_lines:
        parts.append("The state dicts do not have the same keys:\n" + "\n".join(key_lines))
    if shape_lines:
        text = "Tensor shapes or kinds differ:\n" + "\n".join(shape_lines)
        if vocab:
            text += (
                "\n  HINT: the first dimension of an embedding or output head differs, so the vocabularies "
                "(tokenizers) or label sets of these models probably differ. Merge only models fine-tuned from the "
                "same base with the same tokenizer, or resize the embeddings to the same vocabulary first."
            )
        parts.append(text)
    raise SoupError("\n".join(parts))


def check_task_vectors(base: Mapping[str, Any], task_vectors: Sequence[Mapping[str, Any]]) -> None:
    """Check task vectors against `base`: exactly base's floating keys, same shapes, floating values.

    Task vectors hold floating entries only, so base's non-floating keys (integer buffers) may be absent; when a
    task vector has them anyway they are ignored.

    Raises:
        SoupError: listing per task vector the missing floating keys, keys that `base` lacks, non-floating entries
            and shape mismatches.
    """
    float_keys = [k for k, t in base.items() if t.dtype.is_floating_point]
    lines: list[str] = []
    for i, tv in enumerate(task_vectors):
        name = f"task_vectors[{i}]"
        missing = [k for k in float_keys if k not in tv]
        unexpected = [k for k in tv.keys() if k not in base]
        if missing:
            lines.append(
                f"  `{name}` is missing {_plural(len(missing), 'floating key')} of `base`: {_keys_text(missing)}"
            )
        if unexpected:
            lines.append(f"  `{name}` has {_plural(len(unexpected), 'key')} not in `base`: {_keys_text(unexpected)}")
        hint = _prefix_hint("base", name, missing, unexpected)
        if hint:
            lines.append("  " + hint)
        for k in float_keys:
            if k not in tv:
                continue
            t, ref = tv[k], base[k]
            if not hasattr(t, "shape") or not hasattr(t, "dtype"):
                lines.append(f"  `{name}`[{k!r}] is {type(t).__name__}, not a tensor")
            elif _shape(t) != _shape(ref):
                line = f"  {k!r}: `base` has shape {_shape(ref)}, `{name}` has shape {_shape(t)}"
                if _vocab_like(k, _shape(ref), _shape(t)):
                    line += " (first dimension differs: the vocabularies/tokenizers probably differ)"
                lines.append(line)
            elif not t.dtype.is_floating_point:
                lines.append(f"  `{name}`[{k!r}] has dtype {t.dtype}; task vector entries must be floating point")
    if lines:
        raise SoupError(
            "The task vectors do not match `base` (a task vector holds exactly the floating-point keys of its base, "
            "as returned by `task_vector(finetuned, base)`):\n" + "\n".join(lines)
        )


def check_real(value: Any, name: str) -> float:
    """Return `value` as a float if it is a finite real number (``0.5``, ``2``, a NumPy scalar, a 1-element tensor).

    Raises:
        SoupError: naming `name` and showing `value` otherwise (``nan``, ``inf``, a string, a bool, a list).

    Example:
        >>> check_real(0.25, "ratio")
        0.25
        >>> check_real(float("nan"), "ratio")
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: `ratio` must be a finite real number, got nan.
    """
    x: float | None = None
    if isinstance(value, bool):
        x = None
    elif isinstance(value, numbers.Real):
        x = float(value)
    elif isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        x = float(value)
    if x is None or not math.isfinite(x):
        raise SoupError(f"`{name}` must be a finite real number, got {_describe(value)}.")
    return x


def check_density(value: Any, name: str = "density") -> float:
    """Return `value` as a float if it lies in ``(0, 1]``; raise :class:`SoupError` naming `name` otherwise.

    Example:
        >>> check_density(0.2)
        0.2
        >>> check_density(0)
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: `density` must be in (0, 1] (the fraction of each task vector kept), got 0.
    """
    x = None
    try:
        x = check_real(value, name)
    except SoupError:
        pass
    if x is None or not 0.0 < x <= 1.0:
        raise SoupError(f"`{name}` must be in (0, 1] (the fraction of each task vector kept), got {_describe(value)}.")
    return x


def check_weights(weights: Any, count: int, name: str = "weights") -> list[float]:
    """Return one finite, non-negative weight per state dict, not all zero, as floats.

    Raises:
        SoupError: naming `name` for a wrong type or length, listing every bad entry, or when they sum to zero.

    Example:
        >>> check_weights([1, 2], 2)
        [1.0, 2.0]
        >>> check_weights([1, -2, float("inf")], 3)  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: `weights` must be finite, non-negative numbers;
        got weights[1]=-2, weights[2]=inf.
    """
    values = _as_list(weights, name, f"a sequence of {count} numbers (one per state dict)")
    _check_count(values, count, name, "state dict", "give one weight per state dict")
    out: list[float] = []
    bad: list[str] = []
    for i, w in enumerate(values):
        try:
            x = check_real(w, name)
        except SoupError:
            x = None
        if x is None or x < 0:
            bad.append(f"{name}[{i}]={_value(w)}")
            continue
        out.append(x)
    if bad:
        raise SoupError(f"`{name}` must be finite, non-negative numbers; got {', '.join(bad)}.")
    if not sum(out) > 0:
        raise SoupError(f"`{name}` sum to zero ({values!r}); at least one weight must be positive.")
    return out


def check_scales(scales: Any, count: int, name: str = "scales") -> list[float]:
    """Return one finite scale per task vector; a single number applies to every vector (negative is fine).

    Raises:
        SoupError: naming `name` for a wrong type or length, or listing every non-finite entry.

    Example:
        >>> check_scales(0.5, 2)
        [0.5, 0.5]
        >>> check_scales([1.0, -0.5], 2)
        [1.0, -0.5]
    """
    if isinstance(scales, (numbers.Real, Tensor)) and not isinstance(scales, bool) and (
        not isinstance(scales, Tensor) or scales.numel() == 1
    ):
        return [check_real(scales, name)] * count
    values = _as_list(scales, name, f"one number or a sequence of {count} numbers (one per task vector)")
    _check_count(values, count, name, "task vector", "give one number, or one per task vector")
    out: list[float] = []
    bad: list[str] = []
    for i, s in enumerate(values):
        try:
            out.append(check_real(s, name))
        except SoupError:
            bad.append(f"{name}[{i}]={_value(s)}")
    if bad:
        raise SoupError(f"`{name}` must be finite real numbers; got {', '.join(bad)}.")
    return out


def check_mode(mode: Any, name: str = "mode") -> str:
    """Return `mode` if it is ``"max"`` or ``"min"``; raise :class:`SoupError` otherwise.

    Example:
        >>> check_mode("maximum")
        Traceback (most recent call last):
        ...
        lightning_soup.errors.SoupError: `mode` must be 'max' or 'min', got 'maximum'.
    """
    if mode not in ("max", "min") or not isinstance(mode, str):
        raise SoupError(f"`{name}` must be 'max' or 'min', got {mode!r}.")
    return mode


def check_seed(seed: Any, name: str = "seed") -> int:
    """Return `seed` if it is an integer (not a bool); raise :class:`SoupError` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SoupError(f"`{name}` must be an integer, got {_describe(seed)}.")
    return int(seed)
