"""Hugging Face model folders in, a model folder out that ``from_pretrained`` loads and that generates.

The models are tiny GPT-2s built from a transformers config (tied input/output embeddings, as GPT-2 ships), with a
word-level tokenizer built here; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_soup.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 48


def _config(**overrides: object) -> object:
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, **overrides)


def _tokenizer() -> object:
    words = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base`` (with tokenizer and generation config) and two fine-tunes of it, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(_config())
    base.generation_config.max_new_tokens = 3  # a marker that must reach the output
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i in range(2):
        model = transformers.GPT2LMHeadModel(_config())
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(root / f"ft{i}")  # weights and config only: no tokenizer
        out[f"ft{i}"] = root / f"ft{i}"
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _reference(folders: dict[str, Path], scales: list[float]) -> dict[str, torch.Tensor]:
    """base + Σ λᵢ (ftᵢ − base) in float64, from the files save_pretrained wrote."""
    base = {k: v.double() for k, v in _weights(folders["base"]).items()}
    fts = [_weights(folders[f"ft{i}"]) for i in range(2)]
    return {k: b + sum(s * (ft[k].double() - b) for s, ft in zip(scales, fts)) for k, b in base.items()}


def _check_loads_and_generates(out: Path, ref: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    state = model.state_dict()
    for k, v in ref.items():
        assert state[k].dtype == dtype, k
        torch.testing.assert_close(state[k].double(), v, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)
    # tied weights: the output head is the (merged) input embedding, as in the inputs
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    generated = model.generate(ids, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, 3 + 3)  # the base's generation_config (max_new_tokens=3) came along
    assert torch.equal(generated[0, :3], ids[0])


def test_task_arithmetic_of_model_folders_is_a_model_folder(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    argv = ["task-arithmetic", "--base", str(folders["base"]), str(folders["ft0"]), str(folders["ft1"]),
            "--scales", "0.5", "0.25", "-o", str(out), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text()) == json.loads((folders["base"] / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "lightning_soup.merge.task_arithmetic" in card and "lightning-soup task-arithmetic --base" in card
    assert str(folders["ft1"]) in card
    _check_loads_and_generates(out, _reference(folders, [0.5, 0.25]))


def test_sharded_model_folder_and_dtype(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sharded"
    argv = ["average", str(folders["ft0"]), str(folders["ft1"]), "-o", str(out), "--shard-size", "20kB",
            "--dtype", "bfloat16", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    # no input has a tokenizer: none is invented; the config says the weights are bfloat16
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fts = [_weights(folders[f"ft{i}"]) for i in range(2)]
    ref = {k: (fts[0][k].double() + fts[1][k].double()) / 2 for k in fts[0]}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    for k, v in ref.items():
        assert model.state_dict()[k].dtype == torch.bfloat16
        # the float32 mean rounded to bfloat16: within one bfloat16 ulp of the exact mean
        torch.testing.assert_close(model.state_dict()[k].double(), v, rtol=2**-8 + 2**-20, atol=1e-30)


def test_config_from_and_mixed_inputs(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the anchor is a plain .safetensors file: config and tokenizer come from --config-from
    anchor = tmp_path / "anchor.safetensors"
    anchor.write_bytes((folders["base"] / "model.safetensors").read_bytes())
    out = tmp_path / "blend"
    argv = ["blend", "--anchor", str(anchor), "--model", str(folders["ft0"]), "--ratio", "0.3", "-o", str(out),
            "--config-from", str(folders["base"] / "config.json"), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "tokenizer.json").is_file()
    base, ft = _weights(folders["base"]), _weights(folders["ft0"])
    _check_loads_and_generates(out, {k: base[k].double() + 0.3 * (ft[k].double() - base[k].double()) for k in base})
    # without --config-from the first model folder among the inputs gives the config (here the fine-tune's)
    out2 = tmp_path / "blend2"
    argv2 = ["blend", "--anchor", str(anchor), "--model", str(folders["ft0"]), "--ratio", "0.3", "-o", str(out2), "-q"]
    assert main(argv2) == 0, capsys.readouterr().err
    assert (out2 / "config.json").read_text() == (folders["ft0"] / "config.json").read_text()
    assert not (out2 / "tokenizer.json").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out2) is not None


def test_overwrite_rules_and_failures_leave_nothing(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soup"
    argv = ["average", str(folders["ft0"]), str(folders["ft1"]), "-o", str(out), "-q"]
    assert main(argv) == 0
    first = (out / "model.safetensors").read_bytes()
    assert main(argv) == 1 and "already exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--weights", "3", "1"]) == 0  # replaces the earlier model folder
    assert (out / "model.safetensors").read_bytes() != first and (out / "README.md").is_file()
    # a folder with the user's own files is never replaced
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--force"]) == 1 and "refusing to replace it" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    # a refused merge (unrelated inputs) leaves no folder and no temporary behind
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(_config()).save_pretrained(tmp_path / "other")
    before = sorted(p.name for p in tmp_path.iterdir())
    bad = ["average", str(folders["ft0"]), str(tmp_path / "other"), "-o", str(tmp_path / "bad"), "-q"]
    assert main(bad) == 1 and "does not share a base" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_plain_inputs_still_need_a_safetensors_output(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a.safetensors"
    a.write_bytes((folders["ft0"] / "model.safetensors").read_bytes())
    b = tmp_path / "b.safetensors"
    b.write_bytes((folders["ft1"] / "model.safetensors").read_bytes())
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "out")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    # a .safetensors output from model folders is the single file asked for
    x = tmp_path / "x.safetensors"
    assert main(["average", str(folders["ft0"]), str(folders["ft1"]), "-o", str(x), "-q"]) == 0
    assert (tmp_path / "x.safetensors").is_file()
    assert main(["average", str(a), str(b), "-o", str(tmp_path / "y.safetensors"), "--config-from",
                 str(folders["base"])]) == 2


# ------------------------------------------------------------------------------------------------ PEFT adapters

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two separate LoRA runs (r=4, alpha=8, different seeds) on the base, saved as PEFT adapter folders."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i in range(2):
        torch.manual_seed(100 + i)
        model = transformers.GPT2LMHeadModel.from_pretrained(folders["base"])
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        model = peft.get_peft_model(model, config)
        with torch.no_grad():  # a trained adapter: B away from its zero init
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(root / f"ad{i}")
        out[f"ad{i}"] = root / f"ad{i}"
    return out


def _delta_w(sd: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    """scaling · B @ A in float64, transposed to the Conv1D weight's in×out layout (fan_in_fan_out)."""
    a = sd[f"base_model.model.{module}.lora_A.weight"].double()
    b = sd[f"base_model.model.{module}.lora_B.weight"].double()
    return (scaling * b @ a).T


