"""Regenerate the README's figures from one run of its main job, ``gradnoise study``.

The README's example verdict, its table of measured figures and the sentence that says
which run produced them lie between marker comments::

    <!-- readme-figures:run:start -->      ... which run: seed, size, torch, cores, time
    <!-- readme-figures:verdict:start -->  ... the verdict the command prints last
    <!-- readme-figures:table:start -->    ... one row per study and task: its summary line
    (each closed by ``<!-- readme-figures:NAME:end -->``)

and this script writes exactly those blocks, from the study files of one output folder:

    python scripts/readme_figures.py                 # run `gradnoise study --out gradnoise-report`, then write
    python scripts/readme_figures.py --from DIR      # use the study files already in DIR
    python scripts/readme_figures.py --from DIR --check   # compare only: exit 1 and a diff if they differ

The verdict is :func:`gradnoise.report.verdict_lines` of the folder's study files (what the
command prints) and each table row is the study's own summary line (what the command
prints above the verdict), so nothing here re-derives a number. The torch version, the
core count and the wall time are recorded in ``DIR/readme-figures.json`` when this script
runs the study; for a folder it did not produce, give them (``--torch``, ``--seconds``,
``--cores``). Only a ``--size default`` run may write the README.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = ("run", "verdict", "table", "calibration", "schedule")
CALIBRATION_HEAD = ("| step | held-out loss | branch B_crit | Merrill's B_crit | B_simple raw | B_simple preconditioned | "
                    "B_simple LayerNorm | B_crit / B_simple | probe time |\n|---|---|---|---|---|---|---|---|---|")
SCHEDULE_RUN = "trajectory-digits-mlp.run.jsonl"
SIDECAR = "readme-figures.json"
TABLE_HEAD = "| study | task | measured (the command's summary line) |\n|---|---|---|"


def markers(name: str) -> Tuple[str, str]:
    """The opening and closing marker lines of block ``name``."""
    return f"<!-- readme-figures:{name}:start -->", f"<!-- readme-figures:{name}:end -->"


# ---------------------------------------------------------------- reading a run
def study_files(folder: Path) -> List[Tuple[dict, dict, Path]]:
    """``(header, summary, path)`` of every study file in ``folder``, in the registry's
    study order and, within a study, by task: the default tasks in their order, then the
    others as the run met them (``recommend``'s ``trajectory-<task>`` ranks with ``<task>``).

    Raises:
        ValueError: no study files, or a study file without its summary line.
    """
    from gradnoise.formats import read_study, sniff
    from gradnoise.studies.registry import NAMES
    from gradnoise.studies.task import DEFAULT_TASKS

    found = []
    for path in sorted(folder.glob("*.jsonl")):
        if path.name.endswith(".run.jsonl"):
            continue
        try:
            if sniff(path) != "gradnoise-study":
                continue
        except ValueError:
            continue
        header, lines = read_study(path)
        summaries = [x for x in lines if x.get("type") == "summary"]
        if not summaries:
            raise ValueError(f"{path}: no summary line (the study did not finish)")
        found.append((header, summaries[-1], path))
    if not found:
        raise ValueError(f"{folder}: no gradnoise study files")
    order = {n: i for i, n in enumerate(NAMES)}
    # "created" has whole seconds: ties are common, so the default tasks come in their own order
    later = sorted(found, key=lambda f: (str(f[0].get("created")), f[0]["task"]))
    tasks = list(dict.fromkeys(list(DEFAULT_TASKS) + [h["task"] for h, _, _ in later]))

    def task_rank(task: str) -> int:  # a run file's task ("trajectory-digits-mlp") ranks with its own
        return min(i for i, name in enumerate(tasks) if name in task)

    return sorted(found, key=lambda f: (order.get(f[0]["study"], len(order)), task_rank(f[0]["task"]),
                                        str(f[0].get("created", ""))))


def _summary_body(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "type"}


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, one line."""
    return " ".join(text.replace("|", "\\|").split())


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def render(folder: Path, torch_version: str, cores: Optional[int], seconds: Optional[float]) -> Dict[str, str]:
    """The README's generated blocks (name -> text between its markers) from the study
    files in ``folder``."""
    from gradnoise.report import verdict_lines
    from gradnoise.report.verdict import WIDTH
    from gradnoise.studies.registry import get

    files = study_files(folder)
    seeds = sorted({str(h.get("seed")) for h, _, _ in files})
    sizes = sorted({str(h.get("size")) for h, _, _ in files})
    studies = list(dict.fromkeys(h["study"] for h, _, _ in files))
    when = [f"seed {', '.join(seeds)}", f"size {', '.join(sizes)}", f"torch {torch_version}"]
    if cores:
        when.append(f"{cores} CPU cores")
    took = f" in {_duration(seconds)}" if seconds else ""
    run = (f"From one `gradnoise study` run ({'; '.join(when)}){took}: {len(studies)} studies, "
           f"{len(files)} study files. `python scripts/readme_figures.py` writes this sentence, the verdict and "
           "the table below from such a run (`--check` compares them with this README).")
    lines = verdict_lines(sorted(p for _, _, p in files), width=WIDTH)  # in the command's order: it follows the files'
    verdict = "```\n" + "\n".join(lines) + "\n```"
    rows = [TABLE_HEAD]
    for header, summary, _ in files:
        line = get(header["study"]).line(_summary_body(summary))
        rows.append(f"| `{header['study']}` | {header['task']} | {_cell(line)} |")
    return {"run": run, "verdict": verdict, "table": "\n".join(rows), "calibration": _calibration(files),
            "schedule": _schedule(folder)}


def _calibration(files) -> str:
    """The lm study's branch probes, one row per probed checkpoint (the page's table)."""
    from gradnoise.numbers import fmt_factor_interval, fmt_num, fmt_with_interval
    rows = [CALIBRATION_HEAD]
    for header, summary, _ in files:
        for p in (summary.get("calibration") or {}).get("points") or [] if header["study"] == "lm" else []:
            def iv(key):
                v = p.get(key) or [None] * 3
                return fmt_with_interval(v[0], v[1:])
            r = p.get("ratio") or [None] * 3
            ratio = fmt_factor_interval(r[0], r[1:])
            rows.append(f"| {p['step']} | {fmt_num(p['loss'])} | {iv('b_crit')} | {iv('merrill')} | {iv('b_simple')} | "
                        f"{iv('preconditioned')} | {iv('ln_b_simple')} | {ratio} | {fmt_num(p['seconds'])} s |")
    return "\n".join(rows)


def _schedule(folder: Path) -> str:
    """``gradnoise schedule`` of the digits MLP's trajectory run, as a table."""
    from gradnoise.control import schedule as sc
    from gradnoise.control.schedule_text import render as render_schedule
    from gradnoise.formats import read_run
    header, steps = read_run(folder / SCHEDULE_RUN)
    text = render_schedule(sc.build(header, steps), "table")
    return f"`gradnoise schedule gradnoise-report/{SCHEDULE_RUN}`:\n\n```\n{text}\n```"


# ---------------------------------------------------------------- the README's blocks
def read_blocks(text: str) -> Dict[str, str]:
    """name -> the text between the markers of each block in ``text`` (stripped).

    Raises:
        ValueError: a block missing, repeated, unclosed or out of order.
    """
    out, last = {}, -1
    for name in BLOCKS:
        start, end = markers(name)
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"README: need exactly one {start} and one {end}")
        i, j = text.index(start), text.index(end)
        if not last < i < j:
            raise ValueError(f"README: the {name} block's markers are out of order")
        out[name] = text[i + len(start):j].strip("\n")
        last = j
    return out


