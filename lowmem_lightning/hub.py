"""Hugging Face Hub repo ids where a model or tokenizer directory is accepted.

``model_name_or_path`` (``CausalLMModule``, ``lowmem estimate``, ``lowmem export``, the NF4 loader) and the data's
``tokenizer`` take a local directory or a Hub repo id, ``org/name`` or ``org/name@revision`` (a branch, tag or
commit). A value naming an existing local path is always that path, and so is one starting with ``./``, ``../``,
``/`` or ``~`` (:data:`PATH_PREFIXES`); any other value must be a repo id, which is
resolved with ``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``;
``HF_TOKEN`` for gated or private repos; ``HF_HUB_OFFLINE=1``: the cache only), downloading only what the caller
needs (:data:`NEEDS`: ``config.json`` for an estimate; config, ``generation_config.json``, the safetensors an index
lists and the ``tokenizer.json`` a checkpoint ships for training; the tokenizer files for a tokenizer). The
local-directory code then runs on the snapshot directory.

Several processes resolving the same id at once (DDP ranks) are safe, checked in huggingface_hub 2.4's
``file_download``: it takes a file lock per file (``<cache>/.locks/models--ORG--NAME/<etag>.lock``), so one process
downloads a file while the others wait and then link the same blob, and every download goes to a process-unique
temporary file renamed into place, so even a file system whose locks do nothing (some NFS/Lustre mounts) costs only
bandwidth, never a corrupt cache; ``refs/`` are written atomically. ``CausalLMModule`` resolves ``config.json`` when
it is constructed (under Lightning's DDP launcher: on rank 0, before the other ranks start) and the weights in
``configure_model``, on every rank at once under those locks.

The data's ``data_path`` takes a Hub *dataset* id the same way (:func:`resolve_dataset`): its snapshot's data files
(the patterns the caller names: JSONL, JSON, CSV, TSV, text) are downloaded into the cache, and the snapshot is read
as a local data directory.

Every refusal is a ``ValueError`` naming the argument, the value and the fix, raised before any weight is read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lowmem_lightning.remote_code import remote_code_trusted

__all__ = ["NEEDS", "PATH_PREFIXES", "DATASET_URL", "is_repo_id", "split_repo_id", "resolve_pretrained",
           "resolve_dataset", "dataset_parts", "dataset_files", "local_path"]

_CONFIG = ("config.json",)
_MODEL_META = ("config.json", "generation_config.json", "model.safetensors.index.json", "model.safetensors",
               "tokenizer.json")  # its length: ids past it were never trained (modules/untrained_tokens.py)
_TOKENIZER = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
              "*.tiktoken", "chat_template.jinja", "chat_template.json")
NEEDS = {"config": _CONFIG, "weights": _MODEL_META, "tokenizer": _TOKENIZER}
"""What a caller needs from a repo -> the file patterns downloaded (``weights`` adds the shards the index lists)."""

_PICKLES = (".bin", ".pt", ".pth")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"({_NAME}/{_NAME})(?:@([^\s@]+))?")
_RESOLVED: dict[tuple, Path] = {}  # (repo id, revision, need, cache dir, offline) -> snapshot directory
_KIND = {"model": "Hub repo", "dataset": "Hub dataset"}  # repo_type -> how a refusal names the repo


def split_repo_id(value: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` of ``value`` spelled ``org/name`` or ``org/name@revision``; ``None`` when it
    is not a repo id (Hub rules: letters, digits, ``.``, ``_``, ``-``; no ``--`` or ``..``; at most 96 characters
    per part)."""
    match = _REPO_ID.fullmatch(value) if isinstance(value, str) else None
    if match is None or "--" in match.group(1) or ".." in match.group(1) or match.group(1).endswith(".git"):
        return None
    return match.group(1), match.group(2)


def is_repo_id(value: str) -> bool:
    """Whether ``value`` is spelled as a Hub repo id (``org/name`` or ``org/name@revision``)."""
    return split_repo_id(value) is not None


def resolve_pretrained(value: str | Path, argument: str, need: str = "weights") -> Path:
    """The local directory holding ``value``: ``value`` itself when it exists on disk (expanded, unchecked: the
    caller checks its files as it always did), else the snapshot of Hub repo id ``value`` with the files ``need``
    names (a key of :data:`NEEDS`), downloaded unless already in the cache.

    Raises ``ValueError`` naming ``argument`` and ``value`` when ``value`` is neither; when the repo is not in the
    cache while offline (``HF_HUB_OFFLINE=1`` or no network); when it does not exist, is private or gated (log in
    or set ``HF_TOKEN``, accept the license); when the revision does not exist; and, for ``need="weights"``, when
    the repo has no safetensors weights (pickled ``.bin`` weights are refused, as in a local directory).
    """
    if need not in NEEDS:
        raise ValueError(f"Invalid need={need!r}: expected one of {', '.join(NEEDS)}.")
    path = Path(value).expanduser()
    if path.exists():
        return path
    parts = split_repo_id(str(value))
    if parts is None:
        raise ValueError(_no_such_path(argument, str(value), path))
    key = (*parts, need, remote_code_trusted(), *_cache_state())
    if key not in _RESOLVED or not _RESOLVED[key].is_dir():
        _RESOLVED[key] = _resolve_repo(argument, str(value), *parts, need)
    return _RESOLVED[key]


