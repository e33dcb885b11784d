"""Every snippet and figure of README.md, exercised as a user copying it would.

* ```python blocks: each is classified in :data:`PYTHON_BLOCKS` (keyed by a stable substring) as
  ``run`` (executed in a temp directory, after a documented prelude that supplies what the README
  leaves to the user, e.g. ``model``; then a check of what the block claims) or ``compile`` (compiled,
  every import resolved). A new block fails :func:`test_every_block_is_classified` until classified.
* ```yaml blocks: loaded with ``yaml.safe_load``; the one recipe fragment (the ``ModelCheckpoint``
  entry) is pasted into every bundled recipe and parsed by ``tests/test_resume_last.py``, which is
  asserted here to read this very block.
* ```bash blocks: ``lowmem fit`` lines are parsed with ``parse_fit_config`` (their ``--key value``
  pairs checked in the parsed config; ``--model.help`` / ``--print_config`` run, they exit at once);
  ``lowmem estimate`` lines run for real (through ``main``, the console script's entry point; the
  shown output block in a real ``python -m lowmem_lightning.cli estimate`` process) and their shown
  output and commented figures are compared with what the command prints today. Other lines
  (installation, the test suite) are listed in :data:`OTHER_COMMANDS` and not run here.
* Figures: the optimizer table's bytes/param column equals ``state_memory()`` after one step on
  4 x 1024x1024 fp32 params (built by ``benchmarks/optim_step.py``'s own rows); its timing columns are
  not asserted, but every row and peer is a row of the benchmark and every timing column names the
  command that produced it in "How the table was measured". The 7B bytes/param table and the estimate
  output come from ``lowmem estimate``. The default run's final screen and losses: ``-m slow``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TEXT = README.read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
ENV = {"COLUMNS": "200", "PYTHONWARNINGS": "ignore"}


def blocks(lang: str) -> list[str]:
    """Bodies of the README's fenced blocks of language ``lang`` ("" for plain blocks), in order."""
    return [m.group(2) for m in BLOCK.finditer(TEXT) if m.group(1) == lang]


def section(title: str) -> str:
    """The README text from heading ``title`` to the next heading of the same or higher level."""
    level = len(title) - len(title.lstrip("#"))
    rest = TEXT.split(title + "\n", 1)[1]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ============================================================================== python blocks
FEW_STEPS_MODEL = '''
import torch
import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

class _FewSteps(BoringModel):
    """The user's LightningModule; stops after 3 steps (the README's Trainer has the default 1000 epochs)."""

    def training_step(self, batch, batch_idx):
        if self.global_step >= 2:
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

model = _FewSteps()
'''

TINY_LLAMA = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=128, max_position_embeddings=32)
LlamaForCausalLM(_config).to(torch.bfloat16).save_pretrained("tiny-llama")
'''

TRAIN_LORA = '''
_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
_ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
_before = {n: p.detach().clone() for n, p in model.named_parameters()}
model.train()
for _ in range(2):
    model(input_ids=_ids, labels=_ids).loss.backward()
    _opt.step()
    _opt.zero_grad()
_changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), _before[n])}
assert _changed and all("lora_A" in n or "lora_B" in n for n in _changed), sorted(_changed)
'''

LORA_MODULE = '''
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from lowmem_lightning import LowMemOptimizerCallback

class MyLoraModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        base = LlamaForCausalLM.from_pretrained("tiny-llama")
        self.model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def training_step(self, batch, batch_idx):
        if self.global_step >= 2:
            self.trainer.should_stop = True
        return self.model(input_ids=batch, labels=batch).loss

    def train_dataloader(self):
        return DataLoader(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)
'''

HF_TRAINER = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from lowmem_lightning.optim import optimizer_class

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32))
_ids = (torch.randint(0, 64, (16, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(16)) % 64
ds = [{"input_ids": row, "labels": row} for row in _ids]
args = TrainingArguments(output_dir="hf-out", max_steps=2, per_device_train_batch_size=8, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
'''


