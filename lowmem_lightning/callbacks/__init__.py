"""Lightning callbacks: :class:`LowMemOptimizerCallback` swaps in a low-memory optimizer (optionally
stepping it inside backward: :class:`GradientRelease`) and logs its state memory through a
:class:`StateMemoryMonitor`, which also works alone with any optimizer;
:class:`StepsAwareRichProgressBar` is a rich progress bar for step-bounded runs in 80-column terminals."""

from .monitor import StateMemoryMonitor
from .optimizer import CONVERSIONS, LowMemOptimizerCallback
from .progress import StepsAwareRichProgressBar
from .release import GradientRelease, release_refusal

__all__ = [
    "CONVERSIONS",
    "GradientRelease",
    "LowMemOptimizerCallback",
    "StateMemoryMonitor",
    "StepsAwareRichProgressBar",
    "release_refusal",
]
