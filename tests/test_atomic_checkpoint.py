"""Atomic checkpoints (issue 25, deliverable 1): a full or read-only checkpoint directory never leaves a partial
file under a final name, keeps the last good checkpoint loadable, leaves no temporary file and ends the run with
one CheckpointWriteError naming the path.

Two layers: fault injection (an ``OSError`` from the file, from ``os.open`` or from ``os.replace``; runs
anywhere) and real file systems: a 1 MiB tmpfs that fills up and a tmpfs remounted read-only mid-run, each in a
private mount namespace (``unshare -m``, needs root; skipped with the reason otherwise). The tmpfs case also
runs Lightning's default ``TorchCheckpointIO`` to show the failure this fixes (a truncated ``.ckpt``). The
real-file-system scenarios share one subprocess whose time is mostly one import of Lightning (21 s in all at a
load average of 8.7 on 2 cores, where ``import lightning.pytorch`` alone took 18 s), so they run by default.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lowmem_lightning.callbacks import checkpoint_io
from lowmem_lightning.callbacks.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    atomic_torch_save,
    atomic_write,
    use_atomic_checkpoint_io,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TinyModule(L.LightningModule):
    """One Linear(width, width) trained with SGD on random data: a checkpoint of ~4 * width**2 bytes."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.layer = torch.nn.Linear(width, width)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, self.layer.in_features))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(dirpath, max_steps: int = 5, callbacks=(), **kwargs) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=str(dirpath), every_n_train_steps=1, save_top_k=-1)
    return L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[checkpoint, *callbacks], default_root_dir=str(dirpath), **kwargs)


def _temp_files(folder) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp-" in name]


class _FailingFile:
    """A file object that writes ``budget`` bytes, then fails every write with ``code`` (a disk filling up)."""

    def __init__(self, raw, budget: int, code: int):
        self.raw, self.budget, self.code = raw, budget, code

    def write(self, data) -> int:
        if self.budget <= 0:
            raise OSError(self.code, os.strerror(self.code))
        count = min(len(data), self.budget)
        self.budget -= count
        self.raw.write(bytes(memoryview(data)[:count]))
        if count < len(data):
            raise OSError(self.code, os.strerror(self.code))
        return count

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


def _fail_writes_after(monkeypatch, budget: int, code: int = errno.ENOSPC) -> None:
    real = os.fdopen
    monkeypatch.setattr(checkpoint_io.os, "fdopen", lambda fd, mode: _FailingFile(real(fd, mode), budget, code))


# ---------------------------------------------------------------------------------------------- fault injection
def test_a_save_is_complete_loadable_and_respects_the_umask(tmp_path):
    path = tmp_path / "sub" / "epoch=0-step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(5.0)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(5.0))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it
    assert os.listdir(path.parent) == [path.name]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
