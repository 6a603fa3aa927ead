"""Section of probe files (``gradnoise probe``): the critical batch measured by branching
short runs from one checkpoint at several batch sizes, and the noise scale ``B_simple``
calibrated against it.

Every number comes from the file as written (:mod:`gradnoise.formats`, ``gradnoise-probe``);
the only arithmetic here is ``E = B·S`` for the examples of a median step count. A number
the file leaves ``null`` is shown as "—" with the file's ``reason`` (or why it is missing).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import html as h
from .figures import Plot
from .files import Input
from .fmt import (DASH, fmt_count, fmt_factor_interval, fmt_lr, fmt_num, fmt_text, fmt_with_interval, slug, to_float)
from .line import anchor
from .probe_figures import batch_sizes, chosen, probe_figure

Items = Sequence[Tuple[str, Input]]
Probe = Dict[str, Any]

TITLE = "Probe: the critical batch measured by branching"
PROBE_TEXT = (
    "From one checkpoint of the run (its weights and optimizer state), short branches were trained at "
    "several batch sizes, each seed on fresh data, with the learning rate scaled from the run's by the "
    "rule that fits its optimizer, and their held-out loss evaluated along the way. Two readings of the "
    "critical batch follow. McCandlish et al. (2018): the steps S each batch size needs to bring the "
    "held-out loss down to a target follow S = S_min(1 + B_noise/B); below B_noise a larger batch saves "
    "steps almost for free, above it it mostly costs samples. Merrill et al. (2025): after a fixed budget "
    "of samples, the largest batch whose loss stays within a tolerance of the best. Both have 95 % "
    "intervals across seeds. The cheap proxy, the noise scale B_simple = tr(Σ)/|G|² measured at the same "
    "checkpoint (raw, and for Adam-family optimizers of the preconditioned update direction), is "
    "calibrated against the branch value: their ratio says by what factor the proxy misses the measured "
    "critical batch on this model."
)


def _dash(text: str, reason: Optional[str]) -> str:
    """``text``, or "—" with ``reason`` when ``text`` is a dash."""
    if text != DASH or not reason:
        return text
    return f"{DASH} ({reason})"


def _defined(v: Any) -> bool:
    return not math.isnan(to_float(v))


def _preconditioned_reason(probe: Probe) -> str:
    optimizer = probe.get("optimizer") or {}
    if optimizer.get("family") != "adam":
        name = fmt_text(optimizer.get("class")) if optimizer else "not recorded"
        return f"only for Adam-family optimizers; the optimizer is {name}"
    return "the optimizer had no second-moment state at the checkpoint"


def calibration_rows(probe: Probe) -> List[Tuple[str, str]]:
    """``(quantity, value with its 95 % interval)`` of the calibration table: the branch
    ``B_crit`` of each form, raw and preconditioned ``B_simple``, and their ratios."""
    mc, me, px = probe["mccandlish"], probe["merrill"], probe["proxy"]
    no_branch = "no branch B_crit" + (f": {mc['reason']}" if mc.get("reason") else "")
    raw_reason = "not defined on the batches measured"  # the mean |G|² over them was not positive
    pre_reason = _preconditioned_reason(probe)

    def ratio_reason(proxy: Any, what: str) -> str:
        return no_branch if not _defined(mc.get("b_noise")) else f"no {what}" if not _defined(proxy) else ""

    return [
        (f"branch B_crit: B_noise of S = S_min(1 + B_noise/B) at target loss {fmt_num(probe.get('target_loss'))} "
         "(McCandlish)", _dash(fmt_with_interval(mc.get("b_noise"), mc.get("interval")), mc.get("reason"))),
        (f"b_crit: the largest batch within {fmt_num(me.get('tolerance'))} of the best loss after "
         f"{fmt_count(probe.get('budget'))} samples (Merrill)",
         _dash(fmt_with_interval(me.get("b_crit"), me.get("interval")), me.get("reason"))),
        (f"B_simple, raw, on {fmt_count(px.get('batches'))} batches of {fmt_count(probe.get('base_batch'))}",
         _dash(fmt_with_interval(px.get("b_simple"), px.get("b_simple_interval")), raw_reason)),
        ("B_simple, preconditioned (the optimizer's update direction)",
         _dash(fmt_with_interval(px.get("preconditioned"), px.get("preconditioned_interval")), pre_reason)),
        ("branch B_crit / raw B_simple", _dash(fmt_factor_interval(px.get("ratio"), px.get("ratio_interval")),
                                               ratio_reason(px.get("b_simple"), "raw B_simple"))),
        ("branch B_crit / preconditioned B_simple",
         _dash(fmt_factor_interval(px.get("preconditioned_ratio"), px.get("preconditioned_ratio_interval")),
               ratio_reason(px.get("preconditioned"), "preconditioned B_simple: " + pre_reason))),
    ]


def _setup_pairs(probe: Probe) -> List[Tuple[str, str]]:
    ck, mc, optimizer = probe["checkpoint"], probe["mccandlish"], probe.get("optimizer") or {}
    opt = (f"{fmt_text(optimizer.get('class'))} ({fmt_text(optimizer.get('family'))} family)" if optimizer
           else DASH)
    return [
        ("checkpoint: step, held-out loss", f"{_dash(fmt_count(ck.get('step')), 'not recorded')}, "
                                            f"{fmt_num(ck.get('loss'))}"),
        ("optimizer", opt),
        ("the run's batch size and learning rate", f"{fmt_count(probe.get('base_batch'))}, {fmt_lr(probe.get('lr'))}"),
        ("learning-rate rule of the branches", fmt_text(probe.get("lr_rule"))),
        ("batch sizes, seeds each", f"{', '.join(fmt_count(b) for b in probe.get('batch_sizes') or [])}; "
                                    f"{fmt_count(probe.get('seeds'))}"),
        ("sample budget of each branch", fmt_count(probe.get("budget"))),
        ("target loss; S_min (steps), E_min (examples) of the fit",
         f"{fmt_num(probe.get('target_loss'))}; {fmt_num(mc.get('s_min'))}, {fmt_num(mc.get('e_min'))}"),
        ("wall time of the probe (seconds)", fmt_num(probe.get("seconds"))),
    ]


def _steps_text(b: float, branches: List[Dict[str, Any]], medians: Dict[float, float]) -> Tuple[str, str]:
    """Median steps and examples to the target at batch size ``b``, or dashes and why."""
    if b in medians:
        steps = medians[b]
        return fmt_count(steps), fmt_count(b * steps)  # E = B·S, seed by seed, so for the median too
    reached = sum(1 for br in branches if _defined(br.get("steps_to_target")))
    why = ("no seed reached the target loss" if reached == 0 else
           f"left out of the fit: {reached} of {len(branches)} seeds reached the target loss")
    return f"{DASH} ({why})", DASH


def batch_rows(probe: Probe) -> List[Tuple[str, ...]]:
    """One row per batch size: learning rate, seeds that reached the target, median steps
    and examples to it, median loss at the budget with its interval, diverged seeds."""
    medians = {to_float(p[0]): to_float(p[1]) for p in probe["mccandlish"].get("points") or []
               if _defined(p[1])}
    losses = {to_float(r[0]): r for r in probe["merrill"].get("losses") or []}
    rows, used = [], chosen(probe)
    for b in batch_sizes(probe):
        branches = [br for br in used if to_float(br.get("batch_size")) == b]
        reached = sum(1 for br in branches if _defined(br.get("steps_to_target")))
        diverged = sum(1 for br in branches if br.get("diverged"))
        steps, examples = _steps_text(b, branches, medians)
        row = losses.get(b)
        loss = fmt_with_interval(row[1], row[2]) if row is not None else DASH
        if loss == DASH:
            loss = _dash(loss, "every seed diverged" if branches and diverged == len(branches)
                         else "no loss at the budget")
        lrs = sorted({fmt_lr(br.get("lr")) for br in branches}) or [DASH]
        rows.append((fmt_count(b), ", ".join(lrs), f"{reached} of {len(branches)}", steps, examples, loss,
                     f"{diverged} of {len(branches)}"))
    return rows


def _grid_note(probe: Probe) -> str:
    """What the figure and table show when the probe tried several learning rates."""
    grid = [g for g in probe.get("lr_grid") or [] if _defined(g)]
    if len(grid) < 2:
        return ""
    return h.para(f"At each batch size the probe tried the rule's learning rate times "
                  f"{', '.join(fmt_num(g) for g in grid)}; the figure and the table show the one with the fewest "
                  "median steps to the target (the loss at the budget, Merrill's reading, takes the one with the "
                  "lowest median loss).")


def _notes(probe: Probe) -> str:
    items = [f"{who}: {probe[key]['reason']}" for key, who in (("mccandlish", "McCandlish's fit"),
                                                                ("merrill", "Merrill's form"))
             if isinstance(probe[key].get("reason"), str) and probe[key]["reason"].strip()]
    if len(items) > 1:
        return h.notes("Notes from the probe:", items)
    return h.note(f"Note from the probe: {items[0]}") if items else ""


def _subheading(inp: Input, used: Set[str], stem: str) -> str:
    """``<h3>`` naming the task, file, checkpoint and creation time; its id is
    ``probe-<task>`` (``probe-<stem>`` for a second file of the same task)."""
    task = fmt_text(inp.header.get("task"))
    ident = anchor("probe", task)
    if ident in used:
        ident = f"probe-{slug(stem)}"
    used.add(ident)
    step = inp.header["checkpoint"].get("step")
    where = ", ".join(x for x in (inp.path.name, f"checkpoint step {fmt_count(step)}" if step is not None else "",
                                  f"created {fmt_text(inp.header.get('created'))}") if x)
    return f'<h3 id="{h.esc(ident)}">Task {h.esc(task)} <span class="meta">({h.esc(where)})</span></h3>\n'


def _part(stem: str, inp: Input, used: Set[str]) -> Tuple[str, List[Plot]]:
    probe = inp.header
    plot = probe_figure(probe, f"{stem}-probe", fmt_text(probe.get("task")))
    header = ("batch size", "learning rate", "seeds reaching the target", "median steps to the target",
              "median examples to the target", "loss at the budget, 95 % interval", "diverged")
    body = [_subheading(inp, used, stem), h.figure(plot), h.key_values(_setup_pairs(probe)),
            h.para("The critical batch, measured and estimated:"),
            h.table(("quantity", "value, 95 % interval"), calibration_rows(probe), numeric_from=2),
            _notes(probe), _grid_note(probe), h.table(header, batch_rows(probe), numeric_from=1)]
    return "".join(body), [plot]


def probe_section(items: Items) -> h.Section:
    """The branch probe's section: a part per probe file (a task at a checkpoint)."""
    body, plots, used = [h.para(PROBE_TEXT)], [], set()
    for stem, inp in items:
        part, part_plots = _part(stem, inp, used)
        body.append(part)
        plots += part_plots
    return h.Section("probe", TITLE, "".join(body), plots)


__all__ = ["PROBE_TEXT", "TITLE", "batch_rows", "calibration_rows", "probe_section"]
