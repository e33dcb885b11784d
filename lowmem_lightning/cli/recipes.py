"""The ``lowmem`` command line before it is parsed: ``--config NAME`` resolved to a file or a bundled recipe,
the default model and data classes inserted when nothing names one, and ``--model.optimizer NAME`` read as
``--optim NAME`` where a LowMemOptimizerCallback replaces the module's optimizer."""

from __future__ import annotations

from pathlib import Path

from lowmem_lightning.cli.about import RECIPES_DIR, bundled_recipes
from lowmem_lightning.cli.config_edits import is_optimizer_callback
from lowmem_lightning.cli.messages import notice

__all__ = ["RECIPES_DIR", "DEFAULT_MODEL", "DEFAULT_DATA", "SUBCOMMANDS", "bundled_recipes", "resolve_recipe",
           "resolve_config_args", "with_default_classes", "model_optimizer_as_optim"]

DEFAULT_MODEL = "lowmem_lightning.modules.causal_lm.CausalLMModule"
"""``class_path`` of the model when a config names none."""

DEFAULT_DATA = "lowmem_lightning.data.text.TextDataModule"
"""``class_path`` of the data module when a config names none."""

SUBCOMMANDS = ("fit", "validate", "test", "predict", "export")
"""The subcommands of the LightningCLI parser (``export`` is :mod:`~lowmem_lightning.cli.export`'s; ``estimate`` is
run by :func:`~lowmem_lightning.cli.app.main` itself)."""


def resolve_recipe(value: str) -> str:
    """A ``--config`` value as a path: an existing file as given, else the bundled recipe of that name
    (``tiny``, ``tiny.yaml``); ``ValueError`` naming the value and listing the bundled recipes."""
    if Path(value).expanduser().is_file():
        return value
    name = Path(value).name
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file() and Path(value).parent in (Path("."), Path("configs")):
            return str(candidate)
    path = Path(value).expanduser()
    if path.exists():
        what = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ValueError(f"--config {value!r} is {what}: expected a YAML file or a bundled recipe "
                         f"({', '.join(bundled_recipes()) or 'none'}).")
    raise ValueError(
        f"--config {value!r}: no such file (not a file from {Path.cwd()}, not a bundled recipe). "
        f"Bundled recipes: {', '.join(bundled_recipes()) or 'none'}."
    )


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace every ``--config``/``-c`` value in ``argv`` by :func:`resolve_recipe`'s path."""
    out = []
    take_next = False
    for arg in argv:
        if take_next:
            out.append(resolve_recipe(arg))
            take_next = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            take_next = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_recipe(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def _class_in_args(args: list[str], key: str) -> str | None:
    """The class given for ``key`` (``model``/``data``) on the command line, if any."""
    for i, arg in enumerate(args):
        if arg in (f"--{key}", f"--{key}.class_path") and i + 1 < len(args):
            return args[i + 1]
        for prefix in (f"--{key}=", f"--{key}.class_path="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None


def _class_in_configs(args: list[str], subcommand: str, key: str) -> str | None:
    """The class given for ``key`` in the ``--config`` files of ``args`` (the last one wins)."""
    import yaml

    found = None
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, dict):
            continue
        for scope in (data, data.get(subcommand)):
            value = scope.get(key) if isinstance(scope, dict) else None
            if isinstance(value, str):
                found = value
            elif isinstance(value, dict) and isinstance(value.get("class_path"), str):
                found = value["class_path"]
    return found


def with_default_classes(args: list[str]) -> list[str]:
    """Insert ``--model CausalLMModule`` (and ``--data TextDataModule`` for it) right after the
    subcommand when neither the command line nor a config file names a class.

    Defaults are injected this way, not as parser defaults, so the default class's argument values
    never leak into a user's class of the same argument names.
    """
    if not args or args[0] not in SUBCOMMANDS or any(a in ("-h", "--help") for a in args):
        return args
    sub, rest = args[0], args[1:]
    model = _class_in_args(rest, "model") or _class_in_configs(rest, sub, "model")
    data = _class_in_args(rest, "data") or _class_in_configs(rest, sub, "data")
    extra = []
    if model is None:
        extra += ["--model", DEFAULT_MODEL]
        model = DEFAULT_MODEL
    if data is None and model.rsplit(".", 1)[-1] == "CausalLMModule":
        extra += ["--data", DEFAULT_DATA]
    return [sub, *extra, *rest]


def _configs_have_optimizer_callback(args: list[str]) -> bool:
    """Whether a ``--config`` file of ``args`` lists a LowMemOptimizerCallback in ``trainer.callbacks``."""
    import yaml

    sub = args[0] if args else "fit"
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        try:
            data = yaml.safe_load(Path(path).read_text()) if path else None
        except (OSError, yaml.YAMLError):
            continue
        for scope in (data, (data or {}).get(sub)) if isinstance(data, dict) else ():
            trainer = scope.get("trainer") if isinstance(scope, dict) else None
            callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
            entries = callbacks if isinstance(callbacks, list) else [callbacks]
            if any(is_optimizer_callback(e) for e in entries if isinstance(e, dict)):
                return True
    return False


def model_optimizer_as_optim(args: list[str]) -> list[str]:
    """``--model.optimizer NAME`` -> ``--optim NAME`` when a config's LowMemOptimizerCallback would
    replace the module's optimizer and ``--optim`` is not given; one line says so."""
    names = ("--model.optimizer", "--model.init_args.optimizer")
    if any(a == "--optim" or a.startswith("--optim=") for a in args) or not _configs_have_optimizer_callback(args):
        return args
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg in names and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith(tuple(n + "=" for n in names)):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        notice(f"--model.optimizer {value} is applied as --optim {value}: the LowMemOptimizerCallback in "
                "trainer.callbacks replaces the module's optimizer.")
        out += ["--optim", value]
    return out