@dataclass(frozen=True)
class Snippet:
    """How one README python block is exercised: ``mode`` ``run`` or ``compile`` (``why``)."""

    mode: str
    why: str
    prelude: str = ""
    substitutions: dict[str, str] = field(default_factory=dict)
    check: str = ""


PYTHON_BLOCKS = {
    'build_optimizer("adamw_8bit"': Snippet(
        "run", "model: a Linear(64, 64); torch_adamw: a torch AdamW that took one step on it",
        prelude='import torch\nmodel = torch.nn.Linear(64, 64)\n'
                'torch_adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)\n'
                'model(torch.randn(4, 64)).square().mean().backward()\ntorch_adamw.step()\n',
        check='assert re.fullmatch(r"StateMemory\\(total_bytes=\\d+, device_bytes=\\d+, host_bytes=\\d+, '
              'num_params=\\d+\\)\\n", _stdout), _stdout\n'
              'from lowmem_lightning.optim import optimizer_class\n'
              'assert isinstance(opt, optimizer_class("adamw_8bit")) and len(opt.state) == 2\n'
              'assert any(t.dtype in (torch.uint8, torch.int8) for s in opt.state.values() for t in s.values()'
              ' if isinstance(t, torch.Tensor)), "the loaded fp32 moments were not quantized"\n'),
    'LowMemOptimizerCallback("adamw_8bit", lr=3e-4)': Snippet(
        "run", "model: a BoringModel with torch AdamW that stops after 3 steps", prelude=FEW_STEPS_MODEL,
        check='from lowmem_lightning.optim import optimizer_class\n'
              '(opt,) = trainer.optimizers\n'
              'assert isinstance(opt, optimizer_class("adamw_8bit")) and opt.param_groups[0]["lr"] == 3e-4\n'
              'assert trainer.global_step == 3\n'),
    "StateMemoryMonitor()": Snippet(
        "run", "L and model as in the block before; then fit to check the comment's torch AdamW figure",
        prelude=FEW_STEPS_MODEL,
        check='trainer.fit(model)\n'
              '(monitor,) = [c for c in trainer.callbacks if isinstance(c, StateMemoryMonitor)]\n'
              'n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))\n'
              'got = monitor.measure()["optim/state_bytes_per_param"]\n'
              'assert abs(got - (8 * n + 4 * tensors) / n) < 1e-9, got  # 8 B/param + 4 B/tensor\n'),
    'ModelCheckpoint(dirpath="ckpts", save_last=True)': Snippet(
        "run", "MyLoraModule: a peft LoRA on a tiny Llama saved as bf16 safetensors, its own AdamW, stops after 3 "
        "steps (the README's Trainer has the default 1000 epochs); then the checkpoint holds the adapters alone and "
        "the resumed and loaded modules are the trained one",
        prelude=TINY_LLAMA + LORA_MODULE, substitutions={"MyLoraModule(...)": "MyLoraModule()"},
        check='_ckpt = torch.load("ckpts/last.ckpt", weights_only=False)\n'
              '_state = model.state_dict()\n'
              'assert _ckpt["global_step"] == 4 and _ckpt["state_dict"], _ckpt["global_step"]\n'
              'assert all("lora_" in k for k in _ckpt["state_dict"]) and len(_state) > len(_ckpt["state_dict"])\n'
              'assert all(torch.equal(v, _state[k]) for k, v in _ckpt["state_dict"].items())\n'),
    "ModelParallelStrategy(data_parallel_size=2": Snippet(
        "compile", "FSDP2 needs 2 processes; tests/test_fsdp2.py runs this pattern with gloo"),
    "class MyModel(LowMemModule)": Snippet(
        "run", "runs as written (`...` placeholders are valid Python)",
        check='from lowmem_lightning import LowMemModule\n'
              'assert isinstance(model, LowMemModule) and model.hparams["width"] == 64\n'),
    'load_pretrained_causal_lm("/path/to/llama-2-7b-hf", quantize="nf4")': Snippet(
        "run", "/path/to/llama-2-7b-hf: a tiny Llama (LlamaConfig, 2 layers) saved as bf16 safetensors",
        prelude=TINY_LLAMA, substitutions={"/path/to/llama-2-7b-hf": "tiny-llama"},
        check='from peft import PeftModel\nassert isinstance(model, PeftModel)\n'
              'assert any(type(m).__name__ == "Linear4bit" for m in model.modules())\n'
              'trainable = [n for n, p in model.named_parameters() if p.requires_grad]\n'
              'assert trainable and all("lora_" in n for n in trainable), trainable\n'),
    "prepare_model_for_kbit_training(model)": Snippet(
        "run", "model: the tiny Llama loaded in NF4 (the previous block's first line); the `...` train line: "
        "2 AdamW steps that check only lora_A / lora_B change",
        prelude=TINY_LLAMA + 'from lowmem_lightning.quant import load_pretrained_causal_lm\n'
                             'model = load_pretrained_causal_lm("tiny-llama", quantize="nf4")\n',
        substitutions={"/path/to/llama-2-7b-hf": "tiny-llama", "\n...": "\n" + TRAIN_LORA},
        check='from peft.tuners.lora import LoraLayer\n'
              'assert not any(isinstance(m, LoraLayer) for m in merged.modules())\n'
              'linears = [m for n, m in merged.named_modules() if n.endswith(("_proj", "lm_head"))]\n'
              'assert linears and not any(getattr(m, "is_quantized", False) for m in linears)  # dense\n'
              'q = merged.model.layers[0].self_attn.q_proj\n'
              'assert q.weight.dtype == torch.bfloat16 and set(q.state_dict()) == {"weight"}, q\n'),
    "optimizer_cls_and_kwargs=(AdamW8bit": Snippet(
        "run", "model: a tiny Llama from a config; ds: 16 next-token sequences; args: 2 steps on the CPU; "
        "then both Trainers train",
        prelude=HF_TRAINER,
        check='assert isinstance(opt, optimizer_class("muon_8bit"))\n'
              'names = [n for g in opt.param_groups for n in g["param_names"]]\n'
              'assert "model.embed_tokens.weight" in names and "lm_head.weight" in names, names\n'
              'for _trainer in (Trainer(model=model, args=args, train_dataset=ds,\n'
              '                         optimizer_cls_and_kwargs=(AdamW8bit, {"lr": 3e-4})), trainer):\n'
              '    assert _trainer.train().global_step == 2\n'
              'assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") '
              'else trainer.optimizer, optimizer_class("muon_8bit"))\n'
              'from lowmem_lightning.optim.muon import uses_muon\n'
              'assert not uses_muon(model.model.embed_tokens.weight, "model.embed_tokens.weight")\n'),
    "optimizer_cls_and_kwargs=(PagedAdamW8bit": Snippet(
        "compile", "tests/test_field_trl.py runs these trainers on a tiny NF4 Llama (SFT resumed, DPO, GRPO)"),
    "fabric.clip_gradients(model, opt, max_norm=1.0, error_if_nonfinite=False)": Snippet(
        "run", "Fabric, build_optimizer: imported; model: an MLP with a 5120-element weight; loader: 4 batches; "
        "loss_fn: MSE; then every one of the 4 steps applied (no skip)",
        prelude='import torch\nfrom torch import nn\nfrom lightning.fabric import Fabric\n'
                'from lowmem_lightning.optim import build_optimizer\n'
                'torch.manual_seed(0)\nmodel = nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 8))\n'
                '_x = torch.randn(32, 64)\nloader = [(_x[i:i + 8], _x[i:i + 8, :8].sin()) for i in range(0, 32, 8)]\n'
                'loss_fn = nn.functional.mse_loss\n',
        check='from lowmem_lightning.optim import optimizer_class\n'
              'assert isinstance(opt.optimizer, optimizer_class("adamw_4bit"))\n'
              'assert all(float(s["step"]) == 4 for s in opt.optimizer.state.values())\n'
              'assert opt.skipped_updates == 0\n'),
}
"""Stable substring of each README python block -> how it is exercised."""


