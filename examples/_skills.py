"""The world of ``compose_skills.py`` and ``sweep_soup.py``: handwritten digits on a 16×16 page, a small MLP, and
the bookkeeping both examples share (training with Lightning, test predictions, McNemar tests, plots).

Not an example itself. Data: scikit-learn's bundled 8×8 digits (1797 images, no download), split once by image
into train/val/test (60/20/20, stratified by digit, seeded). Every *domain* places the same split's images
somewhere on a blank 16×16 page, so a test image is never trained on in any domain:

* ``clean``: the digit in the centre of the page (what the base model learns);
* ``a``: the digit 2 pixels up and 2 right of the centre (skill A);
* ``b``: the digit 2 pixels down and 2 left of the centre (skill B).

An MLP has no translation invariance, so each displaced domain is a new input distribution that partly overlaps
the others: a model trained on one position is poor at another (about 10% accuracy), fine-tuning on one position
moves weights the others use (forgetting), and yet the three can live in one network (multi-task training reaches
all of them). That is the shape of the "support model + code model from one base" problem, at toy scale.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

PAGE = 16
# domain → (row, column) of the digit's top-left corner on the page
OFFSETS = {"clean": (4, 4), "a": (2, 6), "b": (6, 2)}
DOMAIN_NAMES = {
    "clean": "base task: centred digits",
    "a": "skill A: digits up-right",
    "b": "skill B: digits down-left",
}
BASE_FLOOR = 0.9  # the base must reach this accuracy on its own (centred) test split before anything else runs


# ------------------------------------------------------------------------------------------------------------- data
def load_digits_split(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits, split by image 60/20/20 into ``train``/``val``/``test`` (stratified, seeded).

    Returns:
        split → ``(x (n, 8, 8) float32 in [0, 1], y (n,) int64)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    index = list(range(len(labels)))
    train, rest = train_test_split(index, train_size=0.6, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, train_size=0.5, stratify=labels[rest], random_state=seed)
    x = torch.tensor(images / 16.0, dtype=torch.float32).view(-1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    return {name: (x[sorted(part)], y[sorted(part)]) for name, part in (("train", train), ("val", val), ("test", test))}


def place(x: Tensor, domain: str) -> Tensor:
    """Digits ``(n, 8, 8)`` → pages ``(n, 256)`` with each digit at ``domain``'s position."""
    row, col = OFFSETS[domain]
    return nn.functional.pad(x, (col, PAGE - 8 - col, row, PAGE - 8 - row)).reshape(len(x), PAGE * PAGE)


def domain_data(split: tuple[Tensor, Tensor], domains: Sequence[str]) -> TensorDataset:
    """The split's images placed in each of ``domains`` (concatenated), with their labels."""
    x, y = split
    return TensorDataset(torch.cat([place(x, d) for d in domains]), y.repeat(len(domains)))


def loader(dataset: TensorDataset, *, shuffle: bool = False, seed: int = 0, batch_size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size if shuffle else 512, shuffle=shuffle, generator=generator)


def val_loaders(split: tuple[Tensor, Tensor], domains: Sequence[str]) -> list[DataLoader]:
    """One validation dataloader per domain, in order (the module's ``val_domains``)."""
    return [loader(domain_data(split, [d])) for d in domains]


# ------------------------------------------------------------------------------------------------------------ model
def page_mlp(hidden: int) -> nn.Sequential:
    """256 → hidden → hidden → 10 MLP (no normalisation layers, so every weight is a plain matrix or bias)."""
    return nn.Sequential(nn.Linear(PAGE * PAGE, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))  # fmt: skip


