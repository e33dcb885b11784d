"""Frozen embedding tables kept in host memory (``host_embeddings``): under LoRA and QLoRA the input embedding of an
untied model and Gemma 3n's / Gemma 4's per-layer embeddings train nothing, and a step reads only the rows of its
batch. Gemma 3n's and Gemma 4's per-layer tables hold ``vocab x layers x 256`` values: under QLoRA more bytes than
the NF4 linear layers of the E2B / E4B models (``benchmarks/RESULTS.md``).

:class:`HostEmbedding` takes the place of such an ``nn.Embedding`` (or a subclass whose lookup it reproduces, checked
on a probe: Gemma's scaled embeddings): its table stays in page-locked host memory that the GPU reads through unified
virtual addressing, and its forward gathers the batch's rows onto the ids' device
(:func:`~lowmem_lightning.kernels.row_gather.gather_rows`, one Triton launch, no host sync). ``.to(device)``, the
precision plugin's casts and ``load_state_dict`` keep it on the host; ``state_dict()`` still holds ``<name>.weight``,
so checkpoints, ``save_pretrained`` and merged exports are the same files as without it. The table is neither a
parameter nor a buffer: the optimizer, DDP and FSDP never see it (each process keeps its own host copy).

:func:`host_table_names` chooses the tables (frozen, not tied to an output head, in the language model, not a LoRA
target), :func:`hold_embeddings_on_host` swaps them in a built model, and the NF4 loader swaps them in its meta model so
that a table goes from the checkpoint file to host memory without passing through the GPU.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from lowmem_lightning.kernels.row_gather import gather_rows, gather_rows_reference

__all__ = ["HostEmbedding", "host_table_names", "hold_embeddings_on_host", "host_tables", "host_table_bytes"]


class HostEmbedding(nn.Module):
    """A frozen embedding whose table lives in host memory: ``forward(ids)`` is ``table[ids] * embed_scale`` (the
    scale only where the embedding it replaced had one), computed on the ids' device from the rows the ids name.

    Args:
        table: ``num_embeddings x embedding_dim`` floating tensor (host or meta); the module keeps it on the host
            whatever device the model moves to (page-locked when that device is a CUDA GPU).
        padding_idx: The replaced embedding's ``padding_idx`` (kept for code that reads it; nothing trains here).
        embed_scale: The replaced embedding's ``embed_scale`` buffer (Gemma's ``sqrt(hidden)``), or None.
    """

    def __init__(self, table: torch.Tensor, padding_idx: int | None = None, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx
        self.table = table.detach()
        self._page_locked = None  # weakref.finalize of the cudaHostRegister of ``table``, while registered
        self._runs_on = table.device  # the device the model runs on (the table is page-locked for a CUDA one)
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale, persistent=False)
        else:
            self.embed_scale = None

    @property
    def weight(self) -> torch.Tensor:
        """The host table (read-only use: its shape and dtype, as code reads the weight of the embedding it
        replaced)."""
        return self.table

    def extra_repr(self) -> str:
        """``rows, row elements, table on <device> (<dtype>)`` in the module's repr."""
        return f"{self.num_embeddings}, {self.embedding_dim}, table on {self.table.device.type} ({self.table.dtype})"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``input_ids`` (any shape; a NaN row for an id outside the table) on the ids' device, times
        ``embed_scale`` where there is one: ``input_ids.shape + (embedding_dim,)``, the table's dtype."""
        rows = gather_rows(self.table, input_ids)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows

    def set_table(self, table: torch.Tensor, device: torch.device | str | None = None) -> None:
        """Hold ``table`` (checkpoint rows) for a model that runs on ``device`` (default: where the model runs now)."""
        if tuple(table.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"Table of shape {tuple(table.shape)} for a {self.num_embeddings} x "
                             f"{self.embedding_dim} embedding.")
        self._unlock()
        self.table = table.detach().to("cpu") if table.device.type != "meta" else table.detach()
        self._lock_for(device if device is not None else self._runs_on)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        dtype, device = self._target(fn)
        if dtype != self.table.dtype:
            self._unlock()
            self.table = self.table.to(dtype)
        if device.type == "meta" and self.table.device.type != "meta":
            self._unlock()
            self.table = self.table.to("meta")
        self._lock_for(device)
        return self

    def _target(self, fn) -> tuple[torch.dtype, torch.device]:
        """``(dtype, device)`` the model goes to under ``_apply``'s ``fn``, told by two empty probes: a host one and a
        meta one. A move to a real device cannot copy out of the meta probe (it raises): the host probe's device is
        the target. A dtype-only cast (Lightning's precision plugin) leaves each probe where it was: the model stays
        where it runs (a table page-locked for the GPU stays so)."""
        moved = fn(torch.empty(0, dtype=self.table.dtype))
        try:
            from_meta = fn(torch.empty(0, dtype=self.table.dtype, device="meta")).device
        except NotImplementedError:  # "Cannot copy out of meta tensor": a move to a real device
            return moved.dtype, moved.device
        except RuntimeError:  # a function a meta tensor does not take (share_memory_): no move
            return moved.dtype, self._runs_on
        return moved.dtype, (moved.device if moved.device == from_meta else self._runs_on)

    def __getstate__(self):
        """What a copy (``copy.deepcopy``: Lightning's weight averaging; pickling) takes: all but the page-locking,
        which :meth:`__setstate__` redoes for the copy's own table."""
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_page_locked"] = None
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._lock_for(self._runs_on)

    def _lock_for(self, device: torch.device | str) -> None:
        """Page-lock the table for a CUDA ``device`` (mapped into every GPU's address space); unlock it otherwise."""
        device = self._runs_on = torch.device(device)
        if device.type != "cuda" or self.table.device.type != "cpu":
            self._unlock()
            return
        if self._page_locked is None:
            self._page_locked = _page_lock(self.table)
            _check_device_reads(self.table, device)

    def _unlock(self) -> None:
        if self._page_locked is not None:
            self._page_locked()
            self._page_locked = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.table

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            value = state_dict[key]
            if tuple(value.shape) != tuple(self.table.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from "
                                  f"checkpoint, the shape in current model is {tuple(self.table.shape)}.")
            elif self.table.device.type == "meta":
                self.set_table(value.to(self.table.dtype))
            else:
                with torch.no_grad():
                    self.table.copy_(value)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


