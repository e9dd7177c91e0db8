"""Reading and writing model weights: safetensors files, sharded safetensors folders and Lightning ``.ckpt`` files.

Reads are lazy, one tensor at a time (:func:`open_state_dict`); writes are atomic and can stream one tensor at a
time (:class:`SafetensorsWriter`), so memory stays bounded by the largest tensor, not the model. No Lightning
import: the CLI and the functional core use this module too.

Files written here are plain safetensors: ``safetensors.torch.load_file`` and Hugging Face loaders read them. The
recipe (how the weights were made) is JSON in the safetensors metadata under ``"lightning_soup"``.

Every file is untrusted input (see SECURITY.md): names recorded in files are confined to their folder
(:func:`confined`, also for callers that delete files a checkpoint names), only regular files are opened
(:func:`open_regular`: a FIFO fails at once), headers are validated before any tensor is read, and ``.ckpt`` files
are loaded with ``weights_only=True``. Outputs replace only what may be replaced (:func:`check_replaceable`;
``overwrite=False`` never replaces anything, even under a race).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> state = {"layer.weight": torch.randn(4, 4), "layer.bias": torch.zeros(4)}
    >>> path = save_state_dict(state, folder / "soup.safetensors", recipe={"method": "uniform_soup"})
    >>> with open_state_dict(path) as lazy:
    ...     lazy.recipe, torch.equal(lazy["layer.weight"], state["layer.weight"])
    ({'method': 'uniform_soup'}, True)
    >>> sharded = save_state_dict(state, folder / "soup-sharded", shard_size=64)
    >>> sorted(p.name for p in sharded.iterdir())
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
"""

from lightning_soup._storage._atomic import (
    atomic_write,
    check_replaceable,
    json_safe,
    remove_stale_temp_files,
    write_json,
)
from lightning_soup._storage._format import parse_size
from lightning_soup._storage._paths import confined, open_regular
from lightning_soup._storage._read import LazyStateDict, load_state_dict, open_state_dict, read_recipe, sha256_file
from lightning_soup._storage._write import SafetensorsWriter, save_state_dict

__all__ = [
    "LazyStateDict",
    "SafetensorsWriter",
    "atomic_write",
    "check_replaceable",
    "confined",
    "json_safe",
    "load_state_dict",
    "open_regular",
    "open_state_dict",
    "parse_size",
    "read_recipe",
    "remove_stale_temp_files",
    "save_state_dict",
    "sha256_file",
    "write_json",
]
