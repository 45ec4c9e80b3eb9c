"""Lightning hooks of training: hardware in the loop, frozen parameters, the progress bar."""

from .hardware_aware import HardwareInTheLoop, TrainablePatterns
from .progress import TrainingProgressBar

__all__ = ["HardwareInTheLoop", "TrainablePatterns", "TrainingProgressBar"]