_HOST_REGISTER_PORTABLE_MAPPED = 3
"""``cudaHostRegisterPortable | cudaHostRegisterMapped``: the pages are locked for every GPU and mapped into their
address space (the kernel reads them through the host pointer under unified virtual addressing)."""


def _page_lock(table: torch.Tensor):
    """``cudaHostRegister`` the table's memory in place (no copy, unlike ``pin_memory()``, whose caching allocator
    rounds a 5.6 GB table up to 8 GB); returns the finalizer that unregisters it. ``RuntimeError`` naming the CUDA
    error when the driver refuses."""
    cudart = torch.cuda.cudart()
    nbytes = table.numel() * table.element_size()
    err = cudart.cudaHostRegister(table.data_ptr(), nbytes, _HOST_REGISTER_PORTABLE_MAPPED)
    if int(err) != 0:
        raise RuntimeError(f"host_embeddings: CUDA could not page-lock a {nbytes / 2**30:.2f} GiB embedding table in "
                           f"host memory (cudaHostRegister error {int(err)}); run without host_embeddings.")
    return weakref.finalize(table, cudart.cudaHostUnregister, table.data_ptr())


def _check_device_reads(table: torch.Tensor, device: torch.device) -> None:
    """Gather the first and last rows of the page-locked ``table`` on ``device`` and compare them with the host's (one
    sync, when the table is placed): ``RuntimeError`` when the GPU did not read them, instead of training on wrong
    rows."""
    ids = torch.tensor([0, table.shape[0] - 1], device=device)
    read = gather_rows(table, ids).cpu()
    if not torch.equal(read, table[[0, table.shape[0] - 1]]):
        raise RuntimeError(f"host_embeddings: {device} did not read the embedding table in host memory correctly "
                           "(unified virtual addressing); run without host_embeddings.")


