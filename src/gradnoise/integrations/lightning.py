"""PyTorch Lightning: the gradient noise of every optimizer step of ``Trainer.fit``.

Usage::

    from gradnoise.integrations.lightning import NoiseMonitorCallback

    noise = NoiseMonitorCallback(source="per_sample", sinks=["run.jsonl"])
    trainer = Trainer(callbacks=[noise], log_every_n_steps=10)
    trainer.fit(model)
    noise.last.smoothed.b_simple

The callback wraps a :class:`~gradnoise.NoiseMonitor` around the LightningModule when
fitting starts and closes it when fitting ends (or fails). Each optimizer step is closed
in ``on_before_optimizer_step``, after all backward passes of the step and before
Lightning clips the gradients and steps the optimizer. The record's
``metrics(per_param)`` are logged with ``LightningModule.log_dict(on_step=True)`` (so
they reach every logger at the Trainer's ``log_every_n_steps``); the records also go to
``sinks`` on global rank 0. The monitor's step counter and averages are saved in
checkpoints and restored by ``Trainer.fit(ckpt_path=...)``.

Conventions and limits:

* Lightning divides each training batch's loss by ``accumulate_grad_batches`` before
  ``backward``: with a loss that is the mean over the batch's samples this is
  ``reduction="mean"`` when the accumulated batches have equal sizes (an uneven last
  batch of an epoch is then weighted slightly off).
* ``source="per_sample"`` and ``"microbatch"`` watch the LightningModule's own
  ``forward``: ``training_step`` must call ``self(...)`` once per training batch. When it
  calls a child instead (``self.net(x)``), pass ``module="net"``.
* ``precision="16-mixed"`` (GradScaler): Lightning unscales the gradients before
  ``on_before_optimizer_step`` while the per-sample (or per-micro-batch) norms were taken
  on the scaled loss; the callback puts the scale back into the gradients for the
  measurement, then removes it again (exactly, for the scaler's power-of-two scales, and
  from a copy otherwise), and the monitor divides it out of both moments.
  ``"bf16-mixed"`` (the CPU form of ``"16-mixed"``) needs nothing.
* ``trainer.fit(torch.compile(module))`` and compiled children work: measured steps run
  the compiled code eagerly, the others compiled (:mod:`gradnoise.capture.compiled`).
* Strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``).
  Under DDP the monitor watches the ``DistributedDataParallel`` model: ``"per_sample"``
  all-reduces the per-sample sums, ``"ddp"`` takes ranks as groups and installs DDP's
  communication hook (so a strategy given its own ``ddp_comm_hook`` cannot use it).
  ``"microbatch"`` is refused under DDP: its per-pass norms are local while the final
  gradient is the ranks' average. Sharded strategies (FSDP, DeepSpeed) are refused.
* One optimizer: the step of a second optimizer would close the first one's step.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterable, List, Optional

import torch
from torch import nn

from ..errors import GradNoiseError
from ..monitor import NoiseMonitor, StepRecord
from ..monitor.monitor import check_options
from .lazy import LazyClass

__all__ = ["NoiseMonitorCallback"]

INSTALL_HINT = "pip install gradnoise[lightning]"
# the names DDP and Lightning's DDP wrapper put in front of the module's parameter names
_WRAPPER_PREFIX = "module._forward_module."


def load_lightning():
    """The ``lightning.pytorch`` package, or ``pytorch_lightning`` when only that one is
    installed.

    Raises:
        ImportError: neither is installed.
    """
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as e:
            raise ImportError(
                "gradnoise.integrations.lightning needs PyTorch Lightning: " + INSTALL_HINT
            ) from e
    return pl


class NoiseMonitorHooks:
    """The callback's behaviour; :class:`NoiseMonitorCallback` adds Lightning's
    ``Callback`` base (imported on first use).

    Args:
        source: ``"per_sample"``, ``"microbatch"`` (each accumulated training batch is a
            group: needs ``accumulate_grad_batches ≥ 2``) or ``"ddp"`` (each rank is a
            group: needs a DDP strategy with ≥ 2 processes).
        every: measure every ``every``-th optimizer step.
        beta: EMA decay of the smoothed statistics.
        reduction: ``"mean"`` when ``training_step`` returns the mean loss over the batch's
            samples, ``"sum"`` when it returns their sum.
        sinks: where records go besides the Lightning loggers (paths ending in
            ``.jsonl``/``.csv`` or sink objects, see :mod:`gradnoise.monitor.sinks`);
            written on global rank 0 only.
        per_param: also log ``noise/<stat>/<parameter>``.
        log: log the record's metrics through ``LightningModule.log_dict``.
        module: dotted name of the LightningModule's child whose ``forward`` runs once
            per training batch, when ``training_step`` does not call ``self(...)``
            (per-sample and micro-batch sources on a single device).
        batch_size: ``f(batch) -> int`` samples of a training batch, for the micro-batch
            and DDP sources; default: dim 0 of the batch's first tensor.

    Attributes:
        monitor: the :class:`~gradnoise.NoiseMonitor` of the current (or last) fit.
        last: the latest :class:`~gradnoise.StepRecord`, or None.
    """

    def __init__(
        self,
        source: str = "per_sample",
        every: int = 1,
        beta: float = 0.95,
        reduction: str = "mean",
        sinks: Iterable = (),
        per_param: bool = True,
        log: bool = True,
        module: Optional[str] = None,
        batch_size: Optional[Callable[[Any], int]] = None,
    ):
        check_options(source, reduction, every)
        self.source, self.every, self.beta, self.reduction = source, int(every), beta, reduction
        self.sinks = list(sinks)
        self.per_param, self.log, self.module, self.batch_size = per_param, log, module, batch_size
        self.monitor: Optional[NoiseMonitor] = None
        self.last: Optional[StepRecord] = None
        self._open = False
        self._pending: Optional[dict] = None  # monitor state from a checkpoint, not yet applied
        self._hook = None
        self._sizes: List[Optional[int]] = []  # samples of each training batch of this step
        self._forwards = 0  # grad-enabled forward calls of the watched module this step
        self._losses: List[torch.Tensor] = []  # this step's (accumulation-scaled) losses
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source, every=self.every, module=self.module)

    # ---- lifetime ------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._close()
        if len(trainer.optimizers) > 1:
            raise GradNoiseError(
                f"NoiseMonitorCallback measures one optimizer's steps; this run has "
                f"{len(trainer.optimizers)} optimizers"
            )
        target = self._target(trainer, pl_module)
        self.monitor = NoiseMonitor(
            target,
            source=self.source,
            sinks=self.sinks if trainer.is_global_zero else (),
            every=self.every,
            beta=self.beta,
            reduction=self.reduction,
            scaler=_scaler(trainer),
            optimizer=trainer.optimizers[0] if trainer.optimizers else None,
        )
        self._open = True
        if self._pending is not None:
            self.monitor.load_state_dict(self._pending)
            self._pending = None
        self._hook = target.register_forward_pre_hook(self._count_forward)
        self._sizes, self._forwards, self._losses = [], 0, []

    def _target(self, trainer, pl_module) -> nn.Module:
        """The module the monitor watches: the DDP model under DDP, otherwise the
        LightningModule or its child ``module``."""
        wrapped = trainer.strategy.model
        ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
        if self.source == "ddp" and not ddp:
            raise GradNoiseError(
                "source='ddp' needs a DDP strategy (Trainer(strategy='ddp' or 'ddp_spawn', "
                f"devices ≥ 2)); this trainer's model is a {type(wrapped).__name__}. "
                "On one device use source='per_sample', or 'microbatch' with accumulate_grad_batches ≥ 2"
            )
        if ddp:
            if self.source == "microbatch":
                raise GradNoiseError(
                    "source='microbatch' cannot be used under DDP: its per-batch norms are "
                    "local to a rank while the step's gradient is the ranks' average; use "
                    "source='ddp' or 'per_sample'"
                )
            return wrapped
        if wrapped is not None and wrapped is not pl_module:
            raise GradNoiseError(
                f"NoiseMonitorCallback supports single-device and DDP strategies; "
                f"{type(trainer.strategy).__name__} wraps the model in a {type(wrapped).__name__}"
            )
        return pl_module.get_submodule(self.module) if self.module else pl_module

    def _count_forward(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._forwards += 1

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None and self._open:
            self.monitor.close()
        self._open = False

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    # ---- each step -------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._open and self.source != "per_sample":
            self._sizes.append(self.batch_size(batch) if self.batch_size else _first_dim(batch))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        """Lightning's loss here is already divided by ``accumulate_grad_batches``: the
        step's losses add up to their mean."""
        if self._open and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()).float())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        monitor = self.monitor
        if monitor is None or not self._open:
            return
        losses, self._losses = self._losses, []
        measured = monitor.step_index % monitor.every == 0
        sizes, forwards = self._sizes, self._forwards
        self._sizes, self._forwards = [], 0
        if measured and forwards == 0 and self.source != "ddp":
            name = f"'{self.module}'" if self.module else "the LightningModule"
            raise GradNoiseError(
                f"the forward of {name} did not run during this optimizer step, so nothing "
                "was measured: call self(...) in training_step, or pass "
                "NoiseMonitorCallback(module='<child>') naming the child module it calls"
            )
        samples = None
        if self.source != "per_sample" and sizes and None not in sizes:
            samples = sizes if self.source == "microbatch" else sum(sizes)
        with _scale_restored(monitor.scaler, optimizer):
            rec = monitor.step(samples, loss=torch.stack(losses).sum() if losses else None)
        if rec is None:
            if measured and not self._warned:
                self._warned = True
                warnings.warn(
                    f"gradnoise: optimizer step {monitor.step_index - 1} was to be measured but "
                    "no gradient was seen (did training_step skip the backward pass?)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return
        self.last = rec
        if self.log:
            metrics = {k.replace(_WRAPPER_PREFIX, ""): v for k, v in rec.metrics(self.per_param).items()}
            # without a logger the values still reach trainer.callback_metrics
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, logger=bool(trainer.loggers))

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        return {"monitor": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("monitor")
        if state is None:
            return
        if self._open:
            self.monitor.load_state_dict(state)
        else:
            self._pending = state


def _first_dim(batch) -> Optional[int]:
    """Dim 0 of the first tensor (with a dim) of a batch, searched depth-first through
    tuples, lists and dicts; None when there is none."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _first_dim(item)
        if n is not None:
            return n
    return None


def _scaler(trainer):
    """The precision plugin's GradScaler, when it scales the loss."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _was_unscaled(scaler, optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran for this step (Lightning does it before
    ``on_before_optimizer_step`` unless the optimizer unscales inside its own step)."""
    try:
        from torch.amp.grad_scaler import OptState

        return scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED
    except (ImportError, AttributeError, KeyError):
        return not getattr(optimizer, "_step_supports_amp_scaling", False)


@contextlib.contextmanager
def _scale_restored(scaler, optimizer):
    """Inside the block, the gradients of ``optimizer`` carry the loss scale again (the
    monitor removes it from both moments); afterwards they are as they were."""
    if scaler is None or not _was_unscaled(scaler, optimizer):
        yield
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    scale = float(scaler.get_scale())
    exact = math.frexp(scale)[0] == 0.5  # a power of two: g·S/S == g
    saved = None if exact else [g.clone() for g in grads]
    torch._foreach_mul_(grads, scale)
    try:
        yield
    finally:
        if exact:
            torch._foreach_mul_(grads, 1.0 / scale)
        else:
            for g, s in zip(grads, saved):
                g.copy_(s)


CALLBACK = LazyClass(
    __name__, "NoiseMonitorCallback", NoiseMonitorHooks, lambda: load_lightning().Callback,
    "Lightning ``Callback`` measuring the gradient noise of every optimizer step (module docstring of "
    ":mod:`gradnoise.integrations.lightning`).")
__getattr__ = CALLBACK.module_getattr