def _python_block(key: str) -> str:
    matches = [b for b in blocks("python") if key in b]
    assert len(matches) == 1, f"{key!r} matches {len(matches)} README python blocks, expected 1"
    return matches[0]


def _check_imports(tree: ast.AST) -> None:
    """Every ``import`` / ``from ... import`` of the block resolves."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README: `from {node.module} import {alias.name}` fails"


def test_every_block_is_classified():
    for body in blocks("python"):
        keys = [k for k in PYTHON_BLOCKS if k in body]
        assert len(keys) == 1, f"README python block matches {keys}; classify it in PYTHON_BLOCKS:\n{body}"
    for body in blocks("yaml"):
        assert sum(k in body for k in YAML_BLOCKS) == 1, f"classify this README yaml block in YAML_BLOCKS:\n{body}"
    for body in blocks(""):
        assert sum(k in body for k in PLAIN_BLOCKS) == 1, f"classify this README block in PLAIN_BLOCKS:\n{body}"
    for line in bash_lines():
        assert line.startswith("lowmem ") or line.startswith(OTHER_COMMANDS), f"unclassified README command: {line}"
    assert {m.group(1) for m in BLOCK.finditer(TEXT)} <= {"python", "yaml", "bash", ""}


@pytest.mark.parametrize("key", list(PYTHON_BLOCKS))
def test_python_block(key, tmp_path, monkeypatch):
    snippet, body = PYTHON_BLOCKS[key], _python_block(key)
    for old, new in snippet.substitutions.items():
        assert old in body, f"substitution {old!r} no longer in the block"
        body = body.replace(old, new)
    tree = ast.parse(body, filename="README.md")
    _check_imports(tree)
    if snippet.mode == "compile":
        compile(tree, "README.md", "exec")
        return
    assert snippet.mode == "run", snippet.mode
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"re": re}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; the shared CPU cores stay free
    try:
        exec(compile(snippet.prelude, "prelude", "exec"), namespace)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(tree, "README.md", "exec"), namespace)
        namespace["_stdout"] = out.getvalue()
        exec(compile(snippet.check, "check", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


# ============================================================================== yaml blocks
YAML_BLOCKS = {
    "lightning.pytorch.callbacks.ModelCheckpoint":
        "a trainer.callbacks entry: tests/test_resume_last.py pastes it into every bundled recipe and parses it",
}


def test_yaml_blocks_load_and_the_fragment_is_the_one_test_resume_last_pastes():
    from test_resume_last import readme_checkpoint_entry

    for body in blocks("yaml"):
        data = yaml.safe_load(body)
        assert data, body
    (entry,) = [b for b in blocks("yaml") if "ModelCheckpoint" in b]
    assert readme_checkpoint_entry() == entry
    (callback,) = yaml.safe_load(entry)
    assert callback["init_args"]["every_n_train_steps"] == 100 and callback["init_args"]["save_top_k"] == -1


# ============================================================================== bash blocks
OTHER_COMMANDS = ("python -m venv ", "python -m pytest")
"""Command lines of the README's bash blocks not run here: the installation and the test suite itself."""

