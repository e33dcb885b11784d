"""Lightning callbacks, one job each. :class:`LowMemOptimizerCallback` swaps in a low-memory optimizer and
puts the callbacks of the other jobs into the Trainer's list: :class:`FSDP1Check`,
:class:`GradientReleaseCallback` (``step_in_backward``), :class:`StateMemoryMonitor` (also works alone,
with any optimizer), :class:`PreemptionCheckpoint`, :class:`InterruptAtStepEnd`, :class:`ResumeCompatibility` and
:class:`RngStateCheckpoint` (the random generators' states in every checkpoint) and, with ``checkpoint_frozen=False``,
:class:`LeaveOutFrozenBase` (checkpoints without the frozen base; :func:`load_from_checkpoint` loads one).
:class:`StepsAwareRichProgressBar` is a rich progress bar for step-bounded runs in 80-column terminals."""

from .frozen_checkpoint import LeaveOutFrozenBase, load_from_checkpoint
from .interrupt import InterruptAtStepEnd
from .monitor import StateMemoryMonitor
from .optimizer import LowMemOptimizerCallback
from .preemption import PreemptionCheckpoint
from .progress import StepsAwareRichProgressBar
from .release import GradientRelease, GradientReleaseCallback, release_refusal
from .resume import CONVERSIONS, ResumeCompatibility
from .rng_state import RngStateCheckpoint
from .strategy_check import FSDP1Check

__all__ = [
    "CONVERSIONS",
    "FSDP1Check",
    "GradientRelease",
    "GradientReleaseCallback",
    "InterruptAtStepEnd",
    "LeaveOutFrozenBase",
    "LowMemOptimizerCallback",
    "PreemptionCheckpoint",
    "ResumeCompatibility",
    "RngStateCheckpoint",
    "StateMemoryMonitor",
    "StepsAwareRichProgressBar",
    "load_from_checkpoint",
    "release_refusal",
]
