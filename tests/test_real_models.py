"""The callbacks on the models people fine-tune: a GPT-2-style causal LM with tied embeddings, a PEFT LoRA adapter,
a ``torch.compile``d module. Every output is checked against a float64 reference computed here from weights a
recording callback copied during training (not from the callbacks' own files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lightning_soup.lightning import CheckpointAveraging, GreedySoup, TaskArithmeticBlend  # noqa: E402

from tests._models import trainer_kwargs  # noqa: E402

VOCAB, SEQ = 96, 16
TIED = ("transformer.wte.weight", "lm_head.weight")


def tiny_gpt2() -> Any:
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def lora_gpt2() -> Any:
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True)
    return peft.get_peft_model(tiny_gpt2(), config)


def tokens(n: int, seed: int) -> TensorDataset:
    # a learnable pattern (each token follows from the previous one) plus noise, so losses move
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    seq = (start + 7 * torch.arange(SEQ)) % VOCAB
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    return TensorDataset(torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), seq))


class CausalLM(pl.LightningModule):
    def __init__(self, lora: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = lora_gpt2() if lora else tiny_gpt2()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.model(input_ids=batch[0], labels=batch[0]).loss)
        self.log("val/flat", 1.0)  # every soup candidate ties: an online soup accepts every ingredient

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(tokens(32, seed=0), batch_size=4, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(tokens(12, seed=1), batch_size=8)  # a short last batch: batch-size weighting matters


def f64(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float64, copy=True) for k, v in module.state_dict().items()}


class Recorder(pl.Callback):
    """Independent copies of the weights: at fit start, every epoch end, every `every_n_steps` optimizer steps, and
    at every validation (with its score). Listed first, so it sees what the soup callbacks see."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.initial: dict[str, torch.Tensor] = {}
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.validations: dict[tuple[int, int], tuple[float, dict[str, torch.Tensor]]] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.initial = f64(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step not in self.steps:
            self.steps[step] = f64(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs[trainer.current_epoch] = f64(pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            key = (trainer.current_epoch, trainer.global_step)
            self.validations[key] = (float(trainer.callback_metrics["val/loss"]), f64(pl_module))


def mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def assert_matches(path: Path, reference: dict[str, torch.Tensor], atol: float = 2e-6) -> dict[str, torch.Tensor]:
    got = load_file(str(path))
    assert set(got) == set(reference), "the file must carry every key of the module's state_dict()"
    for k, ref in reference.items():
        assert torch.allclose(got[k].double(), ref, rtol=1e-5, atol=atol), (path.name, k)
    return got


def fit(tmp_path: Path, model: Any, callbacks: list[Any], **overrides: Any) -> Any:
    kwargs = trainer_kwargs(tmp_path, **overrides)
    trainer = pl.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model)
    return trainer


def validate(tmp_path: Path, state: dict[str, torch.Tensor], **overrides: Any) -> float:
    torch.manual_seed(0)
    model = CausalLM(**overrides)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "validate", precision="bf16-mixed"))
    return trainer.validate(model, verbose=False)[0]["val/loss"]


# ------------------------------------------------------------------------------------------------ tied weights


