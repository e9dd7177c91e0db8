"""The functional core: pure functions over state dicts (``Mapping[str, Tensor]``).

Every function checks that its inputs are compatible before any arithmetic, never modifies them, accumulates in
float32 or better, returns each floating tensor in the dtype and on the device of the tensor it replaces, copies
non-floating tensors (integer buffers) instead of averaging them, and works key by key, so merging one key at a
time gives the same result as merging whole state dicts. Problems raise :class:`lightning_soup.SoupError`.

Example:
    >>> import torch
    >>> from lightning_soup.merge import interpolate, uniform_soup
    >>> a, b = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([2.0, 0.0])}
    >>> uniform_soup([a, b])
    {'w': tensor([1., 2.])}
    >>> interpolate(a, b, 0.25)
    {'w': tensor([0.5000, 3.0000])}
"""

from lightning_soup.merge.average import uniform_soup, weighted_average
from lightning_soup.merge.dare import dare
from lightning_soup.merge.greedy import greedy_soup
from lightning_soup.merge.iso_c import iso_c
from lightning_soup.merge.iso_cts import iso_cts
from lightning_soup.merge.lora import (
    LoraPair,
    LoraReport,
    combine_factors,
    delta_weight,
    lora_interpolate,
    lora_keys,
    lora_pairs,
    lora_task_arithmetic,
    lora_uniform_soup,
    lora_weighted_average,
)
from lightning_soup.merge.model_stock import model_stock
from lightning_soup.merge.slerp import slerp
from lightning_soup.merge.task_arithmetic import interpolate, task_arithmetic, task_vector
from lightning_soup.merge.ties import ties
from lightning_soup.merge.tsv import tsv_merge

__all__ = [
    "LoraPair",
    "LoraReport",
    "combine_factors",
    "dare",
    "delta_weight",
    "greedy_soup",
    "interpolate",
    "iso_c",
    "iso_cts",
    "lora_interpolate",
    "lora_keys",
    "lora_pairs",
    "lora_task_arithmetic",
    "lora_uniform_soup",
    "lora_weighted_average",
    "model_stock",
    "slerp",
    "task_arithmetic",
    "task_vector",
    "ties",
    "tsv_merge",
    "uniform_soup",
    "weighted_average",
]
