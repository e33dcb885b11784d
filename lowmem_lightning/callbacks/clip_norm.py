"""Lightning's gradient clipping by norm hands its total norm to our optimizer, so the step reads each gradient once.

``Trainer(gradient_clip_val=...)`` (algorithm ``"norm"``) ends in the precision plugin's ``clip_grad_by_norm``,
which calls ``torch.nn.utils.clip_grad_norm_`` over the optimizer's params and drops the total norm it returns;
the step of a :class:`~lowmem_lightning.optim.base.LowMemOptimizer` then reads every gradient once more for its
finite check. Routed here, the plugin's norm clipping runs the same call on the same params (so the clipped
gradients are Lightning's, bit for bit, under every precision: 32, bf16-mixed, bf16-true, 16-mixed after the
``GradScaler`` unscaled them) and hands the norm to :meth:`~lowmem_lightning.optim.base.LowMemOptimizer.use_grad_norm`:
the step skips its own norm pass (a whole-step skip when that norm is inf/NaN).

Only the stock ``Precision.clip_grad_by_norm`` is routed (not FSDP's or any plugin's own), only for our optimizers
(any other optimizer goes through Lightning's own method), and only on the plugin instance, for as long as a fit
(:class:`ClipNormReuse`, a part of :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`) or one clipping
call (:func:`clip_norm_reused`, what :class:`~lowmem_lightning.modules.LowMemModule` uses) lasts. A norm left
behind by a step that never ran (``GradScaler`` skip) is dropped by the optimizer's next ``zero_grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision

from lowmem_lightning.optim.base import LowMemOptimizer

__all__ = ["ClipNormReuse", "clip_norm_reused", "route_clip_norm", "unroute_clip_norm"]

_ATTRIBUTE = "clip_grad_by_norm"


def _lowmem(optimizer) -> LowMemOptimizer | None:
    """The :class:`LowMemOptimizer` behind ``optimizer`` (a raw one or Lightning's wrapper), else ``None``."""
    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, LowMemOptimizer) else None


class _ReusingClipGradByNorm:
    """The plugin's ``clip_grad_by_norm`` while routed: Lightning's call, its norm handed to our optimizer."""

    def __init__(self, plugin: Precision):
        self.plugin = plugin

    def __call__(self, optimizer, clip_val: float) -> None:
        """Clip ``optimizer``'s gradients to a total L2 norm of ``clip_val`` as ``Precision.clip_grad_by_norm``
        does; for our optimizer, the next step reuses that norm for its finite check."""
        lowmem = _lowmem(optimizer)
        if lowmem is None:
            Precision.clip_grad_by_norm(self.plugin, optimizer, clip_val)
            return
        total = torch.nn.utils.clip_grad_norm_(self.plugin.main_params(optimizer), clip_val)
        lowmem.use_grad_norm(total)


def route_clip_norm(plugin: Precision) -> bool:
    """Route ``plugin``'s norm clipping through :class:`_ReusingClipGradByNorm` (on the instance only); ``True``
    if it was routed now, ``False`` when the plugin has a ``clip_grad_by_norm`` of its own (FSDP's, DeepSpeed's,
    a user's) or is already routed."""
    if not isinstance(plugin, Precision) or _ATTRIBUTE in vars(plugin):
        return False
    if getattr(type(plugin), _ATTRIBUTE, None) is not Precision.clip_grad_by_norm:
        return False
    setattr(plugin, _ATTRIBUTE, _ReusingClipGradByNorm(plugin))
    return True


def unroute_clip_norm(plugin: Precision) -> None:
    """Give ``plugin`` its class's ``clip_grad_by_norm`` back (nothing when it was not routed here)."""
    if isinstance(vars(plugin).get(_ATTRIBUTE), _ReusingClipGradByNorm):
        delattr(plugin, _ATTRIBUTE)


@contextmanager
def clip_norm_reused(plugin: Precision) -> Iterator[None]:
    """Inside the block, ``plugin``'s norm clipping hands its norm to our optimizers (:func:`route_clip_norm`);
    restored on exit unless it was routed before."""
    routed = route_clip_norm(plugin)
    try:
        yield
    finally:
        if routed:
            unroute_clip_norm(plugin)


class ClipNormReuse(L.Callback):
    """Routes the Trainer's precision plugin's norm clipping for the whole fit (:func:`route_clip_norm`), so a
    :class:`LowMemOptimizer` step reuses the clipping norm; restored at ``teardown`` (and on an exception).

    The module is not touched: its ``configure_gradient_clipping`` (Lightning's or an override of its own) runs
    as it is; whatever reaches the plugin's norm clipping is routed.
    """

    def __init__(self) -> None:
        self._plugin: Precision | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """For ``fit``: route ``trainer.precision_plugin``'s norm clipping."""
        if stage == "fit":
            self._restore()
            plugin = trainer.precision_plugin
            if route_clip_norm(plugin):
                self._plugin = plugin

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the plugin its own norm clipping back."""
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Give the plugin its own norm clipping back (Lightning skips ``teardown`` after an exception)."""
        self._restore()

    def _restore(self) -> None:
        if self._plugin is not None:
            unroute_clip_norm(self._plugin)
            self._plugin = None