@pytest.mark.slow
def test_tied_gpt2_with_every_callback_matches_float64_references(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CausalLM()
    assert model.model.lm_head.weight is model.model.transformer.wte.weight  # really tied
    recorder = Recorder()
    averaging = CheckpointAveraging(window=2, dirpath=str(tmp_path / "avg"), verbose=False)
    soup = GreedySoup(monitor="val/loss", mode="min", dirpath=str(tmp_path / "soup"), verbose=False)
    blend = TaskArithmeticBlend(anchor="initial", ratio=[0.5, 1.0], monitor="val/loss", mode="min",
                                dirpath=str(tmp_path / "blend"))
    fit(tmp_path, model, [recorder, averaging, soup, blend], max_epochs=3, precision="bf16-mixed",
        accumulate_grad_batches=2, val_check_interval=0.5)

    keys = {"model." + k for k in TIED}
    # CheckpointAveraging: the mean of the last two epochs, tied embedding included (once, not divided twice)
    avg = assert_matches(tmp_path / "avg" / "average.safetensors", mean([recorder.epochs[1], recorder.epochs[2]]))
    assert torch.equal(*(avg[k] for k in keys))

    # GreedySoup: the mean of the accepted ingredients
    recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    accepted = [recorder.validations[(i["epoch"], i["step"])][1] for i in recipe["ingredients"] if i["accepted"]]
    assert len(recipe["ingredients"]) == 6 and accepted
    soup_ref = mean(accepted)
    assert_matches(tmp_path / "soup" / "soup.safetensors", soup_ref)

    # TaskArithmeticBlend of the soup (listed last among producers) toward the initial weights: every ratio's
    # recorded score is what trainer.validate reports for the true blend, and the chosen blend is the file
    report = json.loads((tmp_path / "blend" / "blend.json").read_text())
    for candidate in report["candidates"]:
        r = candidate["ratio"]
        true_blend = {k: recorder.initial[k] + r * (soup_ref[k] - recorder.initial[k]) for k in soup_ref}
        assert candidate["score"] == pytest.approx(validate(tmp_path, true_blend), rel=2e-3, abs=1e-4)
        if r == report["ratio"]:
            blended = assert_matches(tmp_path / "blend" / "blended.safetensors", true_blend)
            assert torch.equal(*(blended[k] for k in keys))
    assert torch.allclose(model.model.lm_head.weight.double(), blended["model.lm_head.weight"].double())
    # the anchor file pairs with the full files (e.g. for the CLI's `blend --anchor`): both tied keys are in it
    assert_matches(tmp_path / "blend" / "anchor.safetensors", recorder.initial, atol=0)


@pytest.mark.slow
def test_tied_gpt2_online_soup_is_the_mean_of_its_members(tmp_path: Path) -> None:
    torch.manual_seed(1)
    recorder = Recorder()
    soup = GreedySoup(monitor="val/flat", online=True, dirpath=str(tmp_path / "soup"), verbose=False)
    fit(tmp_path, CausalLM(), [recorder, soup], max_epochs=2, val_check_interval=0.5)
    recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    members = [recorder.validations[(i["epoch"], i["step"])][1] for i in recipe["ingredients"] if i["accepted"]]
    assert len(members) == 4, recipe  # a real soup, not a single ingredient
    got = assert_matches(tmp_path / "soup" / "soup.safetensors", mean(members))
    assert torch.equal(got["model.lm_head.weight"], got["model.transformer.wte.weight"])


# ------------------------------------------------------------------------------------------------------- LoRA


def pairs_of(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    return [(k, k.replace("lora_A", "lora_B")) for k in state if ".lora_A." in k]


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def check_delta_w(got: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], tol: float = 1e-5) -> None:
    """Each pair's B'A' is the best rank-r approximation of the exact mean ΔW, and beats averaging factors."""
    for a_key, b_key in pairs_of(states[0]):
        exact = sum(s[b_key] @ s[a_key] for s in states) / len(states)
        written = got[b_key].double() @ got[a_key].double()
        assert (written - best_rank(exact, 4)).norm() <= tol * exact.norm(), a_key
        if len(states) > 1:
            factors = (sum(s[b_key] for s in states) / len(states)) @ (sum(s[a_key] for s in states) / len(states))
            assert (written - exact).norm() < (factors - exact).norm(), a_key


@pytest.mark.slow
def test_lora_run_snapshots_the_adapter_and_merges_on_delta_w(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CausalLM(lora=True, lr=3e-2)
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    recorder = Recorder(every_n_steps=2)
    averaging = CheckpointAveraging(window=3, every_n_train_steps=2, dirpath=str(tmp_path / "avg"), verbose=False)
    soup = GreedySoup(monitor="val/loss", mode="min", dirpath=str(tmp_path / "soup"), verbose=False)
    blend = TaskArithmeticBlend(anchor="initial", ratio=0.5, dirpath=str(tmp_path / "blend"))
    fit(tmp_path, model, [recorder, averaging, soup, blend], max_epochs=3, val_check_interval=0.5)

    # Snapshots, ingredients and the anchor hold the adapter, not the frozen base.
    stored = [*(tmp_path / "avg" / "snapshots").glob("*.safetensors"),
              *(tmp_path / "soup" / "ingredients").glob("*.safetensors"), tmp_path / "blend" / "anchor.safetensors"]
    assert len(stored) >= 5
    for path in stored:
        assert path.stat().st_size <= 2 * adapter_bytes < total_bytes / 5, path

    # Averaging: the best rank-4 pairs for the window's exact mean ΔW; the error is in the recipe.
    window = [recorder.steps[s] for s in sorted(recorder.steps)[-3:]]
    avg_path = tmp_path / "avg" / "average.safetensors"
    avg = load_file(str(avg_path))
    assert set(avg) == set(model.state_dict())  # the full state_dict: frozen base included
    check_delta_w(avg, window)
    with safe_open(str(avg_path), "pt") as f:
        recipe = json.loads(f.metadata()["lightning_soup"])
    assert 0 < recipe["lora_relative_error"] < 0.5

    # GreedySoup over separate checkpoints: on ΔW too.
    soup_recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    members = [recorder.validations[(i["epoch"], i["step"])][1] for i in soup_recipe["ingredients"] if i["accepted"]]
    souped = load_file(str(tmp_path / "soup" / "soup.safetensors"))
    check_delta_w(souped, members)
    assert ("lora_relative_error" in soup_recipe) == (len(members) > 1)

    # The blend toward the initial (fresh, B = 0) adapter is exact: B·0.5 with the soup's A.
    blended = load_file(str(tmp_path / "blend" / "blended.safetensors"))
    for a_key, b_key in pairs_of(members[0]):
        assert torch.equal(blended[a_key], souped[a_key])
        assert torch.equal(blended[b_key], 0.5 * souped[b_key])
    base_key = next(k for k in blended if k.endswith("c_attn.base_layer.weight"))
    assert torch.equal(blended[base_key], recorder.initial[base_key].float())  # the frozen base is untouched

    # Outputs load with the PeftModel's own load_state_dict (strict), and into the LightningModule.
    for path in (avg_path, tmp_path / "soup" / "soup.safetensors", tmp_path / "blend" / "blended.safetensors"):
        state = load_file(str(path))
        fresh = CausalLM(lora=True)
        fresh.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        fresh.load_state_dict(state)


@pytest.mark.slow
def test_lora_online_soup_is_on_delta_w(tmp_path: Path) -> None:
    torch.manual_seed(2)
    recorder = Recorder()
    soup = GreedySoup(monitor="val/flat", online=True, dirpath=str(tmp_path / "soup"), verbose=False)
    fit(tmp_path, CausalLM(lora=True, lr=3e-2), [recorder, soup], max_epochs=2, val_check_interval=0.5)
    recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    members = [recorder.validations[(i["epoch"], i["step"])][1] for i in recipe["ingredients"] if i["accepted"]]
    assert len(members) == 4 and recipe["lora_relative_error"] > 0
    check_delta_w(load_file(str(tmp_path / "soup" / "soup.safetensors")), members)


# ------------------------------------------------------------------------------------------------ torch.compile


class Compiled(pl.LightningModule):
    def __init__(self, compiled: bool = True) -> None:
        super().__init__()
        net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.net = torch.compile(net, backend="eager") if compiled else net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)),
                          batch_size=8)

    val_dataloader = train_dataloader


