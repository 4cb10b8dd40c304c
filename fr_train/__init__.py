"""fr_train: distributed training for deep face recognition (see README.md and DESIGN.md)."""

__version__ = "0.1.0"
