"""PEFT LoRA adapter folders as CLI inputs: merged on ΔW = scaling·B·A, as adapters or into dense weights.

An adapter folder holds ``adapter_model.safetensors`` and ``adapter_config.json`` (what ``PeftModel.save_pretrained``
writes). Two ways to merge adapters:

* **As adapters** (the default): ``average``, ``blend`` and ``task-arithmetic`` run the LoRA-aware functions of
  :mod:`lightning_soup.merge.lora` on the whole adapters (they are small) and write an adapter folder
  (``adapter_model.safetensors``, the first adapter's ``adapter_config.json``, a ``README.md``) that
  ``PeftModel.from_pretrained(model, out)`` loads. A result that does not fit rank r is the best rank-r
  approximation of the exact ΔW result; its relative error is in the recipe and printed.
* **Into dense weights** (``--merge-into BASE``): every adapter becomes ``W₀ + scaling·B·A`` key by key (scaling
  from its own config: ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``, ``rank_pattern`` and
  ``alpha_pattern`` per module), and any command merges those exact dense models as it merges checkpoints; with a
  Hugging Face model folder as BASE the output is a model folder.

Separate adapters share no base weights to compare, so the unrelated-model check applies only to dense merges.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.errors import SoupError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
#: the prefix PeftModel puts before the wrapped model's keys
PEFT_PREFIX = "base_model.model."


def is_adapter_folder(path: str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG).is_file() and (p / WEIGHTS).is_file()


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder).expanduser() / CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SoupError(f"{path}: not a readable adapter config ({e})") from None
    if not isinstance(doc, dict) or doc.get("peft_type", "LORA") != "LORA":
        raise SoupError(f"{path}: only LoRA adapters can be merged (peft_type {doc.get('peft_type')!r})")
    unsupported = [k for k in ("use_dora",) if doc.get(k)] + (["bias"] if doc.get("bias", "none") != "none" else [])
    if unsupported:
        raise SoupError(f"{path}: {', '.join(unsupported)} adapters are not supported; merge them with PEFT first")
    return doc


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in it (or as a regex)."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


def scaling(config: Mapping[str, Any], module: str) -> float:
    """PEFT's scaling of a module's update: ``lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``).

    Example:
        >>> config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"c_fc": 16}}
        >>> rslora = {**config, "use_rslora": True}
        >>> scaling(config, "h.0.attn.c_attn"), scaling(config, "h.0.mlp.c_fc"), scaling(rslora, "h.0.attn.c_attn")
        (2.0, 4.0, 4.0)
    """
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def scaling_signature(config: Mapping[str, Any]) -> tuple:
    keys = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
    return tuple(json.dumps(config.get(k), sort_keys=True) for k in keys)


class MergedAdapter(Mapping[str, Tensor]):
    """A dense model read lazily as ``base + scaling·B·A`` per adapted weight (the adapter's other tensors,
    ``modules_to_save``, replace the base's); the ``LazyStateDict`` surface :class:`~lightning_soup.cli.io.Input`
    needs."""

    def __init__(self, base: storage.LazyStateDict, folder: str, adapter: Mapping[str, Tensor]) -> None:
        from lightning_soup.merge.lora import lora_keys, lora_pairs

        self._base = base
        self.folder = folder
        self._adapter = adapter
        self._config = read_config(folder)
        self._deltas = {}
        for pair in lora_pairs(adapter.keys()):
            module = pair.module.removeprefix(PEFT_PREFIX)
            key = module + (".weight" if f"{module}.weight" in base else "")
            if key not in base:
                raise SoupError(
                    f"{folder}: the adapter updates {module!r}, which {_name(base)} does not have; is it the model "
                    "this adapter was trained on?"
                )
            self._deltas[key] = pair
        factor_keys = lora_keys(adapter.keys())
        self._replaced = {}
        for k in adapter.keys():
            if k not in factor_keys:
                key = k.removeprefix(PEFT_PREFIX)
                if key not in base:
                    raise SoupError(f"{folder}: its tensor {k!r} has no counterpart in {_name(base)}")
                self._replaced[key] = k

    @property
    def files(self) -> list[Path]:
        return [*self._base.files, Path(self.folder).expanduser() / WEIGHTS]

    def meta(self) -> dict[str, Tensor]:
        return self._base.meta()

    def __getitem__(self, key: str) -> Tensor:
        from lightning_soup.merge.lora import delta_weight

        if key in self._replaced:
            return self._adapter[self._replaced[key]]
        weight = self._base[key]
        pair = self._deltas.get(key)
        if pair is None:
            return weight
        s = scaling(self._config, pair.module.removeprefix(PEFT_PREFIX))
        delta = delta_weight(self._adapter, pair, s, bool(self._config.get("fan_in_fan_out")))
        if tuple(delta.shape) != tuple(weight.shape):
            raise SoupError(
                f"{self.folder}: the update of {key!r} has shape {tuple(delta.shape)}, the weight {tuple(weight.shape)}"
                " (check fan_in_fan_out in adapter_config.json)"
            )
        return (weight.to(delta.dtype) + delta.to(weight.device)).to(weight.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def _name(lazy: Any) -> str:
    files = getattr(lazy, "files", None)
    return str(files[0].parent) if files else "the base"


def opener(stack: contextlib.ExitStack, merge_into: str) -> Any:
    """``storage.open_state_dict`` for the CLI's inputs with ``--merge-into``: adapters become dense models."""

    @contextlib.contextmanager
    def open_input(path: str) -> Iterator[Any]:
        if not is_adapter_folder(path):
            with storage.open_state_dict(path) as lazy:
                yield lazy
            return
        base = stack.enter_context(storage.open_state_dict(merge_into))
        yield MergedAdapter(base, path, storage.load_state_dict(Path(path).expanduser() / WEIGHTS))

    return open_input


def merge_as_adapters(
    command: str, args: Any, paths: Sequence[tuple[str, str]]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Run ``command`` on whole adapters with :mod:`lightning_soup.merge.lora`; ``(state_dict, recipe part)``."""
    from lightning_soup.merge import lora

    adapters = [p for _, p in paths if is_adapter_folder(p)]
    if len(adapters) != len(paths):
        plain = [p for _, p in paths if not is_adapter_folder(p)]
        raise SoupError(
            f"{plain[0]}: not an adapter folder, mixed with adapter folders; pass --merge-into BASE to merge "
            "everything as dense weights"
        )
    configs = [read_config(p) for p in adapters]
    if len({scaling_signature(c) for c in configs}) > 1:
        raise SoupError(
            "the adapters have different r / lora_alpha / use_rslora / patterns, so their factors have different "
            "scalings; pass --merge-into BASE to merge them as dense weights"
        )
    sds = [storage.load_state_dict(Path(p).expanduser() / WEIGHTS) for p in adapters]
    if command == "average":
        weights = args.weights or [1.0] * len(sds)
        sd, report = lora.lora_weighted_average(sds, weights, allow_unrelated=True)
        function, parameters = "lora_weighted_average", {"weights": weights}
    elif command == "blend":
        sd, report = lora.lora_interpolate(
            sds[0], sds[1], args.ratio, dict(args.layer_ratio) or None, allow_unrelated=True
        )
        function, parameters = "lora_interpolate", {"ratio": args.ratio}
    elif command == "task-arithmetic":
        scales = args.scales[0] if len(args.scales) == 1 else list(args.scales)
        sd, report = lora.lora_task_arithmetic(sds[0], sds[1:], scales, allow_unrelated=True)
        function, parameters = "lora_task_arithmetic", {"scales": scales}
    else:
        raise SoupError(
            f"{command} is not defined on LoRA factors (only average, blend and task-arithmetic merge adapters as "
            "adapters); pass --merge-into BASE to merge the adapters into dense weights first"
        )
    return sd, {"function": f"lightning_soup.merge.{function}", "parameters": parameters, "lora": report.to_recipe()}


def write_adapter_folder(
    args: Any, paths: Sequence[tuple[str, str]], argv: Sequence[str], quiet: bool
) -> int:
    """``lightning-soup average|blend|task-arithmetic`` over adapter folders, written as an adapter folder."""
    import shlex

    from lightning_soup import __version__
    from lightning_soup.cli import hf
    from lightning_soup.cli.io import note

    output = Path(args.output).expanduser()
    if output.exists() and not args.force:
        raise SoupError(f"{output} already exists; pass --force to overwrite it")
    sd, part = merge_as_adapters(args.command, args, paths)
    recipe = {
        "method": args.command,
        **part,
        "inputs": [
            {"role": role, "path": p, "sha256": storage.sha256_file(Path(p).expanduser() / WEIGHTS)}
            for role, p in paths
        ],
        "command": shlex.join(["lightning-soup", *argv]),
        "tool": f"lightning-soup {__version__}",
    }
    source = Path(paths[0][1]).expanduser()
    if args.output.endswith(".safetensors"):
        storage.save_state_dict(sd, output, recipe=recipe, overwrite=args.force)
    else:
        with hf.model_folder(output, source, sharded=False, recipe=recipe, overwrite=args.force,
                             weights_name=WEIGHTS) as weights:
            storage.save_state_dict(sd, weights, recipe=recipe)
    lora = part["lora"]
    exact = "exact" if lora["lora_exact"] else f"rank-r relative error {lora['lora_relative_error']:.3g}"
    digest = storage.sha256_file(output if output.is_file() else output / WEIGHTS)
    print(f"{digest}  {output}", flush=True)
    note(f"lightning-soup: wrote adapter {output} ({lora['lora_pairs']} LoRA pairs, {exact})", quiet)
    return 0
