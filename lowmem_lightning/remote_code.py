"""Whether transformers may run the code a model ships in its own folder (``trust_remote_code``).

A checkpoint whose ``config.json`` names classes of its own (``auto_map``) for a ``model_type`` transformers does not
have (InternLM2, MiniCPM, ...) loads only by running that code. transformers asks on the terminal (``[y/N]``, 15
seconds) when it is not told. lowmem always tells it: the code runs where ``CausalLMModule(trust_remote_code=True)``
(``--model.trust_remote_code true``) built the model, and is refused at once, by name, everywhere else.

A ``model_type`` that transformers does not have, with no code of its own, is a model newer than the installed
transformers: :func:`unknown_model_type_problem` says so in one sentence (transformers' own error lists every model
type it knows, some 600 names).

The setting holds for a block (:func:`trusting_remote_code`), so every config, model and tokenizer read inside the build
of one model sees it without each loader taking an argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

__all__ = ["remote_code_trusted", "trusting_remote_code", "unknown_code_problem", "unknown_model_type_problem"]

_TRUSTED: ContextVar[bool] = ContextVar("lowmem_trust_remote_code", default=False)


@contextlib.contextmanager
def trusting_remote_code(trusted: bool) -> Iterator[None]:
    """Within the block, transformers runs a model's own code when ``trusted`` (else refuses it at once)."""
    token = _TRUSTED.set(bool(trusted))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def remote_code_trusted() -> bool:
    """The ``trust_remote_code`` to pass transformers here: ``True`` only inside ``trusting_remote_code(True)``."""
    return _TRUSTED.get()


def unknown_code_problem(config: dict, folder: Path) -> str | None:
    """What is wrong with model folder ``folder`` whose ``config.json`` reads ``config``, when it needs code of its own
    that may not run: ``auto_map`` names its classes and transformers has no ``model_type`` of that name. ``None``
    when the code may run, or transformers has the model (it then uses its own classes, as it does itself)."""
    auto_map = config.get("auto_map")
    if remote_code_trusted() or not isinstance(auto_map, dict) or not auto_map:
        return None
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return None
    files = sorted({str(entry).split("--")[-1].split(".")[0] + ".py" for entry in auto_map.values()
                    if isinstance(entry, str)})
    return (f"names classes of its own (auto_map: {', '.join(files)}) for model_type {model_type!r}, which this "
            f"transformers does not have; lowmem runs a model's own code only when told to: set trust_remote_code: "
            f"true (--model.trust_remote_code true), as transformers' trust_remote_code=True, after reading the code "
            f"in {folder}.")


def unknown_model_type_problem(model_type) -> str | None:
    """Why transformers cannot build ``model_type``, as what a config does (``names model_type 'x', which
    transformers 5.25.0 does not have (nearest: ...); ...``): a name it does not have, said with its version, the
    nearest names it has and the upgrade a model released after it needs. ``None`` when transformers has it (or it is
    not a name: transformers' own check reports that)."""
    import difflib

    import transformers
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return None
    nearest = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
    near = f" (nearest: {', '.join(nearest)})" if nearest else ""
    return (f"names model_type {model_type!r}, which transformers {transformers.__version__} does not have{near}; "
            f"a model released after this transformers needs a newer one: pip install -U transformers.")
