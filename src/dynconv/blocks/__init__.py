"""Building blocks with a choice of convolution type."""

from . import yolo

__all__ = ["yolo"]
