"""Acting on the measured noise: learning-rate rules for a batch-size change, advice from
a run file, AdaScale (the learning rate follows the noise during training) and the
AdaptiveBatchSampler (so does the batch size)."""
from . import batch_rules, lr_rules, recommend
from .adascale import AdaScale
from .batch_plan import Step
from .batch_size import AdaptiveBatchSampler
from .recommend import advise

__all__ = ["AdaScale", "AdaptiveBatchSampler", "Step", "advise", "batch_rules", "lr_rules", "recommend"]
