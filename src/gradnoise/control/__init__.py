"""Acting on the measured noise: learning-rate rules for a batch-size change and advice
from a run file."""
from . import lr_rules
from .recommend import recommend

__all__ = ["lr_rules", "recommend"]
