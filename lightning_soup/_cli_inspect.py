"""``lightning-soup inspect``: compare checkpoints and, against a base, their task vectors (streamed)."""

from __future__ import annotations

import contextlib
import json
import sys
from argparse import Namespace

from torch import Tensor

from lightning_soup import _inspect
from lightning_soup._cli_io import Progress, device_of, open_inputs, prefetch, wants_progress


def run_inspect(args: Namespace) -> int:
    """Print the report (rich tables, or JSON with ``--json``) on stdout; 0 even when the inputs differ."""
    device = device_of(args.device)
    roles = ([("base", args.base)] if args.base else []) + [("model", p) for p in args.models]
    report = None
    with contextlib.ExitStack() as stack:
        inputs = open_inputs(stack, roles, args.prefix)
        metas = [i.meta() for i in inputs]
        compat = _inspect.compare(metas, [i.name for i in inputs])
        if args.base:
            base_meta = metas[0]
            keys = [k for k in compat.common if base_meta[k].dtype.is_floating_point]
            total = sum(m[k].numel() * m[k].element_size() for k in keys for m in metas)
            stats = _inspect.TaskVectorStats([i.name for i in inputs[1:]])

            def load(key: str) -> list[Tensor]:
                return [i[key] for i in inputs]

            with Progress(wants_progress(args.quiet or args.json)) as progress:
                task = progress.add("reading", total)
                for key, tensors in prefetch(keys, load):
                    nbytes = sum(t.numel() * t.element_size() for t in tensors)
                    tensors = [t.to(device) for t in tensors]
                    stats.update(key, tensors[0], tensors[1:])
                    del tensors
                    progress.advance(task, nbytes)
            report = stats.result(args.top)
    base_name = args.base
    if args.json:
        doc = _inspect.report_json(compat, report, base_name)
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        from rich.console import Console

        # piped output keeps whole rows instead of wrapping at 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=160)
        console.print(_inspect.render_report(compat, report, base_name or "base"))
    return 0
