"""The names the command line offers, without loading a study (or torch): the studies in
the registry's order and the built-in models. ``gradnoise report`` builds its parser from
these and never imports the studies; a test checks them against
:data:`gradnoise.studies.registry.NAMES` and :data:`gradnoise.studies.models.MODELS`.
"""
from __future__ import annotations

STUDY_NAMES = ("law", "trajectory", "critical-batch", "lr-batch", "optimizers", "adaptive", "escape", "lm",
               "federated", "online", "recommend")
MODEL_NAMES = ("mlp", "cnn", "transformer")
