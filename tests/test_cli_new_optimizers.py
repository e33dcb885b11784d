"""The ``lowmem`` command with the newest optimizers (adamw_4bit, lion, lion_8bit, ademamix, ademamix_8bit, muon,
muon_8bit), as a user at a terminal meets it: the help lists them, typos and bad values are refused with one
message, ``lowmem estimate`` sizes them as the real optimizer stores them and never advises away from one that
fits, broken checkpoints of a 4-bit run are refused before anything is written, and (``-m slow``) a ``lowmem fit``
killed by a signal resumes bit for bit with each of them, and ``--ckpt_path last`` restarts a job.

The default suite runs in-process (``main``) on the tiny model; the kill/resume and 80x24 terminal cases start
real ``lowmem`` processes (``-m slow``: three processes per optimizer).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest
import test_resume_midepoch as midepoch
import torch
from optim_helpers import count_state_once

from lowmem_lightning.cli import RECIPES_DIR, main, parse_fit_config
from lowmem_lightning.optim import available_optimizers

NEW = ["adamw_4bit", "lion", "lion_8bit", "ademamix", "ademamix_8bit", "muon", "muon_8bit"]
"""The optimizers added after the CLI's field fixes (issues 28, 29)."""

SHORT = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--data.init_args.seq_len", "32"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """``main`` sees only its own arguments (Lightning's DDP launcher reads ``sys.argv``)."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def _files(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _refused(capsys, argv: list[str], root: Path) -> str:
    """Run ``lowmem ARGV`` in-process from ``root``; assert exit 2, one error line, no traceback, nothing
    written or changed under ``root``; return the error line."""
    before = _files(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert _files(root) == before
    return errors[0]


# ------------------------------------------------------------------------------------------- help and names
def test_the_help_lists_every_new_optimizer(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    for argv in (["--help"], ["fit", "--help"]):
        assert main(argv) == 0
        flat = " ".join(capsys.readouterr().out.split())
        listed = re.search(r"(?:another optimizer|One of): ([\w, ]+)\.", flat)
        assert listed is not None, argv
        assert listed.group(1).split(", ") == available_optimizers(), argv
        assert set(NEW) <= set(listed.group(1).split(", "))


def test_a_yaml_typo_in_the_optimizer_lists_the_new_names(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES_DIR / "tiny.yaml"
    (tmp_path / "typo.yaml").write_text(recipe.read_text().replace("optimizer: adamw_8bit", "optimizer: muon8bit"))
    error = _refused(capsys, ["fit", "--config", "typo.yaml", *SHORT], tmp_path)
    assert "Unknown optimizer 'muon8bit': expected one of " in error
    listed, suggestion = error.split("expected one of ")[1].split(". Did you mean ")
    assert listed.split(", ") == available_optimizers()
    assert suggestion.startswith("'muon_8bit'?")


@pytest.mark.parametrize(("flag", "value", "advice"), [
    ("--optim.lr", "1e-4", "Write --lr 1e-4."),
    ("--optim.betas", "[0.9, 0.99]", """--trainer.callbacks.optimizer_kwargs '{"betas": [0.9, 0.99]}'"""),
    ("--optim.weight_decay", "0.1", "--trainer.callbacks.weight_decay 0.1"),
])
def test_a_key_under_optim_says_what_to_write(flag, value, advice, tmp_path, capsys, monkeypatch):
    """``--optim`` takes a name; ``--optim.lr`` was 'Expected str. Given value: NestedArg(...)'."""
    monkeypatch.chdir(tmp_path)
    error = _refused(capsys, ["fit", "--config", "tiny.yaml", "--optim", "lion_8bit", flag, value, *SHORT], tmp_path)
    assert f"{flag}={value}: --optim takes an optimizer name only" in error and advice in error
    assert "NestedArg" not in error


# ---------------------------------------------------------------------- optimizer settings on the command line
def test_command_line_optimizer_kwargs_are_the_new_optimizers(tmp_path):
    """Given with ``--optim``, they are kept for the new optimizer (they were dropped as 'the config's')."""
    given = ["--trainer.callbacks.optimizer_kwargs", '{"betas": [0.95, 0.98]}']
    for recipe in ("tiny.yaml", "tiny_sgd.yaml"):  # no optimizer_kwargs / SGD's momentum, nesterov, momentum_dtype
        cfg = parse_fit_config(["--config", recipe, "--optim", "lion_8bit", *given])
        entry = next(c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback"))
        assert entry.init_args.optimizer == "lion_8bit"
        assert entry.init_args.optimizer_kwargs == {"betas": [0.95, 0.98]}, recipe
    # a recipe's own settings for another optimizer are still dropped when only --optim is given
    cfg = parse_fit_config(["--config", "tiny_sgd.yaml", "--optim", "lion_8bit"])
    entry = next(c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback"))
    assert entry.init_args.optimizer_kwargs is None


@pytest.mark.parametrize(("optim", "kept"), [("muon", None), ("muon_8bit", None), ("sgd", "int8")])
def test_a_recipes_momentum_dtype_does_not_override_the_muon_name(optim, kept, capsys):
    """``--optim muon`` on a recipe with CAME's ``momentum_dtype: int8`` trains fp32 Muon (it got 8-bit momentum:
    muon_8bit under muon's name, a 'configured' row in ``lowmem estimate``); ``sgd`` has no such pair: kept."""
    cfg = parse_fit_config(["--config", "tiny_came_8bit.yaml", "--optim", optim])
    entry = next(c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback"))
    assert (entry.init_args.optimizer_kwargs or {}).get("momentum_dtype") == kept
    said = "dropped the config's momentum_dtype='int8' (came's; muon's name chooses how its momentum is stored)"
    assert (said in capsys.readouterr().err) == (optim == "muon")
    assert main(["estimate", "--config", "tiny_came_8bit.yaml", "--optim", optim]) == 0
    assert f"recipe's optimizer ({optim if kept is None else 'configured'}, * below)" in capsys.readouterr().out


@pytest.mark.parametrize(("optim", "extra", "message"), [
    ("ademamix_8bit", ["--trainer.callbacks.optimizer_kwargs", '{"betas": [0.9, 0.999]}'],
     "Invalid betas=(0.9, 0.999): expected a tuple of 3 numbers in [0, 1)."),
    ("lion", ["--trainer.callbacks.optimizer_kwargs", '{"betas": [0.9, 0.99, 0.9999]}'],
     "Invalid betas=(0.9, 0.99, 0.9999): expected a tuple of 2 numbers in [0, 1)."),
    ("muon_8bit", ["--trainer.callbacks.optimizer_kwargs", '{"ns_steps": 100}'],
     "Invalid ns_steps=100: expected an int in [0, 100)."),
    ("adamw_4bit", ["--lr", "-1"], "Invalid lr=-1.0: expected a finite number >= 0."),
    ("ademamix", ["--lr", "0"], "Invalid lr=0.0 for LowMemOptimizerCallback(optimizer='ademamix')"),
])
def test_bad_values_for_a_new_optimizer_are_refused(optim, extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = _refused(capsys, ["fit", "--config", "tiny.yaml", "--optim", optim, *extra, *SHORT], tmp_path)
    assert message in error


# ------------------------------------------------------------------------------------------------- estimate
def test_estimate_rows_are_the_bytes_the_real_optimizers_keep(capsys):
    """Each new optimizer's row of ``lowmem estimate --config tiny.yaml`` (meta model, named params: Muon's
    split by name) equals the state the optimizer keeps after a step on the real model, byte for byte."""
    from lowmem_lightning.modules.causal_lm import build_causal_lm
    from lowmem_lightning.optim import build_optimizer, state_memory

    assert main(["estimate", "--config", "tiny.yaml", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["optimizers"]
    init = parse_fit_config(["--config", "tiny.yaml"]).model.init_args
    torch.manual_seed(0)
    model = build_causal_lm(None, dict(init.config), device="cpu")
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    for name in NEW:
        opt = build_optimizer(name, list(model.named_parameters()), lr=1e-3)
        opt.step()
        mem = state_memory(opt)
        assert rows[name]["state_bytes"] == mem.device_bytes + mem.host_bytes, name
    per_param = {name: rows[name]["bytes_per_param"] for name in NEW}
    assert per_param["lion"] == pytest.approx(4.0, abs=1e-3) and per_param["ademamix"] == pytest.approx(12.0, abs=1e-3)
    assert per_param["adamw_4bit"] < per_param["lion_8bit"] * 1.06 < rows["adamw_8bit"]["bytes_per_param"]
    assert per_param["muon_8bit"] < per_param["muon"] and per_param["ademamix_8bit"] < per_param["ademamix"] / 3.9


@pytest.mark.parametrize("optim", NEW)
def test_estimate_with_a_new_optimizer_marks_its_row_within_80_columns(optim, capsys):
    assert main(["estimate", "--config", "full_finetune_7b.yaml", "--optim", optim, "--budget-gb", "24"]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert max(len(line) for line in out) <= 80, max(out, key=len)
    starred = [line for line in out if re.match(r"\S+ \*", line)]
    assert len(starred) == 1 and starred[0].startswith(f"{optim} *"), starred
    header = next(i for i, line in enumerate(out) if line.startswith("optimizer "))
    assert len(out) - header <= 22


def _advice(model, budget: int, configured: tuple[str, dict], release: bool = False) -> str:
    from lowmem_lightning.estimate import estimate_memory

    return estimate_memory(model, budget_bytes=budget, configured=configured, step_in_backward=release,
                           bucket_bytes=0).recommendation


@pytest.mark.parametrize("release", [False, True])
def test_estimate_never_advises_away_from_a_new_optimizer_that_fits(release, monkeypatch):
    """At every budget that changes the answer: a Lion / AdEMAMix / Muon run that fits as configured is told to
    keep it unless an AdamW / CAME row fits (not to page its state, release gradients or drop its momentum);
    the rule itself never proposes Lion, AdEMAMix or Muon; 4-bit AdamW only when 8-bit AdamW does not fit.

    The budget changes only the verdicts and the advice: each optimizer's state over the one model is counted once
    (:func:`optim_helpers.count_state_once`; ~670 estimates of ~18 optimizers, nearly all of the test's time)."""
    from torch import nn

    from lowmem_lightning.estimate import OPTIMIZER_VARIANTS, estimate_memory

    count_state_once(monkeypatch)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(12)])
    free = estimate_memory(model, step_in_backward=release, bucket_bytes=0)
    budgets = sorted({b + d for r in free.optimizers.values() for b in (r.total_device_bytes, r.released_device_bytes)
                      for d in (-1, 0)})
    rule = ("adamw", "adamw_8bit", "adamw_4bit", "came", "came_int8", "adafactor_beta1_int8")
    for optim in NEW:
        configured = OPTIMIZER_VARIANTS[optim]
        for budget in budgets:
            advice = _advice(model, budget, configured, release)
            fits = free.optimizers[optim].total_device_bytes <= budget
            assert not any(name in advice.split() for name in NEW if name != "adamw_4bit") or (
                advice == f"{optim} (as configured)"), (optim, budget, advice)
            if advice.startswith("adamw_4bit"):
                assert advice == "adamw_4bit" or free.optimizers["adamw_8bit"].released_device_bytes > budget
                assert free.optimizers["adamw_8bit"].total_device_bytes > budget, (optim, budget, advice)
            if fits and not any(free.optimizers[r].total_device_bytes <= budget for r in rule):
                assert advice == f"{optim} (as configured)", (optim, budget, advice)
            if not fits:
                assert "as configured" not in advice, (optim, budget, advice)


def test_the_rule_still_proposes_its_own_rows_over_a_configured_optimizer_it_chooses_among():
    """A run on ``adamw_8bit`` that does not fit is still advised 4-bit AdamW (no 'as configured' for the rule's
    own optimizers), and one on ``muon_8bit`` where 4-bit AdamW fits is advised 4-bit AdamW (the rule's order)."""
    from torch import nn

    from lowmem_lightning.estimate import OPTIMIZER_VARIANTS, estimate_memory

    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(12)])
    rows = estimate_memory(model, bucket_bytes=0).optimizers
    budget = rows["adamw_4bit"].total_device_bytes
    assert rows["adamw_8bit"].total_device_bytes > budget
    assert _advice(model, budget, OPTIMIZER_VARIANTS["adamw_8bit"]) == "adamw_4bit"
    assert _advice(model, budget, OPTIMIZER_VARIANTS["muon_8bit"]) == "adamw_4bit"


# ------------------------------------------------------------------------------------------- end-of-fit screen
def test_the_summary_of_an_optimizer_with_more_state_than_adamw_says_more():
    """AdEMAMix keeps 12 B/param against fp32 AdamW's 8: '50.0% more state here', not 'saving -50.0%'."""
    from lowmem_lightning.callbacks.report import format_summary, summary_dict
    from lowmem_lightning.optim.memory import StateMemory

    memory = StateMemory(total_bytes=12_000, device_bytes=12_000, host_bytes=0, num_params=1000)
    summary = summary_dict("ademamix", memory, 12_000, 8_000, steps=3)
    line = format_summary(summary, None).splitlines()[-1]
    assert line == "  fp32 AdamW would hold 0.008 MiB (8.00 bytes/param): 50.0% more state here"
    less = summary_dict("lion_8bit", StateMemory(1_000, 1_000, 0, 1000), 1_000, 8_000, steps=3)
    assert format_summary(less, None).endswith("saving 87.5%")


# --------------------------------------------------------------------------------------- broken 4-bit checkpoints
@pytest.fixture(scope="module")
def four_bit_run(tmp_path_factory) -> Path:
    """A 10-step ``adamw_4bit`` run of ``test_resume_midepoch``'s config (checkpoint ``ckpt/step=10.ckpt``)."""
    root = tmp_path_factory.mktemp("four_bit")
    data = midepoch._write_data(root / "words.txt")
    (root / "run.yaml").write_text(midepoch.CONFIG.format(root=root, data=data, max_steps=10))
    saved = sys.argv
    try:
        sys.argv = sys.argv[:1]
        assert main(["fit", "--config", str(root / "run.yaml"), "--optim", "adamw_4bit"]) == 0
    finally:
        sys.argv = saved
    shutil.rmtree(root / "logs")
    shutil.rmtree(root / "model")
    return root


def _short_codes(ckpt: dict) -> None:
    state = ckpt["optimizer_states"][0]["state"][0]
    state["exp_avg_codes"] = state["exp_avg_codes"][:-1]


def _flat_absmax(ckpt: dict) -> None:
    state = ckpt["optimizer_states"][0]["state"][0]
    state["exp_avg_sq_absmax"] = state["exp_avg_sq_absmax"][:-2]


def _eight_bit_codes(ckpt: dict) -> None:
    """What an adamw_8bit state dict holds: int8 codes for m (the callback's record renamed to match)."""
    for state in ckpt["optimizer_states"][0]["state"].values():
        if "exp_avg_codes" in state:
            state["exp_avg_codes"] = torch.zeros(2 * state["exp_avg_codes"].numel(), dtype=torch.int8)


BROKEN = {
    "codes of a wrong length": (_short_codes, "adamw_4bit", "'exp_avg_codes' is torch.uint8 (4143,), expected "
                                "torch.uint8 (4144,)"),
    "absmax of a wrong shape": (_flat_absmax, "adamw_4bit", "'exp_avg_sq_absmax' is torch.float32 (63,), expected "
                                "torch.float32 (65,)"),
    "8-bit codes in a 4-bit checkpoint": (_eight_bit_codes, "adamw_4bit", "'exp_avg_codes' are int8, the 8-bit codes"),
    "resumed by adafactor": (None, "adafactor", "given.ckpt: it was trained with optimizer 'adamw_4bit'"),
    "resumed by lion_8bit": (None, "lion_8bit", "given.ckpt: it was trained with optimizer 'adamw_4bit'"),
    "cut short": ("truncate", "adamw_4bit", "is truncated"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_4bit_checkpoint_is_refused_before_anything_is_written(case, four_bit_run, tmp_path, capsys,
                                                                        monkeypatch):
    edit, optim, message = BROKEN[case]
    ckpt = tmp_path / "given.ckpt"
    source = four_bit_run / "ckpt" / "step=10.ckpt"
    if edit == "truncate":
        raw = source.read_bytes()
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif edit is None:
        shutil.copy(source, ckpt)
    else:
        loaded = torch.load(source, map_location="cpu", weights_only=False)
        edit(loaded)
        torch.save(loaded, ckpt)
    run = tmp_path / "run.yaml"
    run.write_text(midepoch.CONFIG.format(root=tmp_path, data=four_bit_run / "words.txt", max_steps=12))
    monkeypatch.chdir(tmp_path)
    error = _refused(capsys, ["fit", "--config", str(run), "--optim", optim, "--ckpt_path", str(ckpt)], tmp_path)
    assert message in error


# ------------------------------------------------------------------------------ killed runs resume bit for bit
_REFERENCES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return midepoch._write_data(tmp_path_factory.mktemp("data") / "words.txt")


def _reference(name: str, data: Path, tmp_path_factory) -> Path:
    """One uninterrupted 40-step ``lowmem fit`` process per optimizer (made once per module)."""
    if name not in _REFERENCES:
        root = tmp_path_factory.mktemp(f"reference_{name}")
        result = midepoch._lowmem(root, data, "--optim", name)
        assert result.returncode == 0, result.stderr[-3000:]
        _REFERENCES[name] = root
    return _REFERENCES[name]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "how"), [(n, "SIGKILL") for n in NEW]
                         + [(n, "SIGTERM") for n in ("adamw_4bit", "lion_8bit", "ademamix_8bit", "muon_8bit")])
def test_a_killed_run_resumes_bit_exact_with_each_new_optimizer(name, how, data, tmp_path, tmp_path_factory):
    """SIGKILL at step 23 (resumed from the step-20 checkpoint, mid-epoch) or SIGTERM in the middle of step 26
    (resumed from the ``last.ckpt`` it saved): final params, optimizer state (codes, scales, steps), saved model
    and every logged loss equal the uninterrupted run's (``test_resume_midepoch``'s comparison)."""
    reference = _reference(name, data, tmp_path_factory)
    if how == "SIGKILL":
        killed = midepoch._lowmem(tmp_path, data, "--optim", name, *midepoch._signal_args("SIGKILL", 23, "end"))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        ckpt, resumed_at = tmp_path / "ckpt" / "step=20.ckpt", 20
    else:
        killed = midepoch._lowmem(tmp_path, data, "--optim", name, *midepoch._signal_args("SIGTERM", 25, "start"))
        assert killed.returncode == 143, killed.stderr[-3000:]
        ckpt, resumed_at = tmp_path / "ckpt" / "last.ckpt", 26
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 26
    assert "Traceback" not in killed.stderr
    resumed = midepoch._lowmem(tmp_path, data, "--optim", name, "--ckpt_path", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    midepoch._assert_same_run(reference, tmp_path, resumed_at)


@pytest.mark.slow
def test_ckpt_path_last_restarts_a_muon_8bit_job_with_the_identical_command(tmp_path, capsys, monkeypatch):
    """The preemptible job's one command with ``--optim muon_8bit``: the first start says there is no checkpoint,
    the second resumes from the newest and continues the step count."""
    from test_resume_last import paste_into, readme_checkpoint_entry

    entry = readme_checkpoint_entry().replace("every_n_train_steps: 100", "every_n_train_steps: 3")
    (tmp_path / "recipe.yaml").write_text(paste_into((RECIPES_DIR / "tiny.yaml").read_text(), entry))
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "recipe.yaml", "--optim", "muon_8bit", "--ckpt_path", "last",
            *SHORT[2:], "--trainer.max_steps"]
    assert main([*args, "6"]) == 0
    assert "no checkpoint yet" in capsys.readouterr().err
    assert main([*args, "8"]) == 0
    err = capsys.readouterr().err
    assert "resuming from runs/tiny/version_0/checkpoints/step=6.ckpt (step 6" in err
    logged = [int(r["step"]) for r in csv.DictReader((tmp_path / "runs/tiny/version_1/metrics.csv").open())
              if r.get("train_loss")]
    assert logged == [6, 7]


# ----------------------------------------------------------------------------------------- 80x24 terminal
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_fit_with_ademamix_in_an_80x24_terminal(tmp_path):
    """The final screen: the finished bar, its metrics and the summary, no line wider than the terminal (a
    wrapped line would fill the next row), 'more state here' for AdEMAMix's 12 B/param."""
    from test_terminal import LOWMEM, _tmux_screen

    command = [*LOWMEM, "fit", "--config", "tiny.yaml", "--optim", "ademamix", "--trainer.max_steps", "6",
               "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
    screen, history = _tmux_screen(shlex.join(command), tmp_path)
    lines = [line.rstrip() for line in screen.splitlines()]
    assert "__LOWMEM_EXIT=0" in lines, screen
    end = lines.index("__LOWMEM_EXIT=0")
    bar, metrics, *summary = lines[end - 6:end]
    assert re.fullmatch(r"Epoch \d+ +━+ 6/6 steps .*it/s", bar), screen
    assert re.fullmatch(r"loss \d+\.\d+ · state 3\.11 MiB · val_loss \d+\.\d+ \(step 6\)", metrics), screen
    assert summary[0] == "LowMemOptimizerCallback: ademamix on 271,392 trainable params", screen
    assert summary[2] == "  fp32 AdamW would hold 2.071 MiB (8.00 bytes/param): 50.0% more state here", screen
    assert all(len(line) <= 80 for line in history.splitlines()), history  # -J: a wrapped line is joined


def test_the_swap_note_on_a_carried_lr_quotes_the_base_lr_not_the_warmups():
    """The swap happens after the module's scheduler set the first warmup lr (3e-3 / 21 in ``tiny_sgd.yaml``
    with ``--optim lion_8bit``): the note names the lr the user gave, ``initial_lr``."""
    from lowmem_lightning.callbacks.translate import constructor_defaults, translate_group
    from lowmem_lightning.optim import optimizer_class

    target = optimizer_class("lion_8bit")
    group = {"lr": 3e-3 / 21, "initial_lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    out = translate_group(torch.optim.AdamW, group, target, constructor_defaults(target), lr_carried=True)
    assert any(note.startswith("lr=0.003 changes meaning") for note in out.changed), out.changed


def test_lowmem_test_reads_a_checkpoint_trained_with_another_optimizer_than_the_recipes(four_bit_run, tmp_path,
                                                                                       capsys, monkeypatch):
    """``lowmem fit --config X --optim adamw_4bit`` then ``lowmem test --config X --ckpt_path ...`` (the README's
    commands): test reads the weights only, so the recipe's adamw_8bit is no reason to refuse (it was: 'Cannot
    resume', then an AssertionError traceback from the module's on_exception outside fit, exit 1)."""
    run = tmp_path / "run.yaml"
    run.write_text(midepoch.CONFIG.format(root=tmp_path, data=four_bit_run / "words.txt", max_steps=10))
    monkeypatch.chdir(tmp_path)
    assert main(["test", "--config", str(run), "--ckpt_path", str(four_bit_run / "ckpt" / "step=10.ckpt")]) == 0
    out = capsys.readouterr()
    assert "test_loss" in out.out + out.err and "Traceback" not in out.err and "Cannot resume" not in out.err


def test_a_failure_outside_fit_reaches_the_user_as_it_is(tmp_path):
    """CausalLMModule's save-on-failure hook asked ``fit_loop.done`` in any stage; outside fit that asserts and
    replaced the real error with an AssertionError."""
    import lightning as L

    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    class Boom(L.Callback):
        def on_test_start(self, trainer, pl_module):
            raise RuntimeError("boom")

    model = CausalLMModule(config=midepoch_config(), save_dir=str(tmp_path / "model"))  # attaches the hook
    data = TextDataModule(str(midepoch._write_data(tmp_path / "words.txt")), seq_len=32, batch_size=4,
                          val_fraction=0.05)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[Boom()], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.test(model, data)


def midepoch_config() -> dict:
    """The 1-layer Llama of ``test_resume_midepoch``'s runs."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 64}
