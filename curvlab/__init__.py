"""curvlab: matrix-free curvature and second-order optimization on ``torch.func``."""

from curvlab import func

__version__ = "0.1.0"
__all__ = ["func"]