MY_YAML = "my.yaml"
"""The user's own recipe in the README's commands; a copy of ``configs/tiny.yaml`` here."""


def bash_lines() -> list[str]:
    """Every command line of the README's bash blocks (comments kept)."""
    return [line.strip() for body in blocks("bash") for line in body.splitlines() if line.strip()]


def _args(line: str) -> list[str]:
    return shlex.split(line, comments=True)[2:]


def _callback_init(cfg) -> dict:
    (entry,) = [c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback")]
    return entry.init_args


def _same_path(parsed, given: str) -> bool:
    return str(parsed) == given or str(parsed).rstrip("/").endswith(given.rstrip("/"))


def _check_parsed(cfg, args: list[str]) -> None:
    """Every ``--key value`` of the command line is what the parsed config holds."""
    pairs = dict(zip(args[::2], args[1::2]))
    for key, value in pairs.items():
        if key == "--config":
            continue
        elif key == "--optim":
            assert _callback_init(cfg).optimizer == value
        elif key == "--lr":
            assert _callback_init(cfg).lr == float(value)
        elif key == "--ckpt_path":
            assert cfg.ckpt_path == value
        elif key.startswith(("--model.", "--data.")):
            group, name = key[2:].split(".", 1)
            assert _same_path(cfg[group].init_args[name], value), (key, cfg[group].init_args[name])
        else:
            raise AssertionError(f"README command option {key} is not checked by this test: add it")


FIT_LINES = [line for line in bash_lines() if line.startswith("lowmem fit")]


@pytest.mark.parametrize("line", FIT_LINES)
def test_lowmem_fit_line_parses(line, tmp_path, monkeypatch, capsys):
    from lowmem_lightning.cli import RECIPES_DIR, main, parse_fit_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / MY_YAML).write_text((RECIPES_DIR / "tiny.yaml").read_text())
    args = _args(line)
    if "--model.help" in args or "--print_config" in args:  # print and exit: nothing trains
        assert main(["fit", *args]) == 0
        out = capsys.readouterr().out
        assert ("model_name_or_path" in out) if "--model.help" in args else ("LowMemOptimizerCallback" in out), out
        return
    _check_parsed(parse_fit_config(args), args)
    assert [p.name for p in tmp_path.iterdir()] == [MY_YAML]  # parsing wrote nothing


