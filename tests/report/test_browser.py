"""The report pages in a real browser: headless Chromium, through ``tests/browser_check.py``.

A tiny study's page and a page built from a monitor run file must load with no console
error, every image decoded, no nan/None/inf/undefined text and nothing overflowing the
page sideways, at a desktop width and a narrow one. A page broken on purpose shows that
each of these checks can fail.

Skipped where selenium, chromium or chromedriver is missing, unless
``GRADNOISE_BROWSER_REQUIRED=1`` (CI), which turns the skip into a failure.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import browser_check

WHY = browser_check.missing()
REQUIRED = os.environ.get("GRADNOISE_BROWSER_REQUIRED") == "1"
pytestmark = pytest.mark.skipif(WHY is not None and not REQUIRED, reason=f"browser check: {WHY}")

PNG = b"\x89PNG\r\n\x1a\n"


def gradnoise(*args, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "gradnoise", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, f"gradnoise {' '.join(map(str, args))}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def browser():
    if WHY:
        pytest.fail(f"GRADNOISE_BROWSER_REQUIRED=1 but {WHY}")


@pytest.fixture(scope="module")
def pages(browser, tmp_path_factory):
    """{"study": the page of every study on digits-mlp, tiny; "run": the page of the
    trajectory study's monitor run file}."""
    root = tmp_path_factory.mktemp("browser")
    study = root / "study"
    gradnoise("study", "--task", "digits-mlp", "--size", "tiny", "--quiet", "--out", study)
    run = study / "trajectory-digits-mlp.run.jsonl"
    assert run.exists(), sorted(p.name for p in study.iterdir())
    gradnoise("report", run, "--out", root / "run")
    return {"study": study / "index.html", "run": root / "run" / "index.html"}


def _assert_png(path: Path, width: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and path.stat().st_size > 10_000, path
    assert int.from_bytes(data[16:20], "big") >= width, path  # the IHDR width


@pytest.mark.parametrize("which", ["study", "run"])
def test_the_page_passes_in_chromium(pages, which, tmp_path):
    shot = tmp_path / f"{which}.png"
    problems = browser_check.check_page(pages[which], shot)
    assert problems == [], "\n".join(problems)
    _assert_png(shot, browser_check.DESKTOP[0])
    _assert_png(browser_check.narrow_path(shot), browser_check.NARROW[0])


BREAKAGE = """
<p>Mean ratio: a value that is undefined here; None of the steps was skipped; B ∈ [3, ∞).</p>
<img id="missing-img" src="no-such-figure.png" alt="a file that is not there">
<img id="bad-data" src="data:image/png;base64,AAAA" alt="not a PNG">
<p>b_crit = nan, last value None, upper bound inf</p>
<div id="too-wide" class="slab wide" style="width: 3000px">wide</div>
<div style="overflow-x: auto"><div id="scrolls-inside" style="width: 2500px">a wide table in a scroller</div></div>
"""


def test_a_broken_page_is_caught(pages, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(pages["run"].read_text(encoding="utf-8").replace("</body>", BREAKAGE + "</body>"),
                    encoding="utf-8")
    problems = browser_check.check_page(page, tmp_path / "broken.png")
    text = "\n".join(problems)
    for width in (browser_check.DESKTOP[0], browser_check.NARROW[0]):
        at = [p for p in problems if f"@{width}px:" in p]
        assert any("console error" in p and "no-such-figure.png" in p for p in at), text
        assert any("did not load" in p and "a file that is not there" in p for p in at), text
        assert any("did not load" in p and "not a PNG" in p for p in at), text
        for word, where in (("nan", "b_crit = nan"), ("None", "last value None"), ("inf", "upper bound inf")):
            assert any(f"text '{word}'" in p and where in p for p in at), (word, text)
        assert any("scrolls sideways" in p for p in at), text
        assert any("<div#too-wide.slab.wide> overflows" in p for p in at), text
    # what is fine stays unreported: English, ∞, a wide box inside its own scroller
    assert not any("text 'undefined'" in p for p in problems), text
    for word, where in (("None", "last value None"), ("inf", "upper bound inf")):
        assert all(where in p for p in problems if f"text '{word}'" in p), text
    assert "scrolls-inside" not in text, text
    assert (tmp_path / "broken.png").read_bytes()[:8] == PNG


def test_the_command_line(pages, tmp_path):
    shots = tmp_path / "shots"
    r = subprocess.run([sys.executable, str(Path(browser_check.__file__)), str(pages["run"]), "--screenshots",
                        str(shots)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = [Path(s.split(": ", 1)[1]) for s in r.stdout.splitlines() if s.startswith("screenshot: ")]
    assert len(listed) == 2 and all(p.is_absolute() and p.parent == shots.resolve() and p.exists() for p in listed)
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><p>x = NaN</p></body></html>", encoding="utf-8")
    r = subprocess.run([sys.executable, str(Path(browser_check.__file__)), str(broken), "--screenshots",
                        str(shots)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "text 'NaN'" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("which", ["study", "run"])
def test_every_table_fits_800_px(pages, which):
    """At 800 px every table fits its box: wide ones wrap their cells rather than scroll or get cut."""
    d = browser_check._driver()
    try:
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 800, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        d.get(pages[which].resolve().as_uri())
        wide = d.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => [t.scrollWidth, "
            "t.parentElement.clientWidth, t.parentElement.className]).filter(x => x[0] > x[1] + 1 || x[2] != 'table-box')")
    finally:
        d.quit()
    assert wide == [], wide
