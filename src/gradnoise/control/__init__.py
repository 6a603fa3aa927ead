"""Acting on the measured noise: learning-rate rules for a batch-size change, advice from
a run file, and AdaScale (the learning rate follows the noise during training)."""
from . import lr_rules, recommend
from .adascale import AdaScale
from .recommend import advise

__all__ = ["AdaScale", "advise", "lr_rules", "recommend"]
