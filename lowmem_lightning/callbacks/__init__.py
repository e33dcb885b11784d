"""Lightning callbacks: :class:`LowMemOptimizerCallback` swaps in a low-memory optimizer and logs its
state memory per step;
:class:`StepsAwareRichProgressBar` is a rich progress bar for step-bounded runs in 80-column terminals."""

from .optimizer import CONVERSIONS, LowMemOptimizerCallback
from .progress import StepsAwareRichProgressBar

__all__ = ["CONVERSIONS", "LowMemOptimizerCallback", "StepsAwareRichProgressBar"]
