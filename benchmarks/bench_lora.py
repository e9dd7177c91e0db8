"""What a snapshot costs in a LoRA run: keeping what training changes (the adapter) against keeping every parameter.

A GPT-2-style causal LM built from a config (``--layers``, ``--hidden``, ``--vocab``; random init, nothing
downloaded) gets a PEFT LoRA adapter (rank ``--rank`` on ``c_attn`` and ``c_proj``) and trains ``--epochs`` epochs
with ``CheckpointAveraging(window=2)`` (one snapshot per epoch, on disk). The same run is made twice:

* ``trainable_only``: the callbacks as shipped — snapshots hold parameters with ``requires_grad=True`` and
  buffers (the adapter);
* ``all_parameters``: the same code with the kept set widened to the whole ``state_dict()`` (what the callbacks
  kept before), for comparison.

Reported per variant: ``snapshot_bytes`` (size of one snapshot file), ``snapshot_s`` (median time of the epoch-end
hook that takes the snapshot, what training waits for), ``write_s`` (median time of writing one snapshot file, done
on a background thread) and ``end_of_fit_s`` (``on_train_end``: the average); plus ``adapter_bytes``,
``model_bytes`` and the ratios between the variants.

Usage::

    python benchmarks/bench_lora.py --json bench_lora.json
    python benchmarks/bench_lora.py --quick            # smoke run, numbers not for quoting
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def make_module(args: argparse.Namespace) -> Any:
    import peft
    import pytorch_lightning as pl
    import transformers
    from torch.utils.data import DataLoader, TensorDataset

    cfg = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.hidden, n_head=max(1, args.hidden // 64), vocab_size=args.vocab,
        n_positions=args.seq, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                           target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, args.vocab, (args.batches * args.batch_size, args.seq), generator=g))

    class LoraLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), lora)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(data, batch_size=args.batch_size)

    torch.manual_seed(0)
    return LoraLM()


def run_variant(args: argparse.Namespace, all_parameters: bool, root: Path) -> dict[str, Any]:
    import pytorch_lightning as pl

    from lightning_soup import CheckpointAveraging, storage
    from lightning_soup.callbacks import _tensors

    module = make_module(args)
    hook_s: list[float] = []
    write_s: list[float] = []
    end_s: list[float] = []
    averaging = CheckpointAveraging(window=2, dirpath=str(root / "soup"), verbose=False)

    def timed(fn: Any, into: list[float]) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                into.append(time.perf_counter() - start)

        return wrapper

    averaging.on_train_epoch_end = timed(averaging.on_train_epoch_end, hook_s)  # type: ignore[method-assign]
    averaging.on_train_end = timed(averaging.on_train_end, end_s)  # type: ignore[method-assign]
    saved = storage.save_state_dict, _tensors.kept_keys
    storage.save_state_dict = timed(storage.save_state_dict, write_s)
    if all_parameters:
        # what the callbacks kept before: every entry of state_dict()
        _tensors.kept_keys = lambda m: {_tensors.canonical_key(k) for k in m.state_dict()}  # type: ignore[assignment]
    try:
        trainer = pl.Trainer(
            default_root_dir=str(root), accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[averaging],
        )
        trainer.fit(module)
    finally:
        storage.save_state_dict, _tensors.kept_keys = saved
    files = sorted((root / "soup" / "snapshots").glob("*.safetensors"))
    return {
        "snapshot_bytes": statistics.median(f.stat().st_size for f in files),
        "snapshot_s": statistics.median(hook_s),
        "write_s": statistics.median(write_s) if write_s else None,
        "end_of_fit_s": end_s[0],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    module = make_module(args)
    adapter = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    unique = {v.data_ptr(): v for v in module.state_dict().values()}  # tied embeddings once
    model = sum(v.numel() * v.element_size() for v in unique.values())
    del module
    result: dict[str, Any] = {
        "config": {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "rank", "epochs", "threads")},
        "adapter_bytes": adapter,
        "model_bytes": model,
    }
    for name, widen in (("trainable_only", False), ("all_parameters", True)):
        with tempfile.TemporaryDirectory() as tmp:
            result[name] = run_variant(args, widen, Path(tmp))
    ours, before = result["trainable_only"], result["all_parameters"]
    result["disk_ratio"] = before["snapshot_bytes"] / ours["snapshot_bytes"]
    result["snapshot_time_ratio"] = before["snapshot_s"] / ours["snapshot_s"]
    result["snapshot_over_adapter"] = ours["snapshot_bytes"] / adapter
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="training batches per epoch")
    parser.add_argument("--epochs", type=int, default=5, help="one snapshot per epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes; a smoke run, numbers not for quoting")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.vocab, args.epochs, args.batches = 2, 128, 4000, 3, 2
    result = run(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
