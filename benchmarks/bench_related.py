"""Measure what separates fine-tunes of one base from unrelated models (the threshold of ``merge._related``).

Three architectures (a tiny GPT-2 built from a transformers config, an MLP, a CNN), each "pretrained" for
``--steps`` steps on task A from two seeds, then fine-tuned from seed 0's pretrained weights on task B for ``--steps``
steps with Adam 1e-4, Adam 1e-3 and SGD 0.05, each with the pretrained head kept and with a freshly initialised
head. Prints, against the base (or, for one run's checkpoints, against the run's last checkpoint), the centered
whole-model cosine and relative distance that ``Relatedness`` computes, and the plain (uncentered) cosine.

    python benchmarks/bench_related.py [--steps 300] [--json OUT]

Plain torch on the CPU (one thread); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

from lightning_soup.merge._related import Relatedness


def _plain_cosine(a: dict, b: dict) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a if a[k].is_floating_point())
    na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a if a[k].is_floating_point()))
    nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b if b[k].is_floating_point()))
    return dot / (na * nb)


def measure(ref: dict, model: dict) -> dict:
    rel = Relatedness(["m"], "ref")
    for k, t in ref.items():
        rel.update(k, t, [model[k]])
    r = rel.relations()[0]
    return {"cosine": r.cosine, "distance": r.distance, "noise": r.noise, "plain": _plain_cosine(ref, model)}


# ------------------------------------------------------------------------------------------------ models, tasks


def gpt2(seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=2, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


def head_of(name: str, model: nn.Module) -> nn.Module:
    return model.lm_head if name == "gpt2" else model[-1]


def batches(name: str, task: int, steps: int):
    g = torch.Generator().manual_seed(1000 + task)
    if name == "gpt2":
        trans = torch.randn(256, 256, generator=g).mul(3).softmax(-1)  # a Markov chain per task
        for _ in range(steps):
            x = torch.empty(16, 32, dtype=torch.long)
            x[:, 0] = torch.randint(0, 256, (16,), generator=g)
            for t in range(1, 32):
                x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
            yield x, x
        return
    shape = (32,) if name == "mlp" else (1, 16, 16)
    teacher = torch.randn(math.prod(shape), 10, generator=g)
    for _ in range(steps):
        x = torch.randn(64, *shape, generator=g)
        yield x, (x.reshape(64, -1) @ teacher).argmax(1)


def loss_of(name: str, model: nn.Module, x, y):
    if name == "gpt2":
        return model(input_ids=x, labels=y).loss
    return nn.functional.cross_entropy(model(x), y)


def train(name: str, model: nn.Module, task: int, steps: int, opt: str, lr: float, every: int = 0) -> list[dict]:
    optim = torch.optim.Adam(model.parameters(), lr) if opt == "adam" else torch.optim.SGD(model.parameters(), lr)
    snaps = []
    model.train()
    for i, (x, y) in enumerate(batches(name, task, steps), 1):
        optim.zero_grad()
        loss_of(name, model, x, y).backward()
        optim.step()
        if every and i % every == 0:
            snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snaps


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def show(r: dict) -> dict:
    print(f"{r['arch']:5s} {r['case']:32s} cos {r['cosine']:+.4f}  dist {r['distance']:.3f}  "
          f"noise {r['noise']:.4f}  plain cos {r['plain']:+.4f}", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", default=None, help="also write the figures here, per architecture (run_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, build in (("gpt2", gpt2), ("mlp", mlp), ("cnn", cnn)):
        init0, init1 = build(0), build(1)
        rows.append(show({"arch": name, "case": "independent inits", **measure(state(init0), state(init1))}))
        # one from-scratch run's checkpoints, each against the last (what a soup of the run's checkpoints sees)
        snaps = train(name, init0, 0, args.steps, "adam", 1e-3, every=max(1, args.steps // 6))
        for i, snap in enumerate(snaps[:-1]):
            rows.append(show({"arch": name, "case": f"one run: ckpt {i} vs last", **measure(snaps[-1], snap)}))
        base = state(init0)
        train(name, init1, 0, args.steps, "adam", 1e-3)
        rows.append(show({"arch": name, "case": "independently pretrained", **measure(base, state(init1))}))
        for opt, lr in (("adam", 1e-4), ("adam", 1e-3), ("sgd", 0.05)):
            for fresh in (False, True):
                model = build(0)
                model.load_state_dict(base)
                if fresh:
                    torch.manual_seed(99)
                    for m in head_of(name, model).modules():
                        if hasattr(m, "reset_parameters"):
                            m.reset_parameters()
                    if name == "gpt2":
                        nn.init.normal_(model.lm_head.weight, std=0.02)
                train(name, model, 1, args.steps, opt, lr)
                case = f"fine-tune {opt} {lr:g}" + (" fresh head" if fresh else "")
                rows.append(show({"arch": name, "case": case, **measure(base, state(model))}))
    print(json.dumps(rows))
    if args.json:
        by_arch: dict[str, list[dict]] = {}
        for r in rows:
            by_arch.setdefault(r["arch"], []).append({k: v for k, v in r.items() if k != "arch"})
        with open(args.json, "w") as f:
            json.dump(by_arch, f)


if __name__ == "__main__":
    main()
