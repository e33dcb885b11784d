"""DoRA on NF4 weights (QDoRA): ``add_lora(..., use_dora=True)`` and the recipes' ``lora: {use_dora: true}``. It must
train as peft's own DoRA trains on the same weights held dense (forward with and without dropout, gradients), save an
adapter peft loads, merge losslessly, and resume a ``lowmem fit`` bit for bit."""

import copy
import json
import shutil
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
import yaml
from lowmem_calls import lowmem_in_process
from test_field_architectures import _tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_lightning.quant import Linear4bit, add_lora, dequantize_model, load_lora, quantize_model

VOCAB = 128
TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def _nf4_and_twin(dense):
    """Our 4-bit model and a dense model holding exactly the weights it decodes to."""
    nf4 = quantize_model(copy.deepcopy(dense))
    return nf4, dequantize_model(copy.deepcopy(nf4))


def _qdora_and_peft_dora(dense, dropout=0.1):
    """``add_lora(use_dora=True)`` on the 4-bit model, peft's DoRA on its dense twin, both with the same random
    adapters and magnitudes (not the initial ones, which leave the model unchanged)."""
    nf4, twin = _nf4_and_twin(dense)
    ours = add_lora(nf4, r=4, alpha=8, dropout=dropout, target_modules=TARGETS, use_dora=True)
    theirs = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                                       use_dora=True, task_type="CAUSAL_LM"))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peers = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(peers)
    magnitudes = [n for n in mine if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 2 * len(TARGETS)
    for name in magnitudes:  # both start at ||W||_row of the same decoded weights
        assert torch.equal(mine[name], peers[name])
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in sorted(mine):
            noise = torch.randn(mine[name].shape, generator=generator) * 0.05
            value = peers[name] * (1 + noise) if name in magnitudes else noise
            mine[name].copy_(value)
            peers[name].copy_(value)
    return ours, theirs


def _ids(rows=2):
    return torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(1))


def test_qdora_computes_and_differentiates_as_peft_dora_on_the_same_weights_dense(dense_llama):
    ours, theirs = _qdora_and_peft_dora(dense_llama)
    ids = _ids()
    assert torch.equal(ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)
    ours.train(), theirs.train()
    torch.manual_seed(7)
    mine = ours(input_ids=ids, labels=ids)
    torch.manual_seed(7)
    peer = theirs(input_ids=ids, labels=ids)
    assert torch.equal(mine.logits, peer.logits)  # dropout on: the base runs again on the dropped input
    mine.loss.backward()
    peer.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name]), name


def test_a_qdora_adapter_is_peft_dora_on_disk_and_merges_losslessly(dense_llama, tmp_path):
    ours, theirs = _qdora_and_peft_dora(dense_llama)
    ids = _ids()
    adapted = ours.eval()(input_ids=ids).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    read = lambda d: safetensors.torch.load_file(str(d / "adapter_model.safetensors"))  # noqa: E731
    assert sorted(read(tmp_path / "ours")) == sorted(read(tmp_path / "theirs"))
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["use_dora"] is True
    nf4, twin = _nf4_and_twin(dense_llama)
    on_dense = peft.PeftModel.from_pretrained(twin, tmp_path / "ours").eval()  # peft alone, a dense base
    assert torch.equal(on_dense(input_ids=ids).logits, adapted)
    reloaded = load_lora(nf4, tmp_path / "ours").eval()
    assert torch.equal(reloaded(input_ids=ids).logits, adapted)
    layer = reloaded.base_model.model.model.layers[0].self_attn.q_proj
    codes = layer.base_layer.qweight.clone()
    reloaded.merge_adapter()
    assert not isinstance(layer.base_layer, Linear4bit)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
    reloaded.unmerge_adapter()
    assert torch.equal(layer.base_layer.qweight, codes) and torch.equal(reloaded(input_ids=ids).logits, adapted)
    merged, merged_dense = ours.merge_and_unload(), theirs.eval().merge_and_unload()
    assert torch.equal(merged(input_ids=ids).logits, merged_dense(input_ids=ids).logits)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)


def test_other_variants_are_still_refused_and_use_dora_is_checked(dense_llama):
    nf4 = quantize_model(copy.deepcopy(dense_llama))
    with pytest.raises(ValueError, match=r"Invalid use_dora='yes': expected True or False"):
        add_lora(nf4, use_dora="yes")
    config = peft.LoraConfig(target_modules=["q_proj"], use_dora=True, alora_invocation_tokens=[1, 2],
                             task_type="CAUSAL_LM")
    from lowmem_lightning.quant import register_peft_custom_module

    with pytest.raises(ValueError, match=r"Invalid alora_invocation_tokens=.*only plain LoRA and DoRA"):
        peft.get_peft_model(nf4, register_peft_custom_module(config))


