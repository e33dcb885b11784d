"""Arguments with a fixed set of values are typed ``Literal``: ``lowmem fit --model.help CausalLMModule`` lists the
choices, and a wrong value is refused by the parser naming the argument, the value and the choices."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import torch
from launched_scripts import launch_env

from lowmem_lightning.cli import main
from lowmem_lightning.kernels.rounding import BF16_ROUNDINGS
from lowmem_lightning.modules.base import SCHEDULERS, LowMemModule
from lowmem_lightning.modules.causal_lm import DTYPES, QUANTIZE_CHOICES, CausalLMModule, build_causal_lm
from lowmem_lightning.optim.layout import MOMENTUM_DTYPES
from lowmem_lightning.optim.registry import OPTIMIZERS, optimizer_class

CHOICES = {"quantize": ("nf4",), "torch_dtype": tuple(DTYPES), "scheduler": ("cosine",)}
"""Each closed argument of the default model and what the constructor's own check accepts (besides None)."""


@pytest.mark.parametrize("function", [CausalLMModule.__init__, LowMemModule.__init__, build_causal_lm])
def test_signatures_name_the_choices_the_checks_accept(function):
    hints = typing.get_type_hints(function)
    for name, allowed in CHOICES.items():
        if name in hints:
            assert hints[name] == typing.Optional[typing.Literal[allowed]], (name, hints[name])  # noqa: UP045
    assert QUANTIZE_CHOICES == (None, *CHOICES["quantize"]) and SCHEDULERS == (None, *CHOICES["scheduler"])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_signatures_name_the_choices_their_checks_accept(name):
    """``bf16_rounding``, ``momentum_dtype`` and Muon's ``adjust_lr_fn`` are Literal types of the values the
    optimizer's checks accept, so a LightningCLI ``optimizer: class_path: ...`` lists them and refuses others."""
    cls = optimizer_class(name)
    hints = typing.get_type_hints(cls.__init__)
    choices = {"bf16_rounding": BF16_ROUNDINGS, "momentum_dtype": MOMENTUM_DTYPES,
               "adjust_lr_fn": ("original", "match_rms_adamw")}
    for arg, allowed in choices.items():
        if arg in hints and cls.__module__.startswith("lowmem_lightning."):
            hint = hints[arg]
            leaves = [hint] if typing.get_origin(hint) is typing.Literal else typing.get_args(hint)
            assert [typing.get_args(leaf) for leaf in leaves if leaf is not type(None)] == [allowed], (name, arg, hint)
    if "momentum_dtype" in hints:
        with pytest.raises(ValueError, match="momentum_dtype='bf16'"):
            cls([torch.nn.Parameter(torch.zeros(2))], momentum_dtype="bf16")


def test_model_help_lists_the_choices_in_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(["fit", "--model.help", "CausalLMModule"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80  # usage, the class description and the entries
    start = out.index("Help for")
    description = out[start:out.index("\n  --model.model_name_or_path", start)]
    assert " ".join(description.split()).endswith(
        "Train a Hugging Face causal LM: full fine-tune, LoRA, or QLoRA (NF4 base + LoRA), by arguments:")
    flat = " ".join(out[out.index("--model.quantize QUANTIZE\n"):].split())
    assert "Optional[Literal['nf4']]" in flat and "Optional[Literal['cosine']]" in flat
    assert "Optional[Literal['float32', 'fp32', 'bfloat16', 'bf16', 'float16', 'fp16']]" in flat


def test_a_wrong_choice_is_refused_by_name_with_the_choices(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "tiny.yaml",
                           "--model.quantize", "nf8"], cwd=tmp_path, env=launch_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    first, *rest = proc.stderr.splitlines()
    assert first.startswith("lowmem fit: error: ") and rest == ["(all options: lowmem fit --help)"], proc.stderr
    assert "\"quantize\": Expected one of: 'nf4', null. Given value: nf8" in first, first
    assert list(tmp_path.iterdir()) == []


CALLBACK = "lowmem_lightning.callbacks.LowMemOptimizerCallback"
CALLBACK_YAML = f"""trainer:
  callbacks:
    - class_path: {CALLBACK}
      init_args:
        optimizer: sgd
        bf16_rounding: BAD
"""


@pytest.mark.parametrize("given", ["flags", "yaml"])
def test_a_wrong_callback_choice_is_one_message_of_that_argument(tmp_path, given, capsys, monkeypatch):
    """``--trainer.callbacks.bf16_rounding BAD`` (or the YAML's init_args): jsonargparse also tries the base
    ``lightning.Callback`` (and a single callback for the list), whose 'Option ... is not accepted' and 'Not a valid
    subclass' are left out, so the message is the callback's own: the argument, the value and the choices.

    By the console script's entry point in this process (the parser's refusal as a real process is
    :func:`test_a_wrong_choice_is_refused_by_name_with_the_choices`)."""
    (tmp_path / "callbacks.yaml").write_text(CALLBACK_YAML)
    args = (["--config", "callbacks.yaml"] if given == "yaml" else
            [f"--trainer.callbacks+={CALLBACK}", "--trainer.callbacks.optimizer", "sgd",
             "--trainer.callbacks.bf16_rounding", "BAD"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    capsys.readouterr()
    code = main(["fit", "--config", "tiny.yaml", *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", err[-3000:]
    first, *rest = err.splitlines()
    assert rest == ["(all options: lowmem fit --help)"], err
    assert first == ("lowmem fit: error: Parser key \"trainer.callbacks\": Problem with given class_path "
                     f"'{CALLBACK}': Parser key \"bf16_rounding\": Expected one of: 'stochastic', 'nearest', null. "
                     "Given value: BAD")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["callbacks.yaml"]
