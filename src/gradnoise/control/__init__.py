"""Acting on the measured noise: learning-rate rules for a batch-size change, advice from
a run file, AdaScale (the learning rate follows the noise during training), the
AdaptiveBatchSampler (so does the batch size), and a batch-size schedule built from a
run file (:mod:`~gradnoise.control.schedule`; its Megatron ramp-up in
:mod:`~gradnoise.control.megatron`), which the sampler can follow in its fixed mode."""
from . import batch_rules, lr_rules, megatron, recommend, schedule
from .adascale import AdaScale
from .batch_plan import Step
from .batch_size import AdaptiveBatchSampler
from .recommend import advise
from .schedule import Schedule, Segment

__all__ = ["AdaScale", "AdaptiveBatchSampler", "Schedule", "Segment", "Step", "advise", "batch_rules", "lr_rules",
           "megatron", "recommend", "schedule"]