_ESTIMATES: dict[tuple, str] = {}


def _estimate(args: list[str], process: bool = False) -> str:
    """What ``lowmem estimate ARGS`` prints: through ``main`` (the console script's entry point), cached,
    or with ``process`` a real ``python -m lowmem_lightning.cli`` process."""
    if process:
        proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "estimate", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout
    if tuple(args) not in _ESTIMATES:
        from lowmem_lightning.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["estimate", *args]) == 0, args
        _ESTIMATES[tuple(args)] = out.getvalue()
    return _ESTIMATES[tuple(args)]


def _row(table: str, name: str) -> list[str]:
    """Columns of the estimate table row of optimizer ``name`` (the recipe's own is marked ``*``)."""
    for line in table.splitlines():
        cols = re.split(r" {2,}", line.strip())
        if cols[0].rstrip(" *") == name:
            return cols
    raise AssertionError(f"no row {name!r} in:\n{table}")


ESTIMATE_LINES = [line for line in bash_lines() if line.startswith("lowmem estimate")]


@pytest.mark.parametrize("line", ESTIMATE_LINES)
def test_lowmem_estimate_line_runs_and_says_what_the_readme_says(line):
    optional = re.search(r"\[(.*?)\]", line)
    command = re.sub(r"\s*\[.*?\]", "", line)
    out = _estimate(_args(command))
    assert "device total" in out
    if optional:  # e.g. [--format json]
        assert json.loads(_estimate(_args(command) + shlex.split(optional.group(1))))["optimizers"]
    comment = line.split("#", 1)[1] if "#" in line else ""
    for name, recipes, gb in re.findall(r"(\w+)( \(the recipe's\))?: ([\d.]+) GB", comment):
        cols = _row(out, name)
        assert cols[0].endswith("*") == bool(recipes), (line, cols[0])  # the recipe's own row is marked *
        assert cols[4].endswith(" GB") and f"{float(cols[4].split()[0]):.1f}" == gb, (line, cols[4])  # device total