def _recipe(tmp_path: Path, **lora) -> Path:
    """The QLoRA recipe on a tiny Llama checkpoint in ``tmp_path``, DoRA on, a checkpoint every 2 steps."""
    model = tmp_path / "model"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(model)
    _tokenizer(model)
    recipe = yaml.safe_load((CONFIGS / "qlora_7b.yaml").read_text())
    recipe["model"]["init_args"]["lora"].update(lora)
    checkpoint = next(c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    checkpoint["init_args"].update(every_n_train_steps=2, save_top_k=-1)
    (tmp_path / "qdora.yaml").write_text(yaml.safe_dump(recipe))
    return model


RUN = ["--trainer.accumulate_grad_batches", "1", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches",
       "1", "--data.init_args.seq_len", "32", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false"]


def test_lowmem_fit_with_use_dora_trains_saves_peft_dora_and_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    """The recipe with ``lora: {use_dora: true}``: four steps in one run, and two then two more resumed from the
    step-2 checkpoint in another folder, end with the same adapters, magnitudes and optimizer state."""
    model = _recipe(tmp_path / "a", use_dora=True)
    (tmp_path / "b").mkdir()
    shutil.copytree(model, tmp_path / "b/model")
    shutil.copy(tmp_path / "a/qdora.yaml", tmp_path / "b/qdora.yaml")
    fit = ["fit", "--config", "qdora.yaml", "--model.model_name_or_path", "model", *RUN]
    whole = lowmem_in_process(capsys, monkeypatch, tmp_path / "a", *fit, "--trainer.max_steps", "4")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert json.loads((tmp_path / "a/runs/qlora_7b/adapter/adapter_config.json").read_text())["use_dora"] is True
    first = lowmem_in_process(capsys, monkeypatch, tmp_path / "b", *fit, "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = lowmem_in_process(capsys, monkeypatch, tmp_path / "b", *fit, "--trainer.max_steps", "4",
                                "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    a = load(tmp_path / "a/runs/qlora_7b/version_0/checkpoints/step=4.ckpt")
    b = load(tmp_path / "b/runs/qlora_7b/version_1/checkpoints/step=4.ckpt")
    assert any("lora_magnitude_vector" in key for key in a["state_dict"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


def test_lowmem_estimate_counts_dora_activations_and_a_bad_use_dora_is_refused(tmp_path, capsys, monkeypatch):
    _recipe(tmp_path, use_dora=True)
    estimate = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qdora.yaml",
                                 "--model.model_name_or_path", "model", "--data.init_args.seq_len", "32",
                                 columns="200")
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    assert "DoRA r=16 on 7 projections, dropout 0.05, NF4 base" in estimate.stdout
    assert "adapter params (LoRA)  33,792" in estimate.stdout  # 7 projections x 2 layers: A, B and magnitudes
    bad = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "qdora.yaml",
                            "--model.model_name_or_path", "model", "--model.init_args.lora",
                            "{r: 16, use_dora: maybe}")
    assert bad.returncode == 2
    assert "Invalid lora['use_dora']='maybe': expected true or false" in bad.stderr
    assert not (tmp_path / "runs").exists()


def test_the_row_norm_under_bf16_autocast_is_the_fp32_one_a_merge_uses(dense_llama):
    """Under autocast ``B @ A`` would run in bf16, so a bf16-mixed forward would divide by another norm than the merge
    (and the magnitude's start) uses."""
    ours, _ = _qdora_and_peft_dora(dense_llama)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    plain = layer._dora_row_norm("default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer._dora_row_norm("default"), plain)
        ours(input_ids=_ids())  # and the forward runs under it


def test_eval_mode_keeps_the_row_norm_until_a_weight_it_reads_changes(dense_llama):
    """Generation and validation run in eval mode: the row norm is computed once, not per forward (16 generated
    tokens and an eval forward took 2.57x plain LoRA's time before, 1.04x after: ``benchmarks/qdora_step.py --eval``),
    and computed again as soon as an adapter or the base changes in place, is replaced, or the layer goes back to
    train mode."""
    ours, theirs = _qdora_and_peft_dora(dense_llama)
    ours.eval(), theirs.eval()
    ids = _ids()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    decode = layer._base_weight
    layer._base_weight = lambda: calls.append(1) or decode()
    first = ours(input_ids=ids).logits
    assert torch.equal(ours(input_ids=ids).logits, first) and len(calls) == 1  # kept
    mine = dict(ours.named_parameters())
    peers = dict(theirs.named_parameters())
    b_name = next(n for n in mine if n.endswith("layers.0.self_attn.q_proj.lora_B.default.weight"))
    a_name = b_name.replace("lora_B", "lora_A")
    changes = [lambda p: p.add_(0.01),  # an optimizer step without train()
               lambda p: p.copy_(p * 1.5),  # load_state_dict
               lambda p: setattr(p, "data", p.data * 0.5)]  # a new tensor
    for change in changes:
        for name in (b_name, a_name):
            with torch.no_grad():
                change(mine[name])
                change(peers[name])
            assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits), name
    count = len(calls)
    ours.train()
    ours.eval()
    ours(input_ids=ids)
    assert len(calls) == count + 1


def test_a_norm_kept_under_inference_mode_is_not_used_by_autograd_in_eval_mode(dense_llama):
    """Validation runs under ``torch.inference_mode``; a backward through the eval-mode model afterwards (input
    attributions, a user's own loop) must not meet the inference tensor kept then."""
    ours, _ = _qdora_and_peft_dora(dense_llama)
    ours.eval()
    ids = _ids()
    with torch.inference_mode():
        ours(input_ids=ids)
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if "lora_magnitude_vector" in n)


@pytest.mark.gpu
def test_qdora_on_cuda_computes_as_on_the_cpu(dense_llama):
    """On CUDA the row norm decodes through the Triton NF4 kernel: the same logits and magnitude gradients as on
    the CPU (fp32, to float tolerance), and a kept eval-mode norm there too."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ours, _ = _qdora_and_peft_dora(dense_llama, dropout=0.0)
    on_gpu = copy.deepcopy(ours).cuda()
    ids = _ids()
    for model, device in ((ours, "cpu"), (on_gpu, "cuda")):
        model.train()
        model(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
    torch.testing.assert_close(on_gpu.eval()(input_ids=ids.cuda()).logits.cpu(), ours.eval()(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)
    grads = {n: p.grad for n, p in ours.named_parameters() if "lora_magnitude_vector" in n}
    for name, param in on_gpu.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad.cpu(), grads[name], rtol=1e-3, atol=1e-5)
    layer = on_gpu.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._dora_norms  # kept by the eval forward
