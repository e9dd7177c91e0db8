"""Hugging Face model folders as CLI outputs: what ``from_pretrained(out)`` needs beside the merged weights.

When the inputs are model folders (a ``config.json`` beside the weights, as ``save_pretrained`` writes them) and
``-o`` names a folder, the output is a folder that ``AutoModelForCausalLM.from_pretrained(out)`` (or the matching
``AutoModel*`` class) loads directly: the weights as ``model.safetensors`` (or shards with
``model.safetensors.index.json`` under ``--shard-size``), ``config.json``, ``generation_config.json`` and the
tokenizer files copied from the base (or the first input, or ``--config-from``), and a short ``README.md`` model card
with the recipe. The folder is built under a temporary name next to ``-o`` and renamed into place once complete,
so a failed run leaves nothing behind and an earlier output is replaced only by a finished one.

Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning_soup._storage._atomic import COMPANION_FILES
from lightning_soup.errors import SoupError

CONFIG = "config.json"
#: copied from the config source when present (configuration, generation defaults, tokenizer and processor files):
#: every companion file a lightning-soup model folder may hold, so a later `--force` can replace what this wrote
COPIED = tuple(sorted(COMPANION_FILES - {"README.md"}))
CARD = "README.md"
WEIGHTS = "model.safetensors"


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder with a ``config.json`` (what ``save_pretrained`` writes)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG).is_file()


def config_source(config_from: str | None, inputs: Sequence[str]) -> Path | None:
    """Where ``config.json`` and the tokenizer come from: ``--config-from``, else the first input that is a model
    folder (the base or anchor comes first), else None (the inputs are plain checkpoints).

    Raises:
        SoupError: ``--config-from`` is neither a model folder nor a ``config.json`` file.
    """
    if config_from is not None:
        p = Path(config_from).expanduser()
        if p.is_file() and p.name == CONFIG:
            p = p.parent
        if not is_model_folder(p):
            raise SoupError(
                f"--config-from {config_from}: not a Hugging Face model folder (no config.json in it); give the "
                "folder that save_pretrained wrote, or its config.json"
            )
        return p
    return next((Path(i).expanduser() for i in inputs if is_model_folder(i)), None)


@contextlib.contextmanager
def model_folder(
    output: Path,
    source: Path,
    *,
    sharded: bool,
    recipe: dict[str, Any],
    dtype: str = "keep",
    overwrite: bool = False,
    weights_name: str = WEIGHTS,
) -> Iterator[Path]:
    """Build the model folder ``output``; yields where the weights go (a file, or a folder to shard into).

    On normal exit the shards (if any) are moved beside the configs, ``config.json`` and the tokenizer files are
    copied from ``source`` (``torch_dtype`` updated when ``dtype`` is not ``keep``), the card is written, and the
    folder is renamed to ``output`` (with ``overwrite``, an earlier lightning-soup output there is replaced; nothing
    else ever is). On an exception nothing remains.
    """
    from lightning_soup._storage import _atomic

    staging = _atomic.new_temp_path(output)
    try:
        staging.mkdir(parents=True)
        weights = staging / (".shards" if sharded else weights_name)
        yield weights
        if sharded:
            for child in weights.iterdir():
                os.replace(child, staging / child.name)
            weights.rmdir()
        for name in COPIED:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        if dtype != "keep" and (staging / CONFIG).is_file():
            _set_dtype(staging / CONFIG, dtype)
        (staging / CARD).write_text(model_card(output.name, recipe, source), encoding="utf-8")
        _atomic.fsync_tree(staging)
        _atomic.commit(staging, output, overwrite=overwrite)
    finally:
        _atomic.remove(staging)
        _atomic.release(staging)


def _set_dtype(config: Path, dtype: str) -> None:
    doc = json.loads(config.read_text(encoding="utf-8"))
    for key in ("torch_dtype", "dtype"):
        if key in doc or key == "torch_dtype":
            doc[key] = dtype
    config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_card(name: str, recipe: dict[str, Any], source: Path) -> str:
    """A short ``README.md``: what was merged, how, and the command that reproduces it.

    Example:
        >>> card = model_card("soup", {"method": "average", "function": "lightning_soup.merge.uniform_soup",
        ...                    "parameters": {}, "inputs": [{"role": "input", "path": "a", "sha256": "00"}],
        ...                    "command": "lightning-soup average a b -o soup", "tool": "lightning-soup 0.1.0"},
        ...                   Path("a"))
        >>> print(card.splitlines()[7])
        # soup
    """
    rows = "\n".join(
        f"| {i.get('role', '')} | `{i.get('path', '')}` | `{str(i.get('sha256', ''))[:16]}…` |"
        for i in recipe.get("inputs", [])
    )
    params = json.dumps(recipe.get("parameters", {}), sort_keys=True)
    notes = []
    if recipe.get("allow_unrelated"):
        notes.append("- Merged with `--allow-unrelated`: the inputs did not look fine-tuned from one base.")
    if "lora" in recipe:
        notes.append(f"- LoRA: {json.dumps(recipe['lora'], sort_keys=True)}")
    return (
        "---\n"
        "library_name: transformers\n"
        "tags:\n- merge\n- lightning-soup\n"
        "---\n\n"
        f"# {name}\n\n"
        f"Merged by {recipe.get('tool', 'lightning-soup')} with `{recipe.get('function', recipe.get('method'))}` "
        f"(parameters: `{params}`). Configuration and tokenizer copied from `{source}`.\n\n"
        "| role | input | sha256 |\n|---|---|---|\n"
        f"{rows}\n\n"
        + ("\n".join(notes) + "\n\n" if notes else "")
        + "Reproduce:\n\n"
        f"```\n{recipe.get('command', '')}\n```\n\n"
        "The full recipe is in the safetensors metadata (`lightning_soup.storage.read_recipe`).\n"
    )