def test_qlora_estimate_figures_quoted_in_the_cli_section_are_what_it_prints():
    """The CLI section's QLoRA figures (activations, the recipe's total, CAME int8 B/param) are today's output."""
    text = re.sub(r"\s+", " ", section("## The CLI"))
    acts, total, came = re.search(r"`lowmem estimate --config qlora_7b.yaml` shows ([\d.]+) GB of activations .*? "
                                  r"a ([\d.]+) GB total .*?`came_int8` ([\d.]+) B/param", text).groups()
    out = _estimate(["--config", "qlora_7b.yaml"])
    assert re.search(rf"^activations +{re.escape(acts)} GB", out, re.M), out
    assert re.search(rf"^  total +{re.escape(total)} GB", out, re.M), out
    assert _row(out, "paged_adamw_8bit")[0].endswith("*") and _row(out, "paged_adamw_8bit")[4] == f"{total} GB"
    assert _row(out, "came_int8")[2] == came


PLAIN_BLOCKS = {
    "$ lowmem estimate": "the command runs and prints exactly the block",
    "`Trainer.fit` stopped": "the default run's final screen: test_default_run_final_screen (-m slow)",
}


def test_estimate_output_block_is_what_the_command_prints():
    (body,) = [b for b in blocks("") if b.startswith("$ lowmem estimate")]
    command, *shown = body.rstrip("\n").splitlines()
    printed = _estimate(shlex.split(command)[3:], process=True).rstrip("\n").splitlines()
    assert [s.rstrip() for s in shown] == [p.rstrip() for p in printed], "\n".join(printed)


# ============================================================================== the 7B full fine-tune table
SEVEN_B_ROWS = {
    "fp32 weights, fp32 AdamW (mixed-precision style)": ("float32", "adamw", False),
    "fp32 weights, 8-bit AdamW": ("float32", "adamw_8bit", False),
    "bf16 weights (stochastic rounding), 8-bit AdamW": ("bfloat16", "adamw_8bit", False),
    "bf16 weights, 8-bit AdamW, `step_in_backward`": ("bfloat16", "adamw_8bit", True),
    "bf16 weights, 4-bit AdamW, `step_in_backward`": ("bfloat16", "adamw_4bit", True),
    "bf16 weights, CAME 8-bit momentum, `step_in_backward`": ("bfloat16", "came_int8", True),
}
"""Setup column -> (weights dtype, estimate row, gradient release) of ``lowmem estimate --config
full_finetune_7b.yaml``."""