def _modules(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in sd if ".lora_A." in k]


def test_average_of_adapters_is_an_adapter_folder_with_its_rank_r_error(
    folders: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_soup.storage import read_recipe

    out = tmp_path / "avg"
    assert main(["average", str(adapters["ad0"]), str(adapters["ad1"]), "-o", str(out), "-q"]) == 0
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    ins = [load_file(adapters[f"ad{i}"] / "adapter_model.safetensors") for i in range(2)]
    got = load_file(out / "adapter_model.safetensors")
    err2 = norm2 = 0.0
    for module in _modules(ins[0]):
        exact = (_delta_w(ins[0], module, 2.0) + _delta_w(ins[1], module, 2.0)) / 2
        # the best rank-4 approximation of the exact mean ΔW (Eckart–Young), computed here independently
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        mine = _delta_w(got, module, 2.0)
        torch.testing.assert_close(mine, best, rtol=0, atol=1e-5 * float(exact.abs().max()))
        # averaging the factors instead is further from the exact mean
        factors = {k: (ins[0][k].double() + ins[1][k].double()) / 2 for k in ins[0]}
        assert float((_delta_w(factors, module, 2.0) - exact).norm()) > float((mine - exact).norm())
        err2 += float((mine - exact).norm() ** 2)
        norm2 += float(exact.norm() ** 2)
    recipe = read_recipe(out / "adapter_model.safetensors")
    assert recipe["function"] == "lightning_soup.merge.lora_weighted_average"
    assert recipe["lora"]["lora_relative_error"] == pytest.approx((err2 / norm2) ** 0.5, rel=1e-4)
    # it loads into the PEFT model, and that model's merged weights are base + ΔW of the output
    base = transformers.GPT2LMHeadModel.from_pretrained(folders["base"])
    model = peft.PeftModel.from_pretrained(base, out)
    merged = model.merge_and_unload().state_dict()
    w0 = _weights(folders["base"])
    for module in _modules(got):
        ref = w0[f"{module}.weight"].double() + _delta_w(got, module, 2.0)
        torch.testing.assert_close(merged[f"{module}.weight"].double(), ref, rtol=0, atol=1e-5)


def test_merge_into_gives_the_exact_dense_model_folder(
    folders: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dense"
    argv = ["average", str(adapters["ad0"]), str(adapters["ad1"]), "--merge-into", str(folders["base"]),
            "-o", str(out), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    ins = [load_file(adapters[f"ad{i}"] / "adapter_model.safetensors") for i in range(2)]
    w0 = {k: v.double() for k, v in _weights(folders["base"]).items()}
    ref = dict(w0)
    for module in _modules(ins[0]):
        key = f"{module}.weight"
        ref[key] = w0[key] + (_delta_w(ins[0], module, 2.0) + _delta_w(ins[1], module, 2.0)) / 2
    _check_loads_and_generates(out, ref)  # config and tokenizer came from BASE


def test_adapters_refuse_what_factors_cannot_do(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ties", "--base", str(adapters["ad0"]), str(adapters["ad1"]), "--density", "0.5", "-o", str(tmp_path / "t")]
    assert main(argv) == 1
    assert "--merge-into BASE" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
