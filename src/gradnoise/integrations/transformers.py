"""Hugging Face ``transformers``: the gradient noise of every optimizer step of
``Trainer.train``.

Usage::

    from gradnoise.integrations.transformers import NoiseMonitorCallback

    noise = NoiseMonitorCallback(source="per_sample", sinks=["run.jsonl"])
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    noise.attach(trainer)              # or Trainer(callbacks=[noise]), see "Logging"
    trainer.train()
    noise.last.smoothed.b_simple

The callback wraps a :class:`~gradnoise.NoiseMonitor` around ``trainer.model`` when
training begins and closes it when training ends. Each optimizer step is closed in
``on_pre_optimizer_step`` (transformers ≥ 4.45), after all the step's backward passes and
just before ``optimizer.step()``.

Gradient clipping. The Trainer clips (``max_grad_norm``, 1.0 by default) *before*
``on_pre_optimizer_step``. The callback keeps each parameter's squared gradient norm at
the end of every backward pass (post-accumulate-grad hooks, on measured steps) and, when
clipping changed a gradient, gives it back its unclipped norm for the measurement only
(``g·sqrt(pre/post)``, exact up to rounding): the clipped gradients are copied aside and
restored bit for bit afterwards, so the optimizer gets what it would have got.

What is measured (DESIGN.md §1, ``reduction="mean"``). Whatever the Trainer's loss
normalisation, sample ``i``'s loss is taken to be ``l_i = B·w_i·ℓ̄_i``: ``ℓ̄_i`` is its mean
token (or sample) loss, ``w_i`` the weight the step's backward loss gives it and ``B`` the
step's samples over all micro-batches. ``Σ_i w_i ∇ℓ̄_i`` is the gradient the optimizer
gets, so the mean of the ``g_i = ∇l_i`` is exactly that gradient, and ``l_i = ℓ̄_i`` when
every sample weighs ``1/B``. Which weights the Trainer uses depends on the model and the
transformers version:

* A model whose ``forward`` takes ``**kwargs`` gets ``num_items_in_batch`` (transformers
  ≥ 4.46), the token count ``N`` of the whole step, and returns ``Σ_tokens ℓ / N``:
  ``w_i = n_i/N``, so ``l_i = (n_i/n̄)·ℓ̄_i`` with ``n̄ = N/B`` (the per-sequence mean loss
  when the sequences have equal token counts).
* A model that returns a plain mean over its micro-batch (read from the loss's autograd
  node) has its loss multiplied by ``s_j`` in the backward pass — normally ``1/k`` for the
  step's ``k`` micro-batches. The callback reads each ``s_j`` (a hook on the returned
  loss) and checks it: ``Σ_j s_j > 1`` means the step's gradient is ``Σ s_j`` times the
  mean and is refused with the fix. That happens with ``k ≥ 2`` for a model that takes
  ``num_items_in_batch`` but ignores it (many classification heads: set
  ``model.accepts_loss_kwargs = False`` before building the Trainer) and, on transformers
  4.46–4.49, for one that takes no loss kwargs. Unequal ``s_j/b_j`` (micro-batches of
  unequal sizes averaged with equal weights) or ``Σ s_j < 1`` (transformers 4.45 on an
  epoch's short last step) keep the definition above exact but the samples unequally
  weighted: a warning says so once (``dataloader_drop_last=True`` avoids uneven
  micro-batches).
* The model must compute its loss in ``forward`` (from ``labels``), or ``compute_loss``
  must call ``trainer.model`` once per micro-batch; ``reduction="sum"`` is for a model
  whose loss is a plain sum over samples.

Logging. In ``on_log`` the latest record's ``metrics(per_param)``, keys renamed from
``noise/…`` to ``gradnoise/…`` (``gradnoise/b_simple``, ``gradnoise/raw/trace_cov``, …), are
merged into each training log (the ones carrying ``"loss"``; evaluation logs are left
alone) and into its ``trainer.state.log_history`` entry. Callbacks run in list order and
the Trainer puts its reporting integrations (``report_to``) before those passed as
``callbacks=``: :meth:`attach` puts this callback first, so every integration sees the
values. Records also go to ``sinks``.

Checkpoints. The monitor's state (step counter and averages) is kept in
``trainer.state.stateful_callbacks["gradnoise"]``, so it is written into every
checkpoint's ``trainer_state.json`` and read back by
``trainer.train(resume_from_checkpoint=...)``. (``ExportableState`` is not used: the
Trainer restores those only with ``restore_callback_states_from_checkpoint=True``, and then
by building a new callback from JSON arguments, which would drop sinks and the object
the user holds; with that flag set the Trainer logs that it ignores the "gradnoise"
entry, which is harmless.) The monitor's step counter equals ``state.global_step``.

``torch_compile=True`` works: measured steps run the compiled model eagerly, the others
compiled (:mod:`gradnoise.capture.compiled`).

Refused, each with a one-line :class:`~gradnoise.GradNoiseError` when training begins:
more than one process or GPU (DDP, DataParallel; the callback watches ``trainer.model``
while the Trainer calls its wrapper), FSDP, DeepSpeed and tensor/context parallelism
(sharded parameters or gradients), ``fp16`` (GradScaler; ``bf16`` autocast needs
nothing), gradient checkpointing with ``source="per_sample"`` (the
recomputation runs outside the forward the engine watches; ``"microbatch"`` works),
``source="microbatch"`` with ``gradient_accumulation_steps < 2`` and ``source="ddp"``.

If ``train()`` raises, the Trainer calls no callback: the hooks stay on the model until
the next ``train()`` or :meth:`close`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable, Optional

from torch import nn

from ..errors import GradNoiseError
from ..monitor import NoiseMonitor, StepRecord
from ..monitor.monitor import check_options
from .lazy import LazyClass
from .hf_steps import ForwardLog, PreClipNorms, StepCalls

__all__ = ["NoiseMonitorCallback"]

INSTALL_HINT = "pip install gradnoise[transformers]"
STATE_KEY = "gradnoise"  # the entry of TrainerState.stateful_callbacks holding the monitor
PREFIX = "gradnoise/"


def load_transformers():
    """The ``transformers`` package, checked to have ``on_pre_optimizer_step`` (4.45+).

    Raises:
        ImportError: transformers is missing or too old.
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "gradnoise.integrations.transformers needs Hugging Face transformers: " + INSTALL_HINT
        ) from e
    if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):
        raise ImportError(
            f"gradnoise.integrations.transformers needs transformers ≥ 4.45 (on_pre_optimizer_step); "
            f"found {transformers.__version__}: " + INSTALL_HINT
        )
    return transformers


