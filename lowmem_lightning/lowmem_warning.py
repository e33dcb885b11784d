"""The category of every warning lowmem-lightning raises itself.

``LowMemWarning`` subclasses ``UserWarning``, so a filter on ``UserWarning`` still catches ours, and a Python user
can silence or escalate exactly ours: ``warnings.filterwarnings("ignore", category=LowMemWarning)``. The ``lowmem``
command prints them as one line, ``lowmem: warning: MESSAGE``, as it prints its notices
(:func:`lowmem_lightning.cli.messages.our_warnings_in_one_line`); the library itself never changes how warnings show.
"""

from __future__ import annotations

__all__ = ["LowMemWarning"]


class LowMemWarning(UserWarning):
    """A warning raised by lowmem-lightning itself (its optimizers, kernels, callbacks, modules, data, quantization):
    the run goes on, but something is likely not what the user meant (a setting that saves no memory, tensors
    skipped, a compile that fell back to eager)."""