@pytest.mark.parametrize("budget", [0, 100, 5000])
def test_a_write_failing_midway_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch, code, budget):
    """torch.save's writer fails after ``budget`` bytes (it reports a RuntimeError whose context is the OSError):
    one CheckpointWriteError naming the path and the errno; the old checkpoint still loads; no temp file."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(1000)}, path)
    _fail_writes_after(monkeypatch, budget, code)
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint({"w": torch.ones(1000)}, path)
    err = info.value
    assert err.errno == code and err.path == str(path) and err.filename == str(path)
    assert str(path) in str(err) and errno.errorcode[code] in str(err)
    assert err.__cause__ is None and err.__suppress_context__  # one exception, not a chain of three
    assert torch.equal(torch.load(path)["w"], torch.zeros(1000))
    assert _temp_files(tmp_path) == []


def test_a_new_name_on_a_full_disk_leaves_nothing_under_that_name(tmp_path, monkeypatch):
    _fail_writes_after(monkeypatch, 3000)
    path = tmp_path / "epoch=0-step=7.ckpt"
    with pytest.raises(CheckpointWriteError, match="epoch=0-step=7.ckpt: the file system is full"):
        atomic_torch_save({"w": torch.ones(10_000)}, path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_an_unwritable_directory_is_named_and_nothing_is_created(tmp_path, monkeypatch, code, reason):
    """The temporary file cannot be created (read-only mount, no permission): one error naming the path."""
    real_open = os.open

    def refuse(path, flags, *args):
        if os.path.dirname(os.fspath(path)) == str(tmp_path) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args)

    (tmp_path / "old.ckpt").write_bytes(b"old")
    monkeypatch.setattr(checkpoint_io.os, "open", refuse)
    with pytest.raises(CheckpointWriteError, match=reason) as info:
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "new.ckpt")
    assert info.value.errno == code and str(tmp_path / "new.ckpt") in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["old.ckpt"]


def test_a_failed_rename_removes_the_temp_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), src)

    monkeypatch.setattr(checkpoint_io.os, "replace", refuse)
    with pytest.raises(CheckpointWriteError, match="permission denied"):
        atomic_torch_save({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == []


def test_a_directory_under_the_final_name_is_refused_and_kept(tmp_path):
    (tmp_path / "a.ckpt").mkdir()
    with pytest.raises(CheckpointWriteError, match="a directory of that name exists"):
        atomic_torch_save({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    assert os.listdir(tmp_path) == ["a.ckpt"] and (tmp_path / "a.ckpt").is_dir()


def test_an_error_that_is_not_the_disks_propagates_unchanged_and_the_temp_is_removed(tmp_path):
    def broken(f):
        f.write(b"partial")
        raise pickle.PicklingError("cannot pickle a lambda")

    with pytest.raises(pickle.PicklingError, match="lambda"):
        atomic_write(tmp_path / "a.ckpt", broken)
    assert os.listdir(tmp_path) == []


def test_an_interrupt_midway_removes_the_temp_file(tmp_path):
    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.ckpt", interrupted)
    assert os.listdir(tmp_path) == []


def test_the_error_pickles_and_is_an_oserror(tmp_path):
    err = CheckpointWriteError(str(tmp_path / "a.ckpt"), errno.ENOSPC, "No space left on device")
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, OSError) and str(copy) == str(err) and copy.errno == errno.ENOSPC


def test_remote_paths_and_storage_options_are_lightnings(monkeypatch):
    calls = []
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", lambda self, c, p, s=None: calls.append((p, s)))
    AtomicCheckpointIO().save_checkpoint({}, "s3://bucket/a.ckpt")
    AtomicCheckpointIO().save_checkpoint({}, "/tmp/a.ckpt", storage_options={"x": 1})
    assert calls == [("s3://bucket/a.ckpt", None), ("/tmp/a.ckpt", {"x": 1})]


# ---------------------------------------------------------------------------------------------- installation
def test_installed_only_over_lightnings_default(tmp_path):
    trainer = _trainer(tmp_path)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    assert use_atomic_checkpoint_io(trainer) and isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert use_atomic_checkpoint_io(trainer)  # idempotent

    class Mine(TorchCheckpointIO):
        pass

    chosen = Mine()
    trainer = _trainer(tmp_path, plugins=[chosen])
    assert not use_atomic_checkpoint_io(trainer) and trainer.strategy.checkpoint_io is chosen


def test_a_fit_on_a_disk_that_fills_up_ends_with_one_error_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    """Trainer.fit with ModelCheckpoint every step; the 4th save fails midway: fit raises CheckpointWriteError
    naming step 4's file, steps 1-3 load, nothing exists under step 4's name, no temp file."""
    trainer = _trainer(tmp_path, max_steps=6)
    use_atomic_checkpoint_io(trainer)
    real_save = atomic_torch_save
    saves = []

    def fourth_fails(obj, path, what="checkpoint"):
        saves.append(os.path.basename(path))
        if len(saves) == 4:
            _fail_writes_after(monkeypatch, 500)
        return real_save(obj, path, what)

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", fourth_fails)
    with pytest.raises(CheckpointWriteError, match=r"epoch=0-step=4\.ckpt: the file system is full"):
        trainer.fit(_TinyModule())
    assert sorted(os.listdir(tmp_path)) == [f"epoch=0-step={s}.ckpt" for s in (1, 2, 3)]
    assert torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=False)["global_step"] == 3


class TinyData(L.LightningDataModule):
    """Random inputs for :class:`_TinyModule` (the CLI test's data module)."""

    def train_dataloader(self):
        return _TinyModule().train_dataloader()


class TinyModel(_TinyModule):
    """:class:`_TinyModule` for the CLI test."""


def test_the_optimizer_callback_installs_it_for_its_fit(tmp_path):
    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    callback = LowMemOptimizerCallback("sgd", lr=0.01, plot=False, print_summary=False, log_state_memory=False)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[callback])
    trainer.fit(_TinyModule())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]