def test_compiled_module_files_load_into_the_plain_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Compiled()
    assert any("_orig_mod" in k for k in model.state_dict())
    callbacks = [CheckpointAveraging(window=2, verbose=False),
                 GreedySoup(monitor="val/loss", mode="min", verbose=False),
                 TaskArithmeticBlend(anchor="initial", ratio=0.5)]
    fit(tmp_path, model, callbacks, max_epochs=2)
    plain = Compiled(compiled=False)
    for name in ("average", "soup", "blended", "final", "anchor"):
        state = load_file(str(tmp_path / "soup" / f"{name}.safetensors"))
        assert not any("_orig_mod" in k for k in state), name
        plain.load_state_dict(state)  # the anchor holds what training changes: here (nothing frozen) everything
    # A file with `_orig_mod.` keys is read as an anchor by a plain module, and a plain file by a compiled one.
    compiled_keys = {k.replace("net.", "net._orig_mod.", 1): v for k, v in load_file(
        str(tmp_path / "soup" / "final.safetensors")).items()}
    from safetensors.torch import save_file

    save_file(compiled_keys, str(tmp_path / "compiled_anchor.safetensors"))
    for module, anchor in ((Compiled(compiled=False), tmp_path / "compiled_anchor.safetensors"),
                           (Compiled(), tmp_path / "soup" / "final.safetensors")):
        blend = TaskArithmeticBlend(anchor=str(anchor), ratio=0.0, dirpath=str(tmp_path / "again"))
        fit(tmp_path, module, [blend], max_epochs=1)
        expected = load_file(str(tmp_path / "soup" / "final.safetensors"))
        for k, v in load_file(str(tmp_path / "again" / "blended.safetensors")).items():
            if v.is_floating_point():
                assert torch.equal(v, expected[k]), k


# ------------------------------------------------------------------------------------------ trainable-only state


