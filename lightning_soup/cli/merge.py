"""The merge commands of ``lightning-soup``: plan, check everything, hash the inputs, stream, commit.

Each output tensor is ``merge_fn({key: tensor} per input)[key]`` with the very function of
:mod:`lightning_soup.merge` that a Python user would call on whole state dicts: every merge function works key by
key (DARE seeds its mask from (seed, model index, key)), so streaming changes nothing but the memory use.
Nothing is written until every input has been opened and checked; the output is written through
:class:`lightning_soup.storage.SafetensorsWriter` (temporary name, ``os.replace``), so a failure leaves no file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shlex
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_soup import storage
from lightning_soup.cli import adapters, hf, input_paths
from lightning_soup.cli.io import (
    Input,
    Progress,
    Timer,
    check_finite,
    device_of,
    hash_inputs,
    human_bytes,
    note,
    open_inputs,
    prefetch,
    wants_progress,
)
from lightning_soup.errors import SoupError
from lightning_soup.merge import diagnostics
from lightning_soup.merge._related import Relatedness

MergeFn = Callable[[str, list[Tensor]], Tensor]


@dataclass
class Plan:
    """What a command computes: its inputs with their roles, its parameters and the per-key merge."""

    method: str
    function: str
    inputs: list[tuple[str, str]]  # (role, path)
    parameters: dict[str, Any]
    merge: MergeFn
    #: extra checks of the parameters against the keys (before anything is read)
    check: Callable[[Sequence[str]], None] | None = None


def _first_match(key: str, patterns: Mapping[str, float]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(key, p)), None)


def make_plan(args: Namespace) -> Plan:
    """Turn parsed arguments into a :class:`Plan` calling :mod:`lightning_soup.merge` on one key at a time."""
    from lightning_soup import merge

    command = args.command
    if command == "average":
        weights = args.weights
        if weights is None:

            def average(key: str, ts: list[Tensor]) -> Tensor:
                return merge.uniform_soup([{key: t} for t in ts], allow_unrelated=True)[key]

            return Plan(command, "uniform_soup", [("input", p) for p in args.inputs], {}, average)

        def weighted(key: str, ts: list[Tensor]) -> Tensor:
            return merge.weighted_average([{key: t} for t in ts], weights, allow_unrelated=True)[key]

        return Plan(command, "weighted_average", [("input", p) for p in args.inputs], {"weights": weights}, weighted)

    if command == "blend":
        ratio, layer_ratios = args.ratio, dict(args.layer_ratio)

        def blend(key: str, ts: list[Tensor]) -> Tensor:
            # only the pattern that wins for this key: the same ratio as the whole dict, without the core warning
            # about patterns that match none of the (one) keys
            pattern = _first_match(key, layer_ratios)
            mine = None if pattern is None else {pattern: layer_ratios[pattern]}
            return merge.interpolate({key: ts[0]}, {key: ts[1]}, ratio, layer_ratios=mine, allow_unrelated=True)[key]

        def check(keys: Sequence[str]) -> None:
            unused = [p for p in layer_ratios if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
            if unused:
                raise SoupError(
                    f"--layer-ratio {' '.join(repr(p) for p in unused)}: the pattern matches no key (fnmatch over "
                    "whole "
                    f"key names such as {keys[0]!r}; check the spelling and --prefix)"
                )

        parameters: dict[str, Any] = {"ratio": ratio}
        if layer_ratios:
            parameters["layer_ratios"] = layer_ratios
        return Plan(command, "interpolate", [("anchor", args.anchor), ("model", args.model)], parameters, blend, check)

    if command == "slerp":
        t = args.t

        def slerp(key: str, ts: list[Tensor]) -> Tensor:
            return merge.slerp({key: ts[0]}, {key: ts[1]}, t, allow_unrelated=True)[key]

        return Plan(command, "slerp", [("a", args.a), ("b", args.b)], {"t": t}, slerp)

    finetuned = [("finetuned", p) for p in args.finetuned]
    if command == "task-arithmetic":
        scales: float | list[float] = args.scales[0] if len(args.scales) == 1 else list(args.scales)

        def arithmetic(key: str, ts: list[Tensor]) -> Tensor:
            base = {key: ts[0]}
            vectors = [merge.task_vector({key: t}, base, allow_unrelated=True) for t in ts[1:]]
            return merge.task_arithmetic(base, vectors, scales, allow_unrelated=True)[key]

        return Plan(command, "task_arithmetic", [("base", args.base), *finetuned], {"scales": scales}, arithmetic)

    if command == "ties":
        density, scale = args.density, args.scale

        def ties(key: str, ts: list[Tensor]) -> Tensor:
            fts = [{key: t} for t in ts[1:]]
            return merge.ties({key: ts[0]}, fts, density, scale=scale, allow_unrelated=True)[key]

        return Plan(command, "ties", [("base", args.base), *finetuned], {"density": density, "scale": scale}, ties)

    if command == "dare":
        density, scale, seed = args.density, args.scale, args.seed

        def dare(key: str, ts: list[Tensor]) -> Tensor:
            fts = [{key: t} for t in ts[1:]]
            return merge.dare({key: ts[0]}, fts, density, scale=scale, seed=seed, allow_unrelated=True)[key]

        parameters = {"density": density, "scale": scale, "seed": seed}
        return Plan(command, "dare", [("base", args.base), *finetuned], parameters, dare)

    if command in _SPECTRAL:
        function = _SPECTRAL[command]
        method = getattr(merge, function)
        options: dict[str, Any] = {}
        if command != "model-stock":
            options["alpha"] = args.alpha
        if command == "iso-cts":
            options["common_fraction"] = args.common_fraction

        def spectral(key: str, ts: list[Tensor]) -> Tensor:
            # the whole-dict function on one key: its per-key formula sees exactly this key's tensors
            return method({key: ts[0]}, [{key: t} for t in ts[1:]], **options, allow_unrelated=True)[key]

        return Plan(command, function, [("base", args.base), *finetuned], options, spectral)

    raise AssertionError(f"unknown command {command!r}")  # pragma: no cover - argparse restricts the choices


#: the commands that merge each tensor's task vectors as a whole (SVD merges, Model Stock) -> merge function
_SPECTRAL = {"tsv": "tsv_merge", "iso-c": "iso_c", "iso-cts": "iso_cts", "model-stock": "model_stock"}


def check_output(output: Path, args: Namespace, inputs: Sequence[Input] = ()) -> None:
    """The output rule, checked before any work (the writer enforces the first two again when it publishes).

    Refuse an existing ``-o`` without ``--force`` (and, without it, never replace one that appears meanwhile:
    the writer publishes with a no-replace rename); refuse a folder that is not a previous lightning-soup output
    even with ``--force`` (:func:`storage.check_replaceable`); refuse, even with ``--force``, an ``-o`` that is an
    input, any file an input reads (a shard, an index, the target of a symlinked shard), or a folder holding one.
    """
    if os.path.lexists(output):
        if not args.force:
            raise SoupError(f"{output} already exists; pass --force to overwrite it")
        storage.check_replaceable(output)
    target = output.resolve()
    for i in inputs:
        given = Path(i.path).expanduser()
        for file in dict.fromkeys([given, *i.files]):
            source = file.resolve()
            if source == target or target in source.parents or _same_file(output, file):
                what = "is" if file == given else f"would replace {file}, a file of"
                raise SoupError(
                    f"-o {output} {what} the input {i.path}; an input is never overwritten, even with --force. "
                    "Choose another -o"
                )


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names that resolve() cannot tell apart (a case-insensitive filesystem, a bind mount)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def refuse_lora_factors(inputs: Sequence[Input]) -> None:
    """Files holding PEFT LoRA pairs cannot be merged key by key (ΔW = B·A needs both factors of every input)."""
    from lightning_soup.merge.lora import lora_pairs

    pairs = lora_pairs(inputs[0].meta())
    if pairs:
        raise SoupError(
            f"{inputs[0].name}: holds {len(pairs)} PEFT LoRA pair(s) (e.g. {pairs[0].a_key!r}), which merge on "
            "ΔW = B·A, never factor by factor; pass the adapters as adapter folders (`save_pretrained`: "
            "adapter_model.safetensors + adapter_config.json), with --merge-into BASE for dense weights, or merge "
            "the state dicts in Python (`lightning_soup.merge.uniform_soup` and friends route LoRA pairs on ΔW)"
        )


def check_compatible(inputs: Sequence[Input]) -> None:
    """Every incompatibility is found on the headers before any data is read; the first is reported in one line."""
    from lightning_soup.merge._checks import check_compatible as core_check

    metas = [i.meta() for i in inputs]
    names = [i.name for i in inputs]
    problems = diagnostics.compare(metas, names).problems()
    if problems:
        more = len(problems) - 1
        extra = f" (and {more} more incompatibilit{'y' if more == 1 else 'ies'})" if more else ""
        # Say what to do, not only what differs: the usual causes are another model or a wrapper prefix.
        hint = (
            "; merge only checkpoints of the same model (`--prefix` selects a sub-module's keys); "
            "`lightning-soup inspect` lists every difference"
        )
        if "pass --prefix" in problems[0]:  # the line already says what to do
            hint = ""
        raise SoupError(problems[0] + extra + hint)
    core_check(metas, names)  # the functional core's own check, so that the two can never disagree


def relatedness(plan: Plan, inputs: Sequence[Input]) -> Relatedness:
    """How the inputs relate to the first one (the base, the anchor, input A), judged on the whole model.

    The merge loop feeds it every key it reads anyway (each tensor is read once) and checks it before the output is
    committed; the per-key merge calls pass ``allow_unrelated=True``, since one tensor alone (a fresh head) says
    nothing about the model.
    """
    derived = plan.function not in ("uniform_soup", "weighted_average", "slerp")
    return Relatedness([i.name for i in inputs[1:]], inputs[0].name, derived=derived)


def _probe(dtype: torch.dtype, index: int) -> Tensor:
    """A tiny stand-in with ``dtype`` (distinct values per input, so no special case such as colinearity hides)."""
    if dtype.is_floating_point:
        return torch.tensor([1.0 + index, -0.5 - index, 0.25 * (index + 2)], dtype=torch.float64).to(dtype)
    return torch.ones(3, dtype=dtype)


def _compute_dtype(t: Tensor, target: torch.dtype | None) -> torch.dtype:
    """Inputs narrower than the requested output are widened first (bfloat16 in, float32 out: no bfloat16 rounding)."""
    if target is None or not t.dtype.is_floating_point:
        return t.dtype
    return torch.promote_types(t.dtype, target)


def output_specs(
    plan: Plan, inputs: Sequence[Input], target: torch.dtype | None
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{key: (dtype, shape)}`` of the output, in the first input's key order.

    The dtype is what the merge function itself returns for the inputs' dtypes (found by running it on tiny
    tensors once per distinct combination of input dtypes), or ``--dtype`` for floating results. The probe also
    validates the parameters with the core's own checks before any data is read.
    """
    metas = [i.meta() for i in inputs]
    results: dict[tuple[torch.dtype, ...], torch.dtype] = {}
    specs = {}
    for key, ref in metas[0].items():
        signature = tuple(m[key].dtype for m in metas)
        if signature not in results:
            probes = [_probe(d, n) for n, d in enumerate(signature)]
            probes = [p.to(_compute_dtype(p, target)) for p in probes]
            results[signature] = plan.merge(key, probes).dtype
        dtype = results[signature]
        if target is not None and dtype.is_floating_point:
            dtype = target
        specs[key] = (dtype, tuple(ref.shape))
    return specs


