"""Adapters for other training frameworks.

Each adapter lives in its own module and imports its framework only when it is used,
so ``import gradnoise`` never needs (or imports) any of them:

* :mod:`gradnoise.integrations.lightning` — ``NoiseMonitorCallback`` for PyTorch
  Lightning's ``Trainer`` (``pip install gradnoise[lightning]``).
"""

__all__: list = []