def _table_rows(text: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return rows[2:]  # after the header and its --- line


def test_7b_full_finetune_table_is_lowmem_estimate():
    text = section("## Full fine-tune of a 7B on one 24 GB GPU: gradient release")
    rows = _table_rows(re.search(r"(^\|.*\n)+", text, re.M).group(0))  # the section's first table
    assert [r[0] for r in rows] == list(SEVEN_B_ROWS)
    estimates = {}
    for dtype in ("float32", "bfloat16"):
        estimates[dtype] = json.loads(_estimate(["--config", "full_finetune_7b.yaml", "--format", "json",
                                                 "--model.torch_dtype", dtype]))
    for setup, bpp, total in rows:
        dtype, name, release = SEVEN_B_ROWS[setup]
        data = estimates[dtype]
        assert data["step_in_backward"]  # the recipe releases: the released total is the device total
        est = data["optimizers"][name]
        nbytes = est["total_device_bytes"] - data["activation_bytes"]  # the table leaves activations out
        nbytes = nbytes if release else nbytes - data["gradient_device_bytes"] + data["gradient_bytes"]
        assert (f"{nbytes / data['params']:.1f}", f"{nbytes / 1e9:.1f} GB") == (bpp, total), setup


# ============================================================================== the optimizer table
OPTIMIZER_ROWS = {
    "`adamw` (torch, fp32)": "torch_adamw_foreach",
    "`adamw_8bit`": "adamw_8bit",
    "`adamw_4bit`": "adamw_4bit",
    "`paged_adamw_8bit`": "paged_adamw_8bit",
    "`adafactor`": "adafactor",
    "`adafactor`, `beta1=0.9`": "adafactor_beta1",
    '`adafactor`, `beta1=0.9, momentum_dtype="int8"`': "adafactor_beta1_int8",
    "`came`": "came",
    '`came`, `momentum_dtype="int8"`': "came_int8",
    "`sgd`, momentum 0.9": "sgd",
    '`sgd`, `momentum_dtype="int8"`': "sgd_int8",
    "`lion`": "lion",
    "`lion_8bit`": "lion_8bit",
    "`ademamix`": "ademamix",
    "`ademamix_8bit`": "ademamix_8bit",
    "`muon` (hybrid: 8-bit AdamW on embeddings, head, norms, biases)": "muon",
    "`muon_8bit` (hybrid)": "muon_8bit",
}
"""README row -> the ``benchmarks/optim_step.py`` row that measures it."""

PEERS = {
    "torch fused": "torch_adamw_fused",
    "bitsandbytes AdamW8bit": "bnb_adamw_8bit",
    "torchao AdamW8bit": "torchao_adamw_8bit",
    "torchao AdamW4bit": "torchao_adamw_4bit",
    "bitsandbytes PagedAdamW8bit": "bnb_paged_adamw_8bit",
    "transformers Adafactor": "hf_adafactor",
    "transformers Adafactor (beta1)": "hf_adafactor_beta1",
    "official CAME": "came_pytorch",
    "torch SGD (foreach)": "torch_sgd_foreach",
    "torch Muon": "torch_muon",
    "bitsandbytes Lion8bit": "bnb_lion_8bit",
    "bitsandbytes AdEMAMix8bit": "bnb_ademamix_8bit",
}
"""Peer named in the "peer on the same run" column -> its ``benchmarks/optim_step.py`` row."""

COLUMN_COMMANDS = {
    "CPU step": "benchmarks/optim_step.py",
    "peer on the same run": "benchmarks/optim_step.py",
    "H200 step": "benchmarks/gpu_check.py",
    "convergence": "benchmarks/convergence.py",
}
"""Measured column of the optimizer table (by a substring of its header) -> the script named under it."""


def _optimizer_table() -> tuple[list[str], list[list[str]], str]:
    text = section("## Optimizers")
    table = "\n".join(line for line in text.splitlines() if line.startswith("|"))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    return header, _table_rows(table), section("### How the table was measured")


@pytest.fixture(scope="module")
def optim_step():
    return _load_benchmark("optim_step")


def test_optimizer_table_rows_and_peers_are_benchmark_rows_and_columns_name_their_command(optim_step):
    header, rows, measured = _optimizer_table()
    bench_rows = {r.name for r in optim_step.ROWS}
    assert [r[0] for r in rows] == list(OPTIMIZER_ROWS)
    assert set(OPTIMIZER_ROWS.values()) | set(PEERS.values()) <= bench_rows
    for row in rows:
        peers = row[3].replace(":", "").replace(" in that run", "")
        for peer in re.findall(r"([A-Za-z][\w ()]*?) \d+\.\d+", peers):
            assert peer.strip() in PEERS, f"README peer {peer!r} is not a benchmarks/optim_step.py row"
    commands = re.findall(r"`((?:\w+=\S+ )?python (benchmarks/\w+\.py)[^`]*)`", measured.replace("\n", " "))
    named = {script for _, script in commands}
    for column in header[2:]:
        (script,) = [s for k, s in COLUMN_COMMANDS.items() if k in column] or [None]
        assert script in named, f"optimizer table column {column!r}: no command in \"How the table was measured\""
    for command, script in commands:
        source = (REPO / script).read_text()
        for flag in re.findall(r"(--[\w-]+)", command):
            assert re.search(rf"add_argument\(\s*\"{flag}\"", source), f"{script} has no {flag} ({command})"
    cpu = next(c for c, s in commands if s == "benchmarks/optim_step.py")
    args = optim_step.parse_args(shlex.split(cpu.replace("LOWMEM_CPU_COMPILE=1 ", ""))[2:])
    assert (args.device, optim_step.matrix_shapes(optim_step.parse_size(args.sizes), args.matrices)) == (
        "cpu", [(1024, 1024)] * 4)  # the "4 x 1024x1024 fp32 matrices" of the bytes/param column


def _measured_bytes_per_param(optim_step, row_name: str) -> float:
    from lowmem_lightning.optim import state_memory

    (row,) = [r for r in optim_step.ROWS if r.name == row_name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, 1024, generator=gen)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(1024, 1024, generator=gen)
    optimizer = row.build(params)
    optimizer.step()
    return state_memory(optimizer).bytes_per_param


def test_optimizer_table_bytes_per_param_is_state_memory(optim_step):
    _, rows, _ = _optimizer_table()
    measured = {}
    for row in rows:
        shown = row[1].split()[0]
        measured[row[0]] = _measured_bytes_per_param(optim_step, OPTIMIZER_ROWS[row[0]])
        assert f"{measured[row[0]]:.3f}" == shown, (row[0], measured[row[0]])
    # the QLoRA section quotes the CAME 8-bit momentum row
    quoted = re.search(r"CAME with 8-bit momentum is ([\d.]+) bytes/param on 1024x1024", TEXT).group(1)
    came_int8 = measured[next(k for k, v in OPTIMIZER_ROWS.items() if v == "came_int8")]
    assert quoted == f"{came_int8:.3f}"


# ============================================================================== the default run (slow)
@pytest.mark.slow
def test_default_run_final_screen(tmp_path):
    """``lowmem fit --config configs/tiny.yaml`` (300 steps, ~25 s alone): the final screen's summary,
    its losses, and what the README says it writes."""
    import csv

    # as a user runs it: not under the test suite's one thread, eager CPU path and Triton interpreter (conftest),
    # which round the fp32 math otherwise and move the losses' third decimal
    user_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "LOWMEM_CPU_COMPILE", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "configs/tiny.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**user_env, **ENV})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    (screen,) = [b for b in blocks("") if "`Trainer.fit` stopped" in b]
    lines = screen.splitlines()
    assert lines[0] in out
    summary = lines[lines.index(next(x for x in lines if x.startswith("LowMemOptimizerCallback"))):]
    for line in summary:
        assert line in out.splitlines(), (line, out[-2000:])
    run = tmp_path / "runs/tiny/version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train = [r for r in rows if r.get("train_loss")]
    val = [r for r in rows if r.get("val_loss")]
    assert len(train) == 300 and all(r["optim/state_MiB"] and r["optim/state_bytes_per_param"]
                                     and r["optim/skipped_updates"] for r in train)
    assert all(r["val_ppl"] for r in val)
    pattern = r"loss ([\d.]+) · state ([\d.]+) MiB · val_loss ([\d.]+) \(step (\d+)\)"
    readme_loss, readme_state, readme_val_loss, _ = re.fullmatch(pattern, lines[2]).groups()
    loss, state, val_loss, step = re.search(pattern, out).groups()  # the run's own screen line
    assert (f"{float(train[-1]['train_loss']):.3f}", f"{float(val[-1]['val_loss']):.3f}", state, step) == (
        loss, val_loss, readme_state, "300")
    # the losses' last decimals depend on the CPU's float arithmetic (README: an AMD EPYC ends at 2.456 / 2.447)
    assert abs(float(loss) - float(readme_loss)) <= 0.03 and abs(float(val_loss) - float(readme_val_loss)) <= 0.03
    first, last = re.search(r"train loss ([\d.]+) -> ([\d.]+)", TEXT).groups()
    assert f"{float(train[0]['train_loss']):.2f}" == first
    assert abs(float(train[-1]["train_loss"]) - float(last)) <= 0.03, (train[-1]["train_loss"], last)
    assert [p.name for p in (run / "checkpoints").glob("*.ckpt")] == ["epoch=1-step=300.ckpt"]  # the newest kept
    assert (run / "state_memory.png").is_file()