# ---------------------------------------------------------------------------- refusals
def check_setup(args, model: Optional[nn.Module], source: str) -> None:
    """Refuse what the callback cannot measure exactly, with a one-line message.

    Args:
        args: the Trainer's ``TrainingArguments``.
        model: ``trainer.model``.
        source: the monitor's source.

    Raises:
        GradNoiseError: the first unsupported setting found (module docstring).
    """
    if model is None:
        raise GradNoiseError("NoiseMonitorCallback got no model from the Trainer at on_train_begin")
    problem = _sharding_problem(args) or _process_problem(args) or _option_problem(args, model, source)
    if problem:
        raise GradNoiseError(f"NoiseMonitorCallback: {problem}")


def _sharding_problem(args) -> Optional[str]:
    if getattr(args, "deepspeed", None):
        return "DeepSpeed owns (and shards) the gradients, so they cannot be measured; train without deepspeed="
    if getattr(args, "fsdp", None):
        return f"FSDP (fsdp={args.fsdp!r}) shards parameters and gradients, so they cannot be measured; train without fsdp="
    if getattr(args, "parallelism_config", None) is not None:
        return "tensor/context parallelism (parallelism_config) shards the model, so it cannot be measured"
    return None


def _process_problem(args) -> Optional[str]:
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1:
        return (f"this Trainer runs {world} processes (DDP); the callback supports one process on one device, "
                "as the Trainer calls a wrapper of the model it watches")
    if int(getattr(args, "n_gpu", 1) or 1) > 1:
        return f"this Trainer uses DataParallel over {args.n_gpu} GPUs; make one visible (CUDA_VISIBLE_DEVICES)"
    return None


