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
    (``tiny``, ``tiny.yaml``); ``ValueError`` naming the value and listing the bundled recipes, or naming what makes
    the file no config (:func:`config_file_problem`)."""
    if Path(value).expanduser().is_file():
        if problem := config_file_problem(value, Path(value).expanduser()):
            raise ValueError(problem)
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


CONFIG_SECTIONS = "seed_everything:, trainer:, model:, data:, ..."
"""What a config file's top-level mapping holds, as the refusals of a file that is no such mapping name it."""


def config_file_problem(value: str, path: Path) -> str | None:
    """Why the file ``path`` (given as ``--config value``) cannot be a config, said before jsonargparse reads it
    (its own errors name no file: ``Unexpected config:``, ``'utf-8' codec can't decode byte ...``, a YAML error "in
    <unicode string>"): unreadable, not UTF-8 text, not valid YAML (line and column), empty, or not a mapping;
    ``None`` for a YAML mapping."""
    import yaml

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        return f"--config {value!r} cannot be read ({err.strerror or err})."
    except UnicodeDecodeError as err:
        return (f"--config {value!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}): "
                "expected a YAML file.")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return f"--config {value!r} is not valid YAML: {_yaml_problem(err)}."
    if data is None:
        return f"--config {value!r} is empty (no settings): expected a YAML mapping ({CONFIG_SECTIONS})."
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else f"single value ({type(data).__name__})"
        return f"--config {value!r} holds a YAML {kind}: expected a mapping ({CONFIG_SECTIONS})."
    return None


def _yaml_problem(err) -> str:
    """A YAML parse error as ``line L, column C: problem`` (1-based, as editors count) with its context ("expected a
    single document in the stream, but found another document"; "... (while parsing a flow sequence)"), a tab named
    as such."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    if "'\\t'" in problem:
        problem = "a tab, which YAML does not allow here (indent with spaces)"
    elif context:
        problem = f"{problem} ({context})" if context.startswith("while") else f"{context}, {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


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

