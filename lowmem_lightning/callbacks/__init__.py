"""Lightning callbacks: :class:`LowMemOptimizerCallback` swaps in a low-memory optimizer and logs its
state memory per step."""

from .optimizer import CONVERSIONS, LowMemOptimizerCallback

__all__ = ["CONVERSIONS", "LowMemOptimizerCallback"]
