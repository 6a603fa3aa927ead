"""Per-sample information from one backward pass: the capture context, the rule table
(one small file per layer family) and the torch.func fallback."""
from .context import Capture, capture

__all__ = ["Capture", "capture"]