def _same_lookup(module: nn.Embedding) -> bool:
    """Whether :class:`HostEmbedding` computes what ``module`` does: its forward run on a 4-row probe copy (the
    module's class and buffers, a small random table) equals ``table[ids] * embed_scale`` exactly."""
    scale = getattr(module, "embed_scale", None)
    if scale is not None and not isinstance(scale, torch.Tensor):
        return False
    dtype = module.weight.dtype
    probe = copy.copy(module)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(4, module.embedding_dim, generator=generator).to(dtype)
    probe._parameters = {"weight": nn.Parameter(table, requires_grad=False)}
    probe._buffers = {name: _probe_buffer(buf) for name, buf in module._buffers.items() if buf is not None}
    probe.num_embeddings, probe.padding_idx = 4, None  # padding_idx steers gradients only, not the rows looked up
    ids = torch.tensor([[3, 0, 2], [1, 1, 3]])
    try:
        expected = probe(ids)
    except Exception:  # a subclass whose forward wants more than ids: left on the device
        return False
    ours = gather_rows_reference(table, ids)
    if scale is not None:
        ours = ours * probe._buffers.get("embed_scale", _probe_buffer(scale)).to(ours.dtype)
    return expected.dtype == ours.dtype and torch.equal(expected, ours)


def _probe_buffer(buf: torch.Tensor) -> torch.Tensor:
    """A buffer of the probe: the module's own on the host, or 1.5s in its place on the meta device (a meta model
    has no values; the check is then of what the forward does with them)."""
    return torch.full_like(buf, 1.5, device="cpu") if buf.device.type == "meta" else buf.to("cpu")


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters two modules of ``model`` hold (a tied output head and its input embedding)."""
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def _tied_input_embedding(model: nn.Module) -> nn.Module | None:
    """The input embedding that ``config.tie_word_embeddings`` ties to the output head (before or after
    ``tie_weights``), or None."""
    from lowmem_lightning.multimodal import text_config

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    ties = getattr(config, "tie_word_embeddings", False) or getattr(text_config(config), "tie_word_embeddings", False)
    get = getattr(base, "get_input_embeddings", None)
    if not ties or not callable(get):
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def _is_lora_target(name: str, targets) -> bool:
    if targets is None or isinstance(targets, str):
        return False  # "all-linear" adapts linear layers only
    return any(name == t or name.endswith("." + t) for t in targets)


def host_table_names(model: nn.Module, lora_targets=None, check_frozen: bool = True) -> list[str]:
    """Names of the embeddings of ``model`` that :class:`HostEmbedding` can hold in host memory: ``nn.Embedding``
    modules of the language model that no other module shares (a tied output head reads the whole table), that
    ``lora_targets`` (LoRA's target module names) does not adapt and no peft layer wraps, whose lookup
    :class:`HostEmbedding` reproduces (``max_norm`` and sparse embeddings are left alone) and, with ``check_frozen``,
    whose table trains nothing (``requires_grad=False``; ``False`` for a model LoRA has not frozen yet, whose
    embeddings it will freeze)."""
    from lowmem_lightning.multimodal import language_model_modules

    shared, tied = _shared_parameter_ids(model), _tied_input_embedding(model)
    names = []
    for name, module in language_model_modules(model):
        if not isinstance(module, nn.Embedding) or module is tied or module.max_norm is not None or module.sparse:
            continue
        if name.endswith(".base_layer"):  # a peft layer's base: LoRA (or trained token rows) adapts it
            continue
        weight = module.weight
        if id(weight) in shared or (check_frozen and weight.requires_grad) or _is_lora_target(name, lora_targets):
            continue
        if _same_lookup(module):
            names.append(name)
    return names


def hold_embeddings_on_host(model: nn.Module, names, device: torch.device | str | None = None) -> list[str]:
    """Put a :class:`HostEmbedding` in place of each embedding ``names`` lists (:func:`host_table_names`), its table
    moved to host memory (kept on meta for a meta model) for a model that runs on ``device`` (default: where the
    table was). Returns ``names``."""
    for name in names:
        module = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        weight = module.weight.detach()
        run_on = torch.device(device) if device is not None else weight.device
        table = weight if weight.device.type == "meta" else weight.to("cpu")
        del weight
        hosted = HostEmbedding(table, module.padding_idx, getattr(module, "embed_scale", None))
        hosted.set_table(table, run_on)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, hosted)
    return list(names)


def host_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: table}`` of the :class:`HostEmbedding` modules of ``model``."""
    return {name: m.table for name, m in model.named_modules() if isinstance(m, HostEmbedding)}


def host_table_bytes(model: nn.Module) -> int:
    """Bytes of the tables :class:`HostEmbedding` modules of ``model`` hold in host memory."""
    return sum(t.numel() * t.element_size() for t in host_tables(model).values())
