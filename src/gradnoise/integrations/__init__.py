"""Adapters for other training frameworks.

Each adapter lives in its own module and imports its framework only when it is used,
so ``import gradnoise`` never needs (or imports) any of them:

* :mod:`gradnoise.integrations.lightning` — ``NoiseMonitorCallback`` for PyTorch
  Lightning's ``Trainer`` (``pip install gradnoise[lightning]``).
* :mod:`gradnoise.integrations.transformers` — ``NoiseMonitorCallback`` for Hugging Face
  ``transformers.Trainer`` (``pip install gradnoise[transformers]``).
"""

__all__: list = []