def local_path(value: str | Path, argument: str, need: str) -> Path:
    """``value`` as a local path: itself (expanded) when it exists or is not spelled as a Hub repo id (the caller's
    own checks then name what is wrong with it), else :func:`resolve_pretrained` of the id."""
    path = Path(value).expanduser()
    if path.exists() or not is_repo_id(str(value)):
        return path
    return resolve_pretrained(value, argument, need)


DATASET_URL = "hf://datasets/"
"""How a Hub dataset path starts in ``huggingface_hub``'s file-system notation: ``hf://datasets/ORG/NAME[@REVISION]``
and a file or folder of the repo after it (``hf://datasets/HuggingFaceTB/smoltalk/data/all``)."""


def dataset_parts(value: str) -> tuple[str, str | None, str] | None:
    """``(repo_id, revision or None, path in the repo or "")`` of a Hub dataset id (``org/name[@revision]``) or of a
    :data:`DATASET_URL` path; ``None`` for anything else."""
    if not isinstance(value, str):
        return None
    if not value.startswith(DATASET_URL):
        parts = split_repo_id(value)
        return None if parts is None else (*parts, "")
    org, _, rest = value[len(DATASET_URL):].partition("/")
    name, _, inside = rest.partition("/")
    parts = split_repo_id(f"{org}/{name}")
    inside = inside.strip("/")
    if parts is None or (inside and any(part in ("", ".", "..") for part in inside.split("/"))):
        return None
    return (*parts, inside)


def resolve_dataset(value: str, argument: str, patterns: list[str]) -> Path:
    """The snapshot directory of Hub dataset ``value`` (an id, ``org/name`` or ``org/name@revision``, or a
    :data:`DATASET_URL` path: :func:`dataset_parts`) holding its files that match ``patterns`` (``"*.jsonl"``,
    ``"data/all/*.jsonl"``: at any depth), downloaded into the Hugging Face cache unless cached. The caller has checked
    that ``value`` names no local path. ``ValueError`` naming ``argument`` and ``value`` as :func:`resolve_pretrained`
    raises them (not cached while offline, not found, gated, no such revision)."""
    repo_id, revision, _ = dataset_parts(value)
    key = (repo_id, revision, "dataset", tuple(patterns), *_cache_state())
    if key not in _RESOLVED or not _RESOLVED[key].is_dir():
        _RESOLVED[key] = _download(argument, value, repo_id, revision, list(patterns), "dataset")
    return _RESOLVED[key]


def dataset_files(value: str) -> set[str] | None:
    """The file names (paths in the repo) of Hub dataset ``value`` (:func:`dataset_parts`) from the listing
    huggingface_hub cached while downloading; ``None`` when none is cached."""
    repo_id, revision, _ = dataset_parts(value)
    return _repo_files(repo_id, revision, "dataset")


PATH_PREFIXES = ("./", "../", "/", "~")
"""How a value that is a local path, never a Hub repo id, may start (a repo id starts with a letter or digit)."""


def _no_such_path(argument: str, value: str, path: Path) -> str:
    """The refusal of ``value``, spelled as no Hub repo id, that names no existing path (``path``, expanded)."""
    where = os.path.abspath(path)
    if value.startswith(PATH_PREFIXES):
        return (f"Invalid {argument}={value!r}: no such local directory ({where}); a value starting with "
                f"{', '.join(PATH_PREFIXES[:-1])} or {PATH_PREFIXES[-1]} is a local path, never a Hugging Face Hub "
                "repo id.")
    return (f"Invalid {argument}={value!r}: no such local directory ({where}), and not a Hugging Face Hub repo id "
            "(org/name or org/name@revision, e.g. meta-llama/Llama-2-7b-hf).")


def _neither_local(argument: str, value: str, repo_type: str = "model") -> str:
    """The start of the refusal of Hub-id-shaped ``value`` that the Hub cannot give: it is no local directory
    (or, for a dataset, file) either (what the user may have meant); the Hub's reason follows."""
    local = "directory" if repo_type == "model" else "file or directory"
    return (f"Invalid {argument}={value!r}: no local {local} {value!r} (relative to the working directory "
            f"{Path.cwd()}); as a {_KIND[repo_type]} id: ")


def _cache_state() -> tuple[str, bool]:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE, bool(constants.HF_HUB_OFFLINE)