def _option_problem(args, model: nn.Module, source: str) -> Optional[str]:
    if source == "ddp":
        return "source='ddp' needs DDP, which this callback does not support; use 'per_sample' or 'microbatch'"
    if getattr(args, "fp16", False) or getattr(args, "mixed_precision", None) == "fp16":
        return "fp16 (GradScaler loss scaling) is not supported; train with bf16=True or in fp32"
    if source == "microbatch" and int(args.gradient_accumulation_steps) < 2:
        return ("source='microbatch' takes the step's micro-batches as groups and needs "
                f"gradient_accumulation_steps ≥ 2 (got {args.gradient_accumulation_steps})")
    if source == "per_sample" and _checkpointing(args, model):
        return ("gradient checkpointing recomputes layers in the backward pass, outside the forward the per-sample "
                "engine watches; use source='microbatch' or turn checkpointing off")
    return None


def _checkpointing(args, model: nn.Module) -> bool:
    """Gradient (activation) checkpointing asked for by the arguments or on the model."""
    if getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False):
        return True
    # transformers 5 renamed the model's flag (the old name warns)
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


# ------------------------------------------------------------------------- the callback
class NoiseMonitorHooks:
    """The callback's behaviour; :class:`NoiseMonitorCallback` adds transformers'
    ``TrainerCallback`` base (imported on first use).

    Args:
        source: ``"per_sample"`` (exact per-sample norms) or ``"microbatch"`` (each
            accumulated micro-batch is a group: needs ``gradient_accumulation_steps ≥ 2``;
            works with BatchNorm and gradient checkpointing).
        every: measure every ``every``-th optimizer step.
        beta: EMA decay of the smoothed statistics.
        reduction: ``"mean"`` for the Trainer's usual mean losses (module docstring),
            ``"sum"`` when the model returns the sum of its samples' losses.
        sinks: where records go besides the Trainer's logs (paths ending in
            ``.jsonl``/``.csv`` or sink objects, see :mod:`gradnoise.monitor.sinks`).
        per_param: also log ``gradnoise/<stat>/<parameter>`` (3 keys per parameter, off by
            default: the console printer shows every logged key).
        log: merge the metrics into the Trainer's training logs.

    Attributes:
        monitor: the :class:`~gradnoise.NoiseMonitor` of the current (or last) run.
        last: the latest :class:`~gradnoise.StepRecord`, or None.
    """

    def __init__(
        self,
        source: str = "per_sample",
        every: int = 1,
        beta: float = 0.95,
        reduction: str = "mean",
        sinks: Iterable = (),
        per_param: bool = False,
        log: bool = True,
    ):
        check_options(source, reduction, every)
        self.source, self.every, self.beta, self.reduction = source, int(every), beta, reduction
        self.sinks = list(sinks)
        self.per_param, self.log = per_param, log
        self.monitor: Optional[NoiseMonitor] = None
        self.last: Optional[StepRecord] = None
        self._unlogged: Optional[StepRecord] = None
        self._forwards: Optional[ForwardLog] = None
        self._norms: Optional[PreClipNorms] = None
        self._open = False
        self._warned: set = set()

    def attach(self, trainer) -> "NoiseMonitorHooks":
        """Add this callback to ``trainer`` ahead of its other callbacks, so that the noise
        metrics it merges into each training log reach every reporting integration.

        Returns:
            self.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    # ---- lifetime ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.close()
        check_setup(args, model, self.source)
        self.monitor = NoiseMonitor(model, source=self.source, sinks=self.sinks, every=self.every,
                                    beta=self.beta, reduction=self.reduction, optimizer=kwargs.get("optimizer"))
        self._open = True
        try:
            self._resume(state)
            self._forwards = ForwardLog(model)
            if args.max_grad_norm and args.max_grad_norm > 0:
                params = {n: p for n, p in model.named_parameters() if p.requires_grad}
                self._norms = PreClipNorms(params)
                self._norms.live = self._measured_next()
        except BaseException:
            self.close()
            raise
        self.last, self._unlogged, self._warned = None, None, set()

    def _resume(self, state) -> None:
        """Continue the monitor saved in ``state`` (a resumed checkpoint), or start its
        step counter at ``state.global_step``; then keep its state in ``state``."""
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is None:
            saved = dict(self.monitor.state_dict(), step=int(state.global_step))
        self.monitor.load_state_dict(saved)
        self._keep(state)

    def _keep(self, state) -> None:
        if state.stateful_callbacks is None:
            state.stateful_callbacks = {}
        state.stateful_callbacks[STATE_KEY] = self.monitor.state_dict()

    def _measured_next(self) -> bool:
        return self.monitor is not None and self.monitor.step_index % self.monitor.every == 0

    def close(self) -> None:
        """Remove every hook from the model and close the sinks (the end of training
        does it; the monitor's counter, averages and ``last`` stay readable)."""
        for part in (self._forwards, self._norms):
            if part is not None:
                part.close()
        self._forwards = self._norms = None
        if self.monitor is not None and self._open:
            self.monitor.close()
        self._open = False

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.close()

    # ---- each step -------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        monitor = self.monitor
        if monitor is None or not self._open:
            return
        try:
            rec = self._close_step()
        except BaseException:
            self.close()  # training stops here: leave nothing on the model
            raise
        self._keep(state)
        if rec is not None:
            self.last = self._unlogged = rec

    def _close_step(self) -> Optional[StepRecord]:
        """Check the step's micro-batches and close the monitor's step, measuring the
        gradients as they were before clipping."""
        seen = self._forwards.take()
        if self._measured_next():
            self._check_step(seen)
        with self._norms.restored() if self._norms is not None else contextlib.nullcontext():
            rec = self.monitor.step(loss=seen.loss())
        if self._norms is not None:
            self._norms.live = self._measured_next()
        return rec

    def _check_step(self, seen: StepCalls) -> None:
        """Refuse or warn about a measured step whose loss weights are not what the
        monitor's ``reduction="mean"`` assumes (module docstring)."""
        if not seen.sizes:
            raise GradNoiseError(
                "NoiseMonitorCallback: trainer.model's forward did not run during this optimizer step, so nothing "
                "was measured (does compute_loss call another module?)"
            )
        scales = seen.mean_loss_scales() if self.reduction == "mean" else None
        if scales is None:
            return
        total = sum(scales)
        if total > 1 + 1e-6:
            raise GradNoiseError(
                f"NoiseMonitorCallback: the Trainer weighted this step's {len(scales)} micro-batch mean losses by "
                f"{scales}, so its gradient is {total:g}× their mean (a model that takes num_items_in_batch but "
                "returns a mean loss, or transformers < 4.50): set model.accepts_loss_kwargs = False before building "
                "the Trainer (transformers ≥ 4.50 then divides by the accumulation steps)"
            )
        per_sample = [s / b for s, b in zip(scales, seen.sizes) if b]
        if total < 1 - 1e-6 or max(per_sample) > min(per_sample) * (1 + 1e-6):
            self._warn_once("weights", (
                f"gradnoise: the Trainer weighted micro-batch mean losses of sizes {seen.sizes} by {scales}: the "
                "samples of this step count unequally (or in all less than once) in the measured noise; "
                "dataloader_drop_last=True avoids uneven micro-batches"))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def metrics(self, record: StepRecord) -> Dict[str, float]:
        """``record.metrics(per_param)`` with keys ``gradnoise/…`` instead of ``noise/…``."""
        return {PREFIX + k.split("/", 1)[1]: v for k, v in record.metrics(self.per_param).items()}

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        rec = self._unlogged
        if not self.log or rec is None or logs is None or "loss" not in logs:
            return
        self._unlogged = None
        entry = state.log_history[-1] if state.log_history else None
        values = self.metrics(rec)
        logs.update(values)
        if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
            entry.update(values)


CALLBACK = LazyClass(
    __name__, "NoiseMonitorCallback", NoiseMonitorHooks, lambda: load_transformers().TrainerCallback,
    "transformers ``TrainerCallback`` measuring the gradient noise of every optimizer step (module docstring of "
    ":mod:`gradnoise.integrations.transformers`).")
__getattr__ = CALLBACK.module_getattr
