"""Variance-reduced optimizers as ``torch.optim.Optimizer``: SVRG (snapshot control
variate), STORM (recursive momentum) and MARS (variance-reduced AdamW).

All three need the gradient at a second point (the snapshot or the previous iterate)
on the *same* batch, so their ``step`` takes a closure that recomputes the loss on the
step's batch and calls ``backward``; the optimizer sets the parameters to the other
point, calls the closure, restores them, replays the torch RNG and calls it again at the
current point. MARS with ``exact=False`` (its default) needs no closure.
"""
from .mars import MARS
from .storm import STORM
from .svrg import SVRG

__all__ = ["MARS", "STORM", "SVRG"]
