"""Special tokens a base checkpoint embeds but never trained: a Llama-3-like base whose chat markers
(``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``) and reserved tokens have zero rows in ``embed_tokens``
and ``lm_head``, and a Qwen2-like tied model padded past its tokenizer (320 rows for 300 ids) where ChatML tokens a user
adds land in zero padding rows. With ``resize_embeddings=True`` the rows of the markers the data uses start at the mean
of the trained rows and train (LoRA / QLoRA through peft's ``trainable_token_indices``, full fine-tune directly), the
ids are recorded for ``load_from_checkpoint`` / resume / export, and the adapter loads on the unchanged base; without
it, under LoRA, one warning names them and the option. Tiny checkpoints and local tokenizers; nothing is downloaded."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from chat_recipes import chat_recipe, run_lowmem
from lowmem_calls import lowmem_in_process, stderr_as_in_a_process
from test_data_chat import CHAT, CHATML
from tiny_tokenizers import bpe_tokenizer

from lowmem_lightning.cli.resume import model_differences
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lowmem_lightning.modules.untrained_tokens import untrained_token_ids

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
BASE_VOCAB = 300
MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
RESERVED = [f"<|reserved_special_token_{i}|>" for i in range(6)]
LLAMA_ROWS = BASE_VOCAB + len(MARKERS) + len(RESERVED)  # the markers and reserved tokens are in the checkpoint
QWEN_ROWS = 320  # padded past the base tokenizer's 300 ids, as Qwen2's 151936 rows for ~151665 ids
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
USED = {"llama": [300, 301, 302], "qwen": [300, 301]}  # the markers the chat data holds (no reserved token)


def _base_tokenizer():
    return bpe_tokenizer(None, ["<|endoftext|>"], "<|endoftext|>",
                         "Hello there! Be brief. What is 2+2? It is 4. system user assistant", vocab_size=BASE_VOCAB)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """``llama3tok/`` (base + markers + reserved tokens, Llama-3-style template) with ``llama/`` (untied, 309 rows,
    rows 300+ zero in both layers); ``chatmltok/`` (base + ChatML tokens added by the user) with ``qwen/`` (tied, 320
    rows, rows 300+ zero padding); ``chat.jsonl``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("untrained")
    tok = _base_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": MARKERS + RESERVED})
    tok.chat_template = LLAMA3
    tok.save_pretrained(root / "llama3tok")
    tok = _base_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    tok.chat_template = CHATML
    tok.save_pretrained(root / "chatmltok")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=LLAMA_ROWS))
    qwen = Qwen2ForCausalLM(Qwen2Config(**TINY, vocab_size=QWEN_ROWS, tie_word_embeddings=True))
    with torch.no_grad():
        for model in (llama, qwen):
            model.get_input_embeddings().weight[BASE_VOCAB:] = 0
            model.get_output_embeddings().weight[BASE_VOCAB:] = 0
    llama.save_pretrained(root / "llama")
    qwen.save_pretrained(root / "qwen")
    records = [{"messages": [*CHAT[:3], {"role": "user", "content": f"{i} + 2?"},
                             {"role": "assistant", "content": f"It is {i + 2}."}]} for i in range(24)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


TOKENIZER = {"llama": "llama3tok", "qwen": "chatmltok"}


class _Infos(logging.Handler):
    """The messages of Lightning's ``rank_zero_info`` (its ``rank_zero`` logger) while attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fit(module: CausalLMModule, files: Path, name: str, steps: int = 3) -> tuple[list[str], list[str]]:
    """Train ``module`` ``steps`` steps on the chat data with ``name``'s tokenizer; the LowMemWarnings' texts and the
    informational lines (``rank_zero_info``)."""
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    data = TextDataModule(str(files / "chat.jsonl"), tokenizer=str(files / TOKENIZER[name]), seq_len=32,
                          batch_size=4, val_fraction=0.0)
    infos, logger = _Infos(), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(infos)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, data)
    finally:
        logger.removeHandler(infos)
    return [str(w.message) for w in caught if issubclass(w.category, LowMemWarning)], infos.messages


def _checkpoint_rows(files: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = load_file(files / name / "model.safetensors")
    return {"embed": weights["model.embed_tokens.weight"], "head": weights.get("lm_head.weight")}


def _ids(name: str) -> torch.Tensor:
    """Token ids with the markers among ordinary ones."""
    return torch.tensor([[300, 5, 17, 301, 40, *USED[name][-1:], 9, 3]])


@torch.no_grad()
def _logits(model, name: str) -> torch.Tensor:
    return model.eval()(input_ids=_ids(name)).logits


@pytest.mark.parametrize(("name", "quantize"), [("llama", None), ("qwen", "nf4")])
def test_lora_with_the_option_trains_the_used_untrained_rows_and_the_adapter_loads_on_the_base(files, tmp_path, name,
                                                                                              quantize):
    """LoRA on the Llama-3-like base, QLoRA on the padded Qwen2: the markers the data uses (not the reserved tokens it
    never holds) are recorded in the hyperparameters, their rows started at the mean of the trained rows and moved
    (embedding, and Llama's own head), every other row is the checkpoint's; the adapter holds no copy of the layers
    and loads with ``PeftModel.from_pretrained`` on the unchanged base with the module's logits exactly."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.quant import load_pretrained_causal_lm

    module = CausalLMModule(model_name_or_path=str(files / name), quantize=quantize, lora={"r": 4},
                            resize_embeddings=True, save_dir=str(tmp_path / "adapter"), optimizer="adamw", lr=1e-2)
    warned, said = _fit(module, files, name)
    used = USED[name]
    assert module.hparams.untrained_token_ids == used
    assert sum("had untrained rows" in text for text in said) == 1, said  # an informational line, not a warning
    assert not [text for text in warned if "untrained" in text], warned
    saved = _checkpoint_rows(files, name)
    layers = {"embed": module.model.get_input_embeddings()}
    if saved["head"] is not None:
        layers["head"] = module.model.get_output_embeddings()
    for key, layer in layers.items():
        rows = layer.token_adapter.get_merged_weights(["default"]).detach()
        start = layer.token_adapter.trainable_tokens_original["default"]
        keep = torch.ones(rows.shape[0], dtype=torch.bool)
        keep[used] = False
        assert torch.equal(rows[keep], saved[key][keep]), key
        torch.testing.assert_close(start, saved[key][:BASE_VOCAB].mean(0).expand(len(used), -1))
        assert (rows[used] - start).abs().amin(dim=1).gt(0).all(), key  # every used marker's row trained

    assert not any("embed_tokens.weight" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    if quantize:
        base = load_pretrained_causal_lm(str(files / name), quantize="nf4", skip=("lm_head",),
                                         torch_dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(files / name, local_files_only=True)
    assert torch.equal(_logits(PeftModel.from_pretrained(base, tmp_path / "adapter"), name),
                       _logits(module.model, name))


def test_lora_without_the_option_warns_once_and_changes_nothing(files):
    """LoRA without ``resize_embeddings``: one warning names the three markers, says they stay frozen and gives the
    option; after training their rows are still the checkpoint's zeros and nothing is recorded."""
    module = CausalLMModule(model_name_or_path=str(files / "llama"), lora={"r": 4}, optimizer="adamw", lr=1e-2)
    said = [text for text in _fit(module, files, "llama")[0] if "untrained" in text]
    assert len(said) == 1, said
    assert "3 token(s)" in said[0] and all(repr(marker) in said[0] for marker in MARKERS)
    assert "stay frozen" in said[0] and "--model.resize_embeddings true" in said[0]
    assert "reserved" not in said[0]
    assert module.hparams.untrained_token_ids is None
    merged = module.model.merge_and_unload()
    assert merged.model.embed_tokens.weight[BASE_VOCAB:].eq(0).all()
    assert merged.lm_head.weight[BASE_VOCAB:].eq(0).all()


def test_full_finetune_mean_initializes_with_the_option_and_does_not_warn_without(files):
    """Full fine-tune of the tied Qwen2: with the option the used ChatML rows start at the mean of the trained rows
    (the padding rows the data never holds stay zero); without it there is no warning (every row trains)."""
    model = build_causal_lm(str(files / "qwen"), vocab_size=BASE_VOCAB + 2, resize_embeddings=True,
                            token_ids={300: "<|im_start|>", 301: "<|im_end|>", 7: "a trained token"})
    assert model.untrained_token_ids == [300, 301]
    weight, saved = model.model.embed_tokens.weight.detach(), _checkpoint_rows(files, "qwen")["embed"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(weight[300:302], saved[:BASE_VOCAB].mean(0).expand(2, -1))
    assert torch.equal(weight[:300], saved[:300]) and weight[302:].eq(0).all()

    module = CausalLMModule(model_name_or_path=str(files / "qwen"), optimizer="adamw", lr=1e-2)
    assert not [text for said in _fit(module, files, "qwen", steps=1) for text in said if "untrained" in text]


def test_rule_flags_near_zero_rows_only():
    """The rule on a tiny model: a zero row and a 1e-20 row are untrained; a row at a tenth of the typical norm, and a
    row with every entry negative (which ``amax(row) <= eps`` would call untrained), are not; ids outside the rows are
    ignored; an untied head's zero row flags its token too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=64))
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[1] = 0
        embed[2] = 1e-20
        embed[3] *= 0.1
        embed[4] = -embed[4].abs()
        model.lm_head.weight[5] = 0
    assert untrained_token_ids(model, [1, 2, 3, 4, 5, 6, 64, 1000]) == [1, 2, 5]


def test_resume_takes_the_recorded_ids_as_what_none_resolves_to():
    """A run's ``untrained_token_ids=None`` matches a checkpoint's recorded list (as ``resize_embeddings=True`` matches
    its row count); a list given by the run that differs is a difference."""
    saved = {"resize_embeddings": 309, "untrained_token_ids": [300, 301, 302]}
    assert model_differences(saved, {"resize_embeddings": True, "untrained_token_ids": None}) == []
    assert model_differences(saved, {"resize_embeddings": True, "untrained_token_ids": [300]}) == [
        ("untrained_token_ids", [300, 301, 302], [300])]


@pytest.mark.parametrize(("value", "resize", "why"), [
    ([-1], True, "expected None"), ("300", True, "expected None"), ([True], True, "expected None"),
    ([300], False, "with resize_embeddings=False: those rows train only with resize_embeddings=True")])
def test_bad_untrained_token_ids_are_named(value, resize, why):
    with pytest.raises(ValueError, match=re.escape(f"Invalid untrained_token_ids={value!r}") + f".*{re.escape(why)}"):
        CausalLMModule(config=TINY, resize_embeddings=resize, untrained_token_ids=value)


def test_lowmem_fit_refuses_ids_without_the_option_in_one_line(capsys, tmp_path, monkeypatch):
    """``lowmem fit --model.untrained_token_ids '[5]'`` without ``resize_embeddings``: exit 2, one error line naming
    both arguments and the fix, nothing written."""
    from lowmem_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(["fit", "--config", "tiny", "--model.untrained_token_ids", "[5]"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == ["lowmem fit: error: Invalid untrained_token_ids=[5] with resize_embeddings=False: those rows "
                      "train only with resize_embeddings=True (--model.resize_embeddings true)."]
    assert list(tmp_path.iterdir()) == []


def _recipe(files: Path, name: str, model: dict, steps: int) -> Path:
    """``files/name``: the tiny recipe on the chat data and the Llama-3-like tokenizer with ``model`` init args,
    checkpoints every 2 steps into ``ckpts-NAME/``."""
    return chat_recipe(files, name, {"model_name_or_path": str(files / "llama"), **model}, steps, "llama3tok")


_lowmem = run_lowmem


QLORA = {"quantize": "nf4", "lora": {"r": 4}, "resize_embeddings": True}


@pytest.fixture(scope="module")
def qlora_runs() -> dict:
    """The folders :func:`qlora_run` trained in (once per module)."""
    return {}


@pytest.fixture
def qlora_run(files, qlora_runs, capsys) -> Path:
    """``qlora.yaml`` (NF4 Llama-3-like base + LoRA, resize_embeddings) trained 4 steps by ``lowmem fit``, once per
    module; adapter in ``qlora-adapter/``, checkpoints at steps 2 and 4 in ``ckpts-qlora/``. The run makes the files
    the tests read, so it calls lowmem's entry point in this process, its stderr as a process's
    (:func:`lowmem_calls.stderr_as_in_a_process`: the note below is checked there); real ``lowmem fit`` processes:
    :func:`test_lowmem_fit_without_the_option_warns_once` and the -m slow resume."""
    if files not in qlora_runs:
        _recipe(files, "qlora.yaml", {"save_dir": "qlora-adapter", **QLORA}, steps=4)
        with pytest.MonkeyPatch.context() as patch:
            stderr_as_in_a_process(patch)
            proc = lowmem_in_process(capsys, patch, files, "fit", "--config", "qlora.yaml", columns="200")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("3 token(s) the data uses had untrained rows") == 1, proc.stderr[-3000:]
        notes = [line for line in proc.stderr.splitlines() if "had untrained rows" in line]
        assert notes[0].startswith("resize_embeddings: 3 token(s)"), notes  # information, not 'lowmem: warning:'
        qlora_runs[files] = proc
    return files


def test_lowmem_fit_records_the_ids_and_load_from_checkpoint_rebuilds_them(qlora_run):
    """``lowmem fit`` (QLoRA): the checkpoint records the three markers; ``load_from_checkpoint`` (no data module)
    rebuilds their trainable rows with the trained values: its logits are those of the adapter ``save_dir`` got,
    loaded on the unchanged NF4 base."""
    from peft import PeftModel

    from lowmem_lightning.quant import load_pretrained_causal_lm

    files = qlora_run
    module = CausalLMModule.load_from_checkpoint(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu")
    assert module.hparams.untrained_token_ids == USED["llama"]
    base = load_pretrained_causal_lm(str(files / "llama"), quantize="nf4", skip=("lm_head",),
                                     torch_dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, files / "qlora-adapter")
    assert torch.equal(_logits(adapter, "llama"), _logits(module.model, "llama"))
    embed = module.model.get_input_embeddings().token_adapter
    assert embed.trainable_tokens_delta["default"].abs().amin(dim=1).gt(0).all()


def test_lowmem_fit_logs_the_hparams_its_checkpoint_records(qlora_run):
    """The run's ``hparams.yaml`` (Lightning's logger) holds what the build resolved, as the checkpoint does: the
    marker ids as ``untrained_token_ids`` (the list to copy into a recipe for ``lowmem estimate``) and the row count
    ``resize_embeddings: true`` grew to, not the recipe's ``null`` and ``true``."""
    files = qlora_run
    logged = [yaml.safe_load(path.read_text()) for path in (files / "runs").glob("*/version_*/hparams.yaml")]
    logged = [hparams for hparams in logged if hparams.get("save_dir") == "qlora-adapter"]
    saved = torch.load(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu", weights_only=False)
    assert len(logged) == 1
    assert (logged[0]["untrained_token_ids"], logged[0]["resize_embeddings"]) == (USED["llama"], LLAMA_ROWS)
    recorded = {key: value for key, value in saved["hyper_parameters"].items() if key != "_class_path"}
    assert {key: logged[0][key] for key in recorded} == recorded


def test_lowmem_fit_without_the_option_warns_once(files):
    """``lowmem fit`` of a LoRA recipe without ``resize_embeddings``: the warning naming the markers and the option is
    printed once."""
    _recipe(files, "plain.yaml", {"lora": {"r": 4}}, steps=2)
    proc = _lowmem(files, "fit", "--config", "plain.yaml")
    assert proc.stderr.count("have untrained (zero or near-zero) rows") == 1, proc.stderr[-3000:]
    assert "'<|eot_id|>' (302)" in proc.stderr and "--model.resize_embeddings true" in proc.stderr


def test_estimate_counts_recorded_ids_as_the_built_model_has_them(files, capsys):
    """``lowmem estimate`` of a QLoRA recipe with the ids a fit recorded (``untrained_token_ids``): its trainable count
    is the built model's exactly, ``2 x 3 x 64`` more than with none recorded (embedding and head rows of the three
    markers)."""
    from lowmem_lightning.cli import main

    built = build_causal_lm(str(files / "llama"), quantize="nf4", lora={"r": 4}, vocab_size=LLAMA_ROWS,
                            resize_embeddings=True, token_ids=USED["llama"])
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    counts = []
    for ids in (USED["llama"], None):
        recipe = _recipe(files, f"estimate-{ids is None}.yaml", {**QLORA, "untrained_token_ids": ids}, steps=2)
        assert main(["estimate", "--config", str(recipe), "--format", "json"]) == 0
        counts.append(json.loads(capsys.readouterr().out)["trainable_params"])
    assert counts == [trainable, trainable - 2 * len(USED["llama"]) * TINY["hidden_size"]]


@pytest.mark.slow
def test_lowmem_fit_resumes_bit_equal_and_exports_a_merged_model(qlora_run):
    """``lowmem fit --ckpt_path`` from the step-2 checkpoint (the run's ``untrained_token_ids`` unset, resolved from
    the data again) reaches the straight run's step-4 weights bit for bit; ``lowmem export --save_merged true`` writes a
    model whose marker rows are the trained ones, loaded by ``from_pretrained`` with the module's logits."""
    from transformers import AutoModelForCausalLM

    files = qlora_run
    resumed = _recipe(files, "resumed.yaml", QLORA, steps=4)
    _lowmem(files, "fit", "--config", resumed.name, "--ckpt_path", str(files / "ckpts-qlora" / "step=2.ckpt"))
    straight = torch.load(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu", weights_only=False)
    again = torch.load(files / "ckpts-resumed" / "step=4.ckpt", map_location="cpu", weights_only=False)
    assert again["hyper_parameters"]["untrained_token_ids"] == USED["llama"]
    assert straight["state_dict"].keys() == again["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key

    _lowmem(files, "export", "--config", "qlora.yaml", "--ckpt_path", str(files / "ckpts-qlora" / "step=4.ckpt"),
            "--save_dir", "merged", "--save_merged", "true")
    merged = AutoModelForCausalLM.from_pretrained(files / "merged", local_files_only=True)
    assert merged.model.embed_tokens.weight[USED["llama"]].abs().amax(dim=1).gt(0).all()
    module = CausalLMModule.load_from_checkpoint(files / "ckpts-qlora" / "step=4.ckpt", map_location="cpu")
    torch.testing.assert_close(_logits(merged, "llama"), _logits(module.model, "llama"), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ ids past the checkpoint's own tokenizer
@pytest.fixture(scope="module")
def padded(files) -> Path:
    """``qwen-padded/``: a tied Qwen2 of 320 rows whose padding rows 300+ keep their random initialization (norms like
    the trained rows'), shipped with its own 300-id tokenizer; ``qwen-padded-notok/``: the same weights, no tokenizer.
    The user's ``chatmltok/`` adds ``<|im_start|>`` / ``<|im_end|>`` at ids 300 and 301, past the checkpoint's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, vocab_size=QWEN_ROWS, tie_word_embeddings=True))
    model.save_pretrained(files / "qwen-padded-notok")
    model.save_pretrained(files / "qwen-padded")
    _base_tokenizer().save_pretrained(files / "qwen-padded")
    return files


def _trained_mean(files: Path, name: str) -> torch.Tensor:
    """The mean of the checkpoint's first ``BASE_VOCAB`` embedding rows (the rows its tokenizer's ids select)."""
    return _checkpoint_rows(files, name)["embed"][:BASE_VOCAB].mean(0)


def test_ids_past_the_checkpoint_tokenizer_train_with_the_option_whatever_their_norm(padded):
    """LoRA on the padded Qwen2 whose padding rows are random, not zero: the ChatML tokens the user added at ids 300
    and 301, past the checkpoint tokenizer's 300 ids, are untrained although their norms are ordinary; with the option
    they are recorded, start at the mean of the rows the checkpoint's tokenizer selects and train."""
    module = CausalLMModule(model_name_or_path=str(padded / "qwen-padded"), lora={"r": 4}, resize_embeddings=True,
                            optimizer="adamw", lr=1e-2)
    said = _fit(module, padded, "qwen", steps=2)[1]
    assert module.hparams.untrained_token_ids == USED["qwen"]
    assert sum("2 token(s) the data uses had untrained rows" in text for text in said) == 1, said
    layer = module.model.get_input_embeddings().token_adapter
    start = layer.trainable_tokens_original["default"]
    torch.testing.assert_close(start, _trained_mean(padded, "qwen-padded").expand(2, -1))
    assert layer.trainable_tokens_delta["default"].abs().amin(dim=1).gt(0).all()


def test_ids_past_the_checkpoint_tokenizer_are_named_without_the_option(padded):
    """The same LoRA fit without the option: one warning names both ChatML tokens and says why (past the 300 ids of
    the checkpoint's own tokenizer); nothing is recorded."""
    module = CausalLMModule(model_name_or_path=str(padded / "qwen-padded"), lora={"r": 4}, optimizer="adamw")
    said = [text for text in _fit(module, padded, "qwen", steps=1)[0] if "untrained" in text]
    assert len(said) == 1, said
    assert "2 token(s) the data uses have untrained (zero or near-zero, or past the 300 ids of its own tokenizer)" \
        in said[0] and "'<|im_start|>' (300), '<|im_end|>' (301)" in said[0]
    assert module.hparams.untrained_token_ids is None


def test_a_checkpoint_without_a_readable_tokenizer_keeps_the_norm_rule_alone(padded, tmp_path):
    """The same random padding rows with no tokenizer in the checkpoint folder: nothing says they were never trained,
    so they are not flagged. With a ``tokenizer.json`` that cannot be parsed, the same, and a warning says why."""
    model = build_causal_lm(str(padded / "qwen-padded-notok"), vocab_size=BASE_VOCAB + 2, resize_embeddings=True,
                            token_ids=USED["qwen"])
    assert model.untrained_token_ids == []
    broken = shutil.copytree(padded / "qwen-padded-notok", tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{")
    with pytest.warns(LowMemWarning, match=r"tokenizer\.json cannot be read .*judged by their norms alone"):
        model = build_causal_lm(str(broken), resize_embeddings=True, token_ids=USED["qwen"])
    assert model.untrained_token_ids == []


def test_a_hub_snapshot_brings_the_checkpoint_tokenizer_with_the_weights(padded, tmp_path, monkeypatch):
    """``model_name_or_path`` a Hub repo id: the weights' download (a stand-in ``snapshot_download`` that copies only
    the files its ``allow_patterns`` select, as the Hub does) brings the checkpoint's ``tokenizer.json``, so ids past it
    are flagged as from a local folder."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub import constants

    def snapshot_download(repo_id, revision=None, allow_patterns=(), **kwargs):
        folder = tmp_path / "snapshots" / ("3" * 40)
        folder.mkdir(parents=True, exist_ok=True)
        for source in (padded / "qwen-padded").iterdir():
            if any(fnmatch.fnmatch(source.name, pattern) for pattern in allow_patterns):
                shutil.copy(source, folder / source.name)
        return str(folder)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = build_causal_lm("tiny-org/padded-qwen", vocab_size=BASE_VOCAB + 2, resize_embeddings=True,
                            token_ids=USED["qwen"])
    assert model.untrained_token_ids == USED["qwen"]
    assert not (tmp_path / "snapshots" / ("3" * 40) / "tokenizer_config.json").exists()  # the length's file only


def test_grown_rows_start_at_the_mean_of_the_trained_rows(files, padded):
    """``resize_embeddings`` grows rows at the mean of the trained rows, as untrained rows start: on the Llama-3-like
    base (rows 300+ zero in both untied layers) each layer's grown rows are the mean of its first 300 rows, not of all
    309; on the padded Qwen2 the random rows past the checkpoint tokenizer are left out of the mean too."""
    llama = build_causal_lm(str(files / "llama"), vocab_size=LLAMA_ROWS + 2, resize_embeddings=True)
    saved = _checkpoint_rows(files, "llama")
    for key, layer in (("embed", llama.get_input_embeddings()), ("head", llama.get_output_embeddings())):
        torch.testing.assert_close(layer.weight[LLAMA_ROWS:].detach(), saved[key][:BASE_VOCAB].mean(0).expand(2, -1))
    qwen = build_causal_lm(str(padded / "qwen-padded"), vocab_size=QWEN_ROWS + 1, resize_embeddings=True)
    torch.testing.assert_close(qwen.get_input_embeddings().weight[QWEN_ROWS:].detach(),
                               _trained_mean(padded, "qwen-padded").expand(1, -1))


def test_estimate_says_when_its_trainable_count_leaves_untrained_rows_out(files, capsys):
    """``lowmem estimate`` of a LoRA recipe with ``resize_embeddings`` and no ``untrained_token_ids``: one note says
    the trainable count leaves out the untrained rows the data uses (2 x 64 params each on the untied base), where a
    fit records their ids and how to count them, within 80 columns; none once the recipe lists them, nor for a full
    fine-tune (every row is trainable already)."""
    from lowmem_lightning.cli import main

    note = "trainable params: + 128 per untrained checkpoint row the data uses"
    for name, model, shown in (("unlisted", QLORA, True), ("listed", {**QLORA, "untrained_token_ids": [300]}, False),
                               ("full", {"resize_embeddings": True}, False)):
        recipe = _recipe(files, f"estimate-note-{name}.yaml", model, steps=2)
        assert main(["estimate", "--config", str(recipe)]) == 0
        table = capsys.readouterr().out
        assert (note in " ".join(table.split())) == shown, (name, table[-600:])
        where = ("records their ids as untrained_token_ids in the run's hparams.yaml and in its checkpoints' "
                 "hyper_parameters: copy that list into --model.untrained_token_ids to count them)")
        assert (where in " ".join(table.split())) == shown, table[-600:]
        assert all(len(line) <= 80 for line in table.splitlines()), max(table.splitlines(), key=len)


def test_estimate_counts_trained_rows_apart_from_the_base_model(files, capsys):
    """``lowmem estimate`` of a QLoRA recipe listing the three markers: ``params (base model)`` is the base's count,
    the same as without the list (it counted peft's trained rows in it), and the rows get a line of their own
    (``2 x 3 x 64``: embedding and head rows), which with the LoRA adapters makes the trainable count."""
    from lowmem_lightning.cli import main

    tables = {}
    for ids in (USED["llama"], None):
        recipe = _recipe(files, f"estimate-rows-{ids is None}.yaml", {**QLORA, "untrained_token_ids": ids}, steps=2)
        assert main(["estimate", "--config", str(recipe)]) == 0
        tables[ids is None] = {line[:23].strip(): line[23:].strip() for line in capsys.readouterr().out.splitlines()}
    listed, unlisted = tables[False], tables[True]
    assert listed["params (base model)"] == unlisted["params (base model)"]
    rows = 2 * len(USED["llama"]) * TINY["hidden_size"]
    assert listed["trained token rows"] == f"{rows:,}" and "trained token rows" not in unlisted
    number = {key: int(value.replace(",", "")) for key, value in listed.items() if value.replace(",", "").isdigit()}
    assert number["trainable params"] == number["adapter params (LoRA)"] + rows


@pytest.mark.slow
def test_export_and_test_of_a_checkpoint_do_not_say_the_rows_start_at_the_mean(qlora_run):
    """``lowmem export`` and ``lowmem test --ckpt_path`` of the QLoRA run's checkpoint build the model again, which
    sets the markers' rows to the mean of the trained rows before the checkpoint's trained rows replace them: the
    fit's note on that (and on training them) is not repeated there, where it is untrue."""
    files = qlora_run
    note = "had untrained rows in the checkpoint"
    recipe = ("--config", "qlora.yaml", "--ckpt_path", "ckpts-qlora/step=4.ckpt")
    export = _lowmem(files, "export", *recipe, "--save_dir", "export-quiet")
    test = _lowmem(files, "test", *recipe, "--trainer.limit_test_batches", "1")
    assert (files / "export-quiet" / "adapter_model.safetensors").is_file()
    assert "test_loss" in test.stdout
    assert note not in export.stderr and note not in test.stderr, export.stderr + test.stderr


@pytest.mark.slow
def test_a_ddp_spawn_resume_does_not_say_the_rows_start_at_the_mean(qlora_run):
    """``lowmem fit --ckpt_path`` under ``ddp_spawn``: the rank that builds the model is a new process, which the
    command's own settings do not reach; the module tells its build (``rows_from_checkpoint``) that the rows are the
    checkpoint's, so the fit's note that they were set to the mean is not repeated there. About 10 s."""
    files = qlora_run
    recipe = _recipe(files, "spawned.yaml", QLORA, steps=3)
    proc = _lowmem(files, "fit", "--config", recipe.name, "--ckpt_path", "ckpts-qlora/step=2.ckpt",
                   "--trainer.strategy", "ddp_spawn", "--trainer.devices", "1", "--trainer.accelerator", "cpu")
    assert "Restored all states from the checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "had untrained rows in the checkpoint" not in proc.stderr, proc.stderr[-3000:]