def recipe_of(
    plan: Plan, inputs: Sequence[Input], digests: Sequence[str], args: Namespace, argv: Sequence[str]
) -> dict:
    from lightning_soup import __version__

    entries = []
    for i, digest in zip(inputs, digests):
        entry = {"role": i.role, "path": i.path, "sha256": digest}
        if i.prefix:
            entry["prefix"] = i.prefix
        entries.append(entry)
    return {
        "method": plan.method,
        "function": f"lightning_soup.merge.{plan.function}",
        "parameters": plan.parameters,
        "inputs": entries,
        "dtype": args.dtype,
        "command": shlex.join(["lightning-soup", *argv]),
        "tool": f"lightning-soup {__version__}",
    }


def run_merge(args: Namespace, argv: Sequence[str]) -> int:
    """Run one merge command; returns the exit status (errors are raised as :class:`SoupError`)."""
    timer = Timer()
    device = device_of(args.device)
    output = Path(args.output).expanduser()
    plan = make_plan(args)
    merge_into = args.merge_into
    if merge_into is None and any(adapters.is_adapter_folder(p) for p in input_paths(args)):
        return adapters.write_adapter_folder(args, plan.inputs, argv, args.quiet)  # small: merged whole, as adapters
    candidates = ([merge_into] if merge_into else []) + input_paths(args)
    source = None if args.output.endswith(".safetensors") else hf.config_source(args.config_from, candidates)
    check_output(output, args)
    target = None if args.dtype == "keep" else getattr(torch, args.dtype)
    with contextlib.ExitStack() as stack:
        opener = adapters.opener(stack, merge_into) if merge_into else storage.open_state_dict
        inputs = open_inputs(stack, plan.inputs, args.prefix, opener=opener)
        check_output(output, args, inputs)
        check_compatible(inputs)
        refuse_lora_factors(inputs)
        if plan.check is not None:
            plan.check(list(inputs[0]))
        specs = output_specs(plan, inputs, target)
        total = sum(s[0].itemsize * _numel(s[1]) for s in specs.values())
        with Progress(wants_progress(args.quiet)) as progress:
            digests = hash_inputs(inputs, progress)
            recipe = recipe_of(plan, inputs, digests, args, argv)
            if args.allow_unrelated:
                recipe["allow_unrelated"] = True
            task = progress.add("merging", total)

            def load(key: str) -> list[Tensor]:
                return [i[key] for i in inputs]

            related = None if args.allow_unrelated else relatedness(plan, inputs)
            storage.remove_stale_temp_files(output.parent)  # what a killed earlier run left behind
            folder = contextlib.nullcontext(output)
            if source is not None:  # a Hugging Face model folder: weights, config, tokenizer, card
                sharded = args.shard_size is not None
                folder = hf.model_folder(
                    output, source, sharded=sharded, recipe=recipe, dtype=args.dtype, overwrite=args.force
                )
            with folder as weights, storage.SafetensorsWriter(
                weights, specs, recipe=recipe, shard_size=args.shard_size, overwrite=args.force or source is not None
            ) as writer:
                for key, tensors in prefetch(specs, load):
                    tensors = [t.to(device=device, dtype=_compute_dtype(t, target)) for t in tensors]
                    if related is not None:
                        related.update(key, tensors[0], tensors[1:])
                    result = plan.merge(key, tensors)
                    dtype, shape = specs[key]
                    if tuple(result.shape) != shape:  # pragma: no cover - a merge function bug, not a user error
                        raise RuntimeError(
                            f"{plan.function} returned shape {tuple(result.shape)} for {key!r}, expected {shape}"
                        )
                    result = result.to(dtype)
                    check_finite(result, str(output), key, output=True)  # finite inputs can overflow float16
                    writer.write(key, result)
                    del tensors, result
                    progress.advance(task, dtype.itemsize * _numel(shape))
                if related is not None:  # before the writer commits: a refused merge leaves no output
                    related.check(hint="pass --allow-unrelated if they do share a base")
            progress.done(task)
    digest = storage.sha256_file(output)
    print(f"{digest}  {output}", flush=True)
    kind = "model folder" if source is not None else "folder" if args.shard_size is not None else "file"
    note(
        f"lightning-soup: wrote {output} ({kind}, {len(specs)} tensors, {human_bytes(total)}) in {timer.seconds:.1f} s",
        args.quiet,
    )
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