def write_blocks(text: str, blocks: Dict[str, str]) -> str:
    """``text`` with each block's content replaced (a blank line either side)."""
    read_blocks(text)  # validates the markers
    for name, body in blocks.items():
        start, end = markers(name)
        i, j = text.index(start) + len(start), text.index(end)
        text = text[:i] + "\n\n" + body.strip("\n") + "\n\n" + text[j:]
    return text


_TASK = re.compile(r"^  (\S[^:]*):")


def structure(blocks: Dict[str, str]) -> Dict[str, object]:
    """What must agree between the README and a fresh rendering, digits aside: the
    blocks present, the verdict's first line and its tasks, the table's head and its
    (study, task) rows, and that the run sentence names a seed, a size and a torch version."""
    verdict = blocks["verdict"].splitlines()
    table = blocks["table"].splitlines()
    rows = [tuple(c.strip().strip("`") for c in row.strip("|").split(" | ")[:2]) for row in table[2:]]
    run = blocks["run"]
    return {
        "blocks": sorted(blocks),
        "verdict_fenced": bool(verdict) and verdict[0] == "```" and verdict[-1] == "```",
        "verdict_head": verdict[1] if len(verdict) > 1 else None,
        "verdict_tasks": [m.group(1) for m in map(_TASK.match, verdict) if m],
        "table_head": "\n".join(table[:2]),
        "table_rows": rows,
        "run_names": [bool(re.search(p, run)) for p in (r"\bseed \d", r"\bsize \w", r"\btorch \d+\.\d+")],
    }


