"""Acting on the measured noise: learning-rate rules for a batch-size change and advice
from a run file."""
from . import lr_rules, recommend
from .recommend import advise

__all__ = ["advise", "lr_rules", "recommend"]