def _resolve_repo(argument: str, value: str, repo_id: str, revision: str | None, need: str) -> Path:
    """Download (or find in the cache) what ``need`` names; the weights in two steps: config, index or single file,
    then the shards the index lists."""
    own_code = ["*.py"] if remote_code_trusted() else []  # the classes of a config's auto_map, allowed to run
    folder = _download(argument, value, repo_id, revision, [*NEEDS[need], *own_code])
    refuse = _neither_local(argument, value)
    if need != "tokenizer" and not (folder / "config.json").is_file():
        raise ValueError(refuse + _missing("config.json", repo_id, revision))
    if need == "tokenizer" and not any((folder / name).is_file() for name in _TOKENIZER[1:3]):
        raise ValueError(refuse + _missing("tokenizer_config.json", repo_id, revision))
    if need == "weights":
        shards = _indexed_shards(folder / "model.safetensors.index.json")
        if shards:
            folder = _download(argument, value, repo_id, revision, [*NEEDS[need], *own_code, *shards])
            absent = [name for name in shards if not (folder / name).is_file()]
            if absent:
                raise ValueError(refuse + _not_cached(
                    repo_id, revision, f"{len(absent)} of its {len(shards)} safetensors shards ({absent[:2]}) are"))
        elif not (folder / "model.safetensors").is_file():
            raise ValueError(refuse + _no_weights(folder, repo_id, revision))
    return folder


def _download(argument: str, value: str, repo_id: str, revision: str | None, patterns: list[str],
              repo_type: str = "model") -> Path:
    """``snapshot_download`` of ``patterns``; its errors become one-line ``ValueError`` s saying what to do."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises OSError / HTTPError / ValueError subclasses
        problem = _hub_problem(err, repo_id, revision, repo_type)
        if problem is None:
            raise
        raise ValueError(_neither_local(argument, value, repo_type) + problem) from None


def _hub_problem(err: Exception, repo_id: str, revision: str | None, repo_type: str = "model") -> str | None:
    """What went wrong, and the fix, for a huggingface_hub error (``None``: not one of its errors)."""
    from huggingface_hub import errors

    kind = _KIND[repo_type]
    url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    login = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, errors.GatedRepoError):
        return f"{kind} {repo_id!r} is gated: accept its license on {url} and {login}."
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{kind} {repo_id!r} has no revision {revision!r} (a branch, tag or commit of {url})."
    if isinstance(err, errors.RepositoryNotFoundError) or status in (401, 403):
        return (f"{kind} {repo_id!r} was not found or is not accessible (HTTP {status}): check the id; for a "
                f"private or gated repo, {login} and accept its license on {url}.")
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return _not_cached(repo_id, revision, repo_type=repo_type)
    if isinstance(err, (errors.HfHubHTTPError, errors.HFValidationError)):
        return f"the Hub refused {kind} {repo_id!r}: {str(err).strip().splitlines()[0]}"
    return None


def _not_cached(repo_id: str, revision: str | None, what: str | None = None, repo_type: str = "model") -> str:
    """Why the repo (or ``what`` of it, e.g. "its config.json is") cannot be had: offline and not in the cache."""
    cache, offline = _cache_state()
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub cannot be reached"
    at = f" at revision {revision!r}" if revision else ""
    kind = _KIND[repo_type]
    missing = (f"{kind} {repo_id!r}{at} is not in the Hugging Face cache ({cache})" if what is None else
               f"{what} not in the Hugging Face cache ({cache}) for {kind} {repo_id!r}{at}")
    local = "directory" if repo_type == "model" else "file or directory"
    return (f"{why} and {missing}: download it once online{' (unset HF_HUB_OFFLINE)' if offline else ''}, or pass a "
            f"local {local}.")


def _missing(name: str, repo_id: str, revision: str | None) -> str:
    """Why file ``name`` is not in the snapshot: the repo has none, or (its file list unknown) it is not cached."""
    listed = _repo_files(repo_id, revision)
    if listed is not None and name not in listed:
        return f"Hub repo {repo_id!r} has no {name}."
    return _not_cached(repo_id, revision, f"its {name} is")


def _indexed_shards(index: Path) -> list[str]:
    """The shard file names ``index`` lists (none when absent or unreadable: the loader then names the problem)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(weight_map, dict):
        return []
    return sorted({name for name in weight_map.values() if isinstance(name, str)})


def _no_weights(folder: Path, repo_id: str, revision: str | None) -> str:
    """Why snapshot ``folder`` has neither ``model.safetensors`` nor an index: the repo holds pickles (listed by the
    Hub, or cached by another tool) or nothing, or (the repo's file list unknown) the weights are not in the cache."""
    listed = _repo_files(repo_id, revision)
    names = {*(listed or ()), *(p.name for p in folder.iterdir())}
    pickles = sorted(name for name in names if name.endswith(_PICKLES))
    if pickles:
        return (f"Hub repo {repo_id!r} holds PyTorch pickle weights ({pickles[:3]}), not safetensors: load it with "
                "transformers, save_pretrained(DIR, safe_serialization=True) and pass DIR.")
    if listed is None:
        return _not_cached(repo_id, revision, "its weights (model.safetensors or model.safetensors.index.json) are")
    return (f"Hub repo {repo_id!r} has no model.safetensors or model.safetensors.index.json (safetensors "
            "checkpoints only).")


def _repo_files(repo_id: str, revision: str | None, repo_type: str = "model") -> set[str] | None:
    """The repo's file names from the tree listing huggingface_hub cached while downloading; ``None`` when none is
    cached (offline with a cache filled by other means)."""
    from huggingface_hub import errors, get_cached_repo_tree

    try:
        return {entry.path for entry in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=revision)}
    except (errors.CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