# ---------------------------------------------------------------- command line
def _run_study(out: Path, seed: int) -> Dict[str, object]:
    """Run ``gradnoise study`` (all studies, default size) into ``out`` with this
    interpreter; record torch, cores and the wall time beside its files."""
    import torch

    cmd = [sys.executable, "-m", "gradnoise", "study", "--seed", str(seed), "--out", str(out), "--quiet"]
    print("+ " + " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"readme_figures: gradnoise study exited {rc}; the README is left as it was")
    meta = {"torch": torch.__version__, "cores": os.cpu_count(), "seconds": round(seconds, 1), "seed": seed}
    (out / SIDECAR).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _provenance(folder: Path, args) -> Tuple[str, Optional[int], Optional[float]]:
    meta = {}
    if (folder / SIDECAR).exists():
        meta = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
    torch_version = args.torch or meta.get("torch")
    if not torch_version:
        raise SystemExit(f"readme_figures: {folder} has no {SIDECAR}: say which torch produced it (--torch)")
    return torch_version, args.cores or meta.get("cores"), args.seconds or meta.get("seconds")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="folder", type=Path, help="use this output folder instead of running the study")
    p.add_argument("--out", type=Path, default=Path("gradnoise-report"), help="where the study writes (no --from)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare with the README; write nothing")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--torch", help="the torch version that produced --from DIR (default: its " + SIDECAR + ")")
    p.add_argument("--cores", type=int, help="CPU cores of that run")
    p.add_argument("--seconds", type=float, help="wall time of that run")
    args = p.parse_args(argv)

    folder = args.folder
    if folder is None:
        folder = args.out
        _run_study(folder, args.seed)
    torch_version, cores, seconds = _provenance(folder, args)
    sizes = {h.get("size") for h, _, _ in study_files(folder)}
    if sizes != {"default"}:
        raise SystemExit(f"readme_figures: {folder} is a --size {'/'.join(map(str, sorted(sizes)))} run; "
                         "the README shows a default-size run")
    new = render(folder, torch_version, cores, seconds)
    text = args.readme.read_text(encoding="utf-8")
    updated = write_blocks(text, new)
    if args.check:
        if updated == text:
            print(f"{args.readme}: the generated blocks match {folder}")
            return 0
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), updated.splitlines(True),
                                                   str(args.readme), f"from {folder}"))
        return 1
    if updated != text:
        args.readme.write_text(updated, encoding="utf-8")
    print(f"{args.readme}: {', '.join(BLOCKS)} blocks written from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