class PageClassifier(pl.LightningModule):
    """Classifies the digit on a page; validation logs one accuracy per domain and the mean over the skills.

    Validation has one dataloader per entry of ``val_domains`` and logs ``val/<domain>_acc`` (exact: correct
    predictions over images, counted over the whole split), plus ``val/mean_acc``, the mean of ``val/a_acc`` and
    ``val/b_acc`` when both are validated (else of every validated domain).

    Args:
        hidden: width of the two hidden layers.
        lr: SGD learning rate (momentum 0.9, constant).
        weight_decay: SGD weight decay.
        label_smoothing: cross-entropy label smoothing.
        augment: ``"none"``, ``"noise"`` (Gaussian pixel noise, σ 0.15) or ``"shift"`` (each page rolled by up to one
            pixel in each direction): applied to training batches only.
        val_domains: the domain of each validation dataloader, in order.
    """

    def __init__(
        self,
        hidden: int = 256,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        augment: str = "none",
        val_domains: Sequence[str] = ("clean", "a", "b"),
    ) -> None:
        super().__init__()
        if augment not in ("none", "noise", "shift"):
            raise ValueError(f"`augment` must be 'none', 'noise' or 'shift', got {augment!r}")
        self.save_hyperparameters()
        self.val_domains = tuple(val_domains)
        self.net = page_mlp(hidden)
        self._hits = torch.zeros(len(self.val_domains), dtype=torch.int64)
        self._seen = torch.zeros(len(self.val_domains), dtype=torch.int64)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (n, 256) → (n, 10) logits

    def _augment(self, x: Tensor) -> Tensor:
        if self.hparams.augment == "noise":
            return (x + 0.15 * torch.randn_like(x)).clamp(0.0, 1.0)
        if self.hparams.augment == "shift":
            dr, dc = (int(v) for v in torch.randint(-1, 2, (2,)))  # CPU RNG, seeded: no device sync
            return x.view(-1, PAGE, PAGE).roll((dr, dc), dims=(1, 2)).reshape(len(x), -1)
        return x

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(self._augment(x))
        return nn.functional.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def on_validation_epoch_start(self) -> None:
        self._hits = torch.zeros(len(self.val_domains), dtype=torch.int64, device=self.device)
        self._seen = torch.zeros(len(self.val_domains), dtype=torch.int64, device=self.device)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self._hits[dataloader_idx] += (self(x).argmax(1) == y).sum()
        self._seen[dataloader_idx] += len(y)

    def on_validation_epoch_end(self) -> None:
        acc = self._hits.double() / self._seen.clamp(min=1).double()
        values = {f"val/{d}_acc": acc[i].float() for i, d in enumerate(self.val_domains)}
        skills = [d for d in ("a", "b") if d in self.val_domains]
        skills = skills if len(skills) == 2 else list(self.val_domains)
        values["val/mean_acc"] = torch.stack([values[f"val/{d}_acc"] for d in skills]).mean()
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "val/mean_acc")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )


def make_trainer(out: Path, epochs: int = 1, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """A quiet, deterministic CPU trainer (no logger, no checkpoints, no progress bar)."""
    return pl.Trainer(
        default_root_dir=str(out), accelerator="cpu", devices=1, max_epochs=epochs, deterministic=True,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        num_sanity_val_steps=0, callbacks=list(callbacks),
    )  # fmt: skip


def setup(threads: int = 1) -> None:
    """Deterministic and quiet: fixed thread count, deterministic kernels, Lightning's chatter off.

    A tiny MLP gains nothing from intra-op threads, and one thread makes the numbers independent of the core count.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message)


def train_base(
    out: Path, splits: Mapping[str, tuple[Tensor, Tensor]], *, hidden: int, epochs: int, seed: int,
    val_domains: Sequence[str],
) -> dict[str, Tensor]:  # fmt: skip
    """The base model: centred digits only (SGD, lr 0.05), written to ``out/base.safetensors``.

    Stops the example (:class:`NotLearned`) unless it reaches ``BASE_FLOOR`` on its own test split: merging the
    fine-tunes of a base that never learned its task shows nothing.
    """
    from safetensors.torch import save_file

    pl.seed_everything(seed, verbose=False)
    model = PageClassifier(hidden=hidden, lr=0.05, val_domains=val_domains)
    train = loader(domain_data(splits["train"], ["clean"]), shuffle=True, seed=seed)
    make_trainer(out, epochs).fit(model, train, val_loaders(splits["val"], val_domains))
    weights = state(model)
    save_file(weights, str(out / "base.safetensors"))
    own = accuracy(hits([weights], splits["test"], ["clean"], hidden)["clean"])
    require("the base's accuracy on its own test split (centred digits)", own, BASE_FLOOR,
            "Train it longer (--base-epochs) or with another --seed.")  # fmt: skip
    return weights


def state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (contiguous, ready for safetensors)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def probabilities(weights: Mapping[str, Tensor], x: Tensor, hidden: int) -> Tensor:
    """Softmax of the MLP with ``weights`` over pages ``x (n, 256)`` → ``(n, 10)``."""
    net = page_mlp(hidden)
    net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})
    return net.eval()(x).softmax(1)


def hits(
    models: Sequence[Mapping[str, Tensor]], split: tuple[Tensor, Tensor], domains: Sequence[str], hidden: int
) -> dict[str, Tensor]:
    """Per image of ``split`` and domain, whether the model is right: ``domain → (n,) bool``.

    Several ``models`` form an output ensemble (the mean of their softmax probabilities).
    """
    x, y = split
    out = {}
    for d in domains:
        pages = place(x, d)
        mean = torch.stack([probabilities(m, pages, hidden) for m in models]).mean(0)
        out[d] = mean.argmax(1) == y
    return out


def accuracy(right: Tensor) -> float:
    return int(right.sum()) / len(right)


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: the images only one of two models gets right, against a fair coin
    (an exact binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    n = gained + lost
    return 1.0 if n == 0 else float(binomtest(gained, n, 0.5).pvalue)


def paired(mine: Tensor, theirs: Tensor) -> tuple[int, int, float]:
    """``(gained, lost, McNemar p)`` of one model's per-image hits against another's on the same images."""
    gained, lost = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    return gained, lost, mcnemar_p(gained, lost)


def weight_bytes(models: Sequence[Mapping[str, Tensor]]) -> int:
    """Bytes of weights held to serve ``models``."""
    return sum(t.numel() * t.element_size() for m in models for t in m.values())


@torch.no_grad()
def time_ratio(many: Sequence[Mapping[str, Tensor]], one: Mapping[str, Tensor], x: Tensor, hidden: int) -> float:
    """Measured forward time of the ensemble ``many`` over the pages ``x`` divided by that of the model ``one``.

    The two are timed alternately, 200 times each, and the fastest run of each is compared: on a busy machine the
    minimum is the least disturbed estimate.
    """

    def nets(models: Sequence[Mapping[str, Tensor]]) -> list[nn.Module]:
        out = []
        for m in models:
            net = page_mlp(hidden)
            net.load_state_dict({k.removeprefix("net."): v for k, v in m.items()})
            out.append(net.eval())
        return out

    def seconds(group: list[nn.Module]) -> float:
        start = time.perf_counter()
        torch.stack([net(x).softmax(1) for net in group]).mean(0)
        return time.perf_counter() - start

    ensemble, single = nets(many), nets([one])
    seconds(ensemble), seconds(single)  # warm-up
    times = [(seconds(ensemble), seconds(single)) for _ in range(200)]
    return min(t[0] for t in times) / min(t[1] for t in times)


# ----------------------------------------------------------------------------------------------------------- checks
class NotLearned(SystemExit):
    """The demo stops: a model did not learn what the rest of the story assumes."""


def require(name: str, value: float, floor: float, hint: str) -> None:
    """Stop with a clear message when ``value`` (an accuracy) is below ``floor``."""
    if not value >= floor or math.isnan(value):
        raise NotLearned(
            f"STOP: {name} is {value:.3f}, below the {floor:.2f} this example needs before anything is merged "
            f"(merging models that did not learn their task shows nothing). {hint}"
        )