def test_frozen_parameters_are_not_kept_but_are_in_every_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Compiled(compiled=False)
    model.net[0].requires_grad_(False)
    frozen = model.net[0].weight.detach().clone()
    callbacks = [CheckpointAveraging(window=2, verbose=False),
                 GreedySoup(monitor="val/loss", mode="min", verbose=False),
                 TaskArithmeticBlend(anchor="initial", ratio=0.5)]
    fit(tmp_path, model, callbacks, max_epochs=2)
    kept = {"net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked",
            "net.3.weight", "net.3.bias"}
    internal = [*(tmp_path / "soup" / "snapshots").glob("*.safetensors"),
                *(tmp_path / "soup" / "ingredients").glob("*.safetensors"), tmp_path / "soup" / "anchor.safetensors"]
    assert len(internal) >= 4
    for path in internal:
        assert set(load_file(str(path))) == kept, path
    for name in ("average", "soup", "blended", "final"):
        state = load_file(str(tmp_path / "soup" / f"{name}.safetensors"))
        assert set(state) == set(model.state_dict()), name
        assert torch.equal(state["net.0.weight"], frozen), name


@pytest.mark.parametrize("case", ["frozen_layer", "compiled_files_with_orig_mod"])
def test_resume_ends_like_an_uninterrupted_run(tmp_path: Path, case: str) -> None:
    """Trainable-only state resumes (the snapshots, ingredients and anchor named by a checkpoint are enough), and
    so does state written with `_orig_mod.` keys (as older versions wrote it for compiled modules)."""

    def run(root: Path, max_epochs: int, ckpt_path: str | None = None) -> None:
        torch.manual_seed(0)
        model = Compiled(compiled=case != "frozen_layer")
        if case == "frozen_layer":
            model.net[0].requires_grad_(False)
        callbacks = [CheckpointAveraging(window=2, verbose=False),
                     GreedySoup(monitor="val/loss", mode="min", verbose=False),
                     TaskArithmeticBlend(anchor="initial", ratio=0.5),
                     pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1)]
        trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(root, max_epochs=max_epochs,
                                                                   enable_checkpointing=True))
        trainer.fit(model, ckpt_path=ckpt_path)

    run(tmp_path / "full", 3)
    run(tmp_path / "cut", 2)  # the "crash": stops after two epochs, with their checkpoints
    first = sorted((tmp_path / "cut" / "ckpt").glob("epoch=1*.ckpt"))[0]
    if case == "compiled_files_with_orig_mod":
        from safetensors.torch import save_file

        soup_dir = tmp_path / "cut" / "soup"
        state_files = [*soup_dir.glob("*/*.safetensors"), soup_dir / "anchor.safetensors"]
        assert len(state_files) >= 4
        for path in state_files:
            save_file({k.replace("net.", "net._orig_mod.", 1): v for k, v in load_file(str(path)).items()}, str(path))
    run(tmp_path / "cut", 3, ckpt_path=str(first))
    for name in ("average", "soup", "blended"):
        full = load_file(str(tmp_path / "full" / "soup" / f"{name}.safetensors"))
        resumed = load_file(str(tmp_path / "cut" / "soup" / f"{name}.safetensors"))
        assert set(full) == set(resumed)
        for k in full:
            assert torch.allclose(full[k].double(), resumed[k].double(), atol=1e-6), (name, k)


class WithBackbone(Compiled):
    """``backbone`` + ``head``, for Lightning's ``BackboneFinetuning`` (frozen at fit start, unfrozen later)."""

    def __init__(self) -> None:
        super().__init__(compiled=False)
        self.backbone, self.head = self.net[:3], self.net[3:]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


def test_parameters_unfrozen_during_fit_keep_their_trained_values_with_a_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = WithBackbone()
    callbacks = [pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0),
                 CheckpointAveraging(window=3, verbose=False),
                 GreedySoup(monitor="val/loss", mode="min", verbose=False),
                 TaskArithmeticBlend(anchor="initial", ratio=0.5)]
    with pytest.warns(UserWarning, match="became trainable after the soup callbacks started"):
        fit(tmp_path, model, callbacks, max_epochs=3)
    final = load_file(str(tmp_path / "soup" / "final.safetensors"))
    for name in ("average", "soup", "blended"):  # written, complete, and the unfrozen backbone as trained
        state = load_file(str(tmp_path / "soup" / f"{name}.safetensors"))
        assert set(state) == set(model.state_dict()), name
        assert torch.equal(state["net.0.weight"], final["net.0.weight"]), name
    assert not torch.equal(load_file(str(tmp_path / "soup" / "blended.safetensors"))["net.3.weight"],
                           final["net.3.weight"])  # the head, trainable throughout, is blended
