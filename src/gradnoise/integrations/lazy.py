"""A class built on first use from a framework that is imported only then (PEP 562):
the adapters' ``NoiseMonitorCallback`` is the framework-free hooks class mixed into the
framework's callback base."""
from __future__ import annotations

from typing import Callable, Optional


class LazyClass:
    """``type(name, (mixin, base()), …)``, built once, on first access.

    Args:
        module: the ``__name__`` of the module that exposes it.
        name: the class's name.
        mixin: the class with the behaviour (its docstring after the first paragraph is
            reused).
        base: returns the framework's base class (importing the framework; its
            ImportError names the extra to install).
        lead: the first paragraph of the class's docstring.
    """

    def __init__(self, module: str, name: str, mixin: type, base: Callable[[], type], lead: str):
        self.module, self.name, self.mixin, self.base, self.lead = module, name, mixin, base, lead
        self.built: Optional[type] = None

    def get(self) -> type:
        if self.built is None:
            doc = self.lead + "\n\n" + (self.mixin.__doc__ or "").split("\n\n", 1)[-1]
            self.built = type(self.name, (self.mixin, self.base()),
                              {"__module__": self.module, "__qualname__": self.name, "__doc__": doc})
        return self.built

    def module_getattr(self, attr: str):
        """The module's ``__getattr__``."""
        if attr == self.name:
            return self.get()
        raise AttributeError(f"module {self.module!r} has no attribute {attr!r}")