def test_the_cli_ends_a_full_disk_with_exit_2_and_one_message(tmp_path, monkeypatch, capsys):
    """``lowmem fit`` whose 2nd checkpoint hits a full disk: exit code 2, one line naming the file, no traceback;
    the 1st checkpoint loads."""
    import yaml

    from lowmem_lightning.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 4, "logger": False, "accelerator": "cpu", "enable_model_summary": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1,
                                                 "save_top_k": -1}}]},
        "model": {"class_path": "test_atomic_checkpoint.TinyModel"},
        "data": {"class_path": "test_atomic_checkpoint.TinyData"},
    }))
    real_save, saves = atomic_torch_save, []

    def second_fails(obj, path, what="checkpoint"):
        saves.append(path)
        if len(saves) == 2:
            _fail_writes_after(monkeypatch, 200)
        return real_save(obj, path, what)

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", second_fails)
    code = main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert f"lowmem fit: error: Could not write the checkpoint {tmp_path / 'ckpt' / 'epoch=0-step=2.ckpt'}" in err
    assert os.listdir(tmp_path / "ckpt") == ["epoch=0-step=1.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)["global_step"] == 1


# ---------------------------------------------------------------------------------------------- real file systems
_NAMESPACE_SCRIPT = textwrap.dedent('''
    """Runs inside `unshare -m` with {dir}/full (1 MiB tmpfs) and {dir}/ro (tmpfs) mounted: prints one JSON line."""
    import json, os, signal, subprocess, sys
    import torch
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_atomic_checkpoint import _TinyModule, _trainer
    from lightning.pytorch.callbacks import Callback
    from lowmem_lightning.callbacks.checkpoint_io import use_atomic_checkpoint_io
    from lowmem_lightning.callbacks.preemption import save_on_sigterm

    def files(folder):
        out = {{}}
        for name in sorted(os.listdir(folder)):
            try:
                out[name] = int(torch.load(os.path.join(folder, name), weights_only=False)["global_step"])
            except Exception as err:
                out[name] = "unloadable: " + type(err).__name__
        return out

    def fit(folder, atomic, callbacks=(), max_steps=12):
        trainer = _trainer(folder, max_steps=max_steps, callbacks=list(callbacks))
        if atomic:
            use_atomic_checkpoint_io(trainer)
        try:
            trainer.fit(_TinyModule(width=200))  # ~160 KB per checkpoint: 1 MiB fills up after a few
            return None
        except BaseException as err:
            return {{"type": type(err).__name__, "errno": getattr(err, "errno", None), "message": str(err)[:400]}}

    class ReadOnlyAfter(Callback):
        def __init__(self, step, mount):
            self.step, self.mount = step, mount
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                subprocess.run(["mount", "-o", "remount,ro", self.mount], check=True)

    class SigtermAfter(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:  # before ModelCheckpoint's save of step 3 (checkpoint callbacks run last)
                big = os.path.join({dir!r}, "sig", "filler")
                with open(big, "wb") as f:  # fill the disk: the SIGTERM checkpoint cannot be written
                    try:
                        while True:
                            f.write(b"x" * 65536)
                            f.flush()
                    except OSError:
                        pass
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler records it
                assert trainer.received_sigterm
                save_on_sigterm(trainer)

    result = {{}}
    full = os.path.join({dir!r}, "full")
    os.makedirs(os.path.join(full, "atomic"))
    result["atomic_error"] = fit(os.path.join(full, "atomic"), True)
    result["atomic_files"] = files(os.path.join(full, "atomic"))
    shutil = __import__("shutil")
    shutil.rmtree(os.path.join(full, "atomic"))
    os.makedirs(os.path.join(full, "lightning"))
    result["lightning_error"] = fit(os.path.join(full, "lightning"), False)
    result["lightning_files"] = files(os.path.join(full, "lightning"))
    ro = os.path.join({dir!r}, "ro")
    result["ro_error"] = fit(ro, True, [ReadOnlyAfter(3, ro)], max_steps=6)
    result["ro_files"] = files(ro)
    sig = os.path.join({dir!r}, "sig")
    result["sig_error"] = fit(sig, True, [SigtermAfter()], max_steps=6)
    os.remove(os.path.join(sig, "filler"))
    result["sig_files"] = files(sig)
    print("RESULT " + json.dumps(result))
''')


def _namespace_unavailable() -> str | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not installed"
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace (unshare -m)"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m / mount -t tmpfs unavailable here: {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def namespace_run(tmp_path_factory):
    """The real-file-system scenarios, run once in one `unshare -m` subprocess (one import of Lightning)."""
    reason = _namespace_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mounts")
    for name in ("full", "ro", "sig"):
        (root / name).mkdir()
    script = root / "scenarios.py"
    script.write_text(_NAMESPACE_SCRIPT.format(dir=str(root), repo=REPO, tests=os.path.join(REPO, "tests")))
    mounts = " && ".join(f"mount -t tmpfs -o size=1m tmpfs {root / name}" for name in ("full", "ro", "sig"))
    run = subprocess.run(["unshare", "-m", "sh", "-c", f"{mounts} && exec {sys.executable} {script}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _loadable_steps(files: dict) -> list[int]:
    assert all(isinstance(step, int) for step in files.values()), files
    return sorted(files.values())


def test_tmpfs_that_fills_up_keeps_every_saved_checkpoint_whole(namespace_run):
    err, files = namespace_run["atomic_error"], namespace_run["atomic_files"]
    assert err["type"] == "CheckpointWriteError" and err["errno"] == errno.ENOSPC, err
    steps = _loadable_steps(files)  # every file under a final name loads: no partial file, no temp file
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2, files
    failed = f"epoch=0-step={len(steps) + 1}.ckpt"
    assert failed in err["message"] and failed not in files and "the file system is full" in err["message"]


def test_lightnings_default_leaves_a_truncated_checkpoint_there(namespace_run):
    """The failure the atomic IO fixes, on the same tmpfs: Lightning's own save leaves an unloadable .ckpt."""
    files = namespace_run["lightning_files"]
    assert namespace_run["lightning_error"] is not None
    assert any(isinstance(step, str) for step in files.values()), files


def test_directory_remounted_read_only_mid_run(namespace_run):
    err, files = namespace_run["ro_error"], namespace_run["ro_files"]
    assert err["type"] == "CheckpointWriteError" and err["errno"] == errno.EROFS, err
    assert _loadable_steps(files) == [1, 2]  # remounted at step 3, before ModelCheckpoint's save (it runs last)
    assert "epoch=0-step=3.ckpt: the file system is read-only" in err["message"]


def test_sigterm_checkpoint_on_a_full_disk_is_not_left_empty(namespace_run):
    err, files = namespace_run["sig_error"], namespace_run["sig_files"]
    assert err["type"] == "CheckpointWriteError" and err["errno"] == errno.ENOSPC, err
    assert "last.ckpt" in err["message"] and "last.ckpt" not in files
    assert _loadable_steps(files) == [1, 2]
