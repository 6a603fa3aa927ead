"""Checks a report page in a real browser: headless Chromium driven through Selenium.

``check_page(html_path, screenshot_path)`` opens the page at a desktop width and at a
narrow one, and returns the problems it finds (an empty list: none):

* the browser console logged something at level SEVERE (a resource that failed to
  load, a script error);
* an ``<img>`` did not load (not ``complete``, or ``naturalWidth == 0``);
* the visible text (and the title) holds ``nan``, ``NaN``, ``None``, ``undefined``,
  ``inf`` or ``Infinity`` as a word (``∞`` is fine; so is English: "a value that is
  undefined", "None of the steps");
* the page scrolls sideways (``scrollWidth > clientWidth``), or an element reaches
  past the page's width, left or right, without an ancestor that clips or scrolls it;
  the outermost offenders are named by tag, id and class.

It saves a full-page PNG screenshot at the desktop width to ``screenshot_path`` and
one at the narrow width beside it (``NAME.narrow.png``).

From the command line::

    python tests/browser_check.py PAGE.html [PAGE2.html ...] --screenshots DIR

prints one line per problem and ``screenshot: PATH`` per page and width; exits 1 when
there were problems (2 when the browser could not be started).

Needs ``selenium`` (the ``dev`` extra) and Chromium with its chromedriver (Debian:
``apt-get install chromium chromium-driver``).
"""
from __future__ import annotations

import argparse
import base64
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

DESKTOP = (1280, 900)
NARROW = (800, 900)
WIDTHS = (DESKTOP, NARROW)

# Words a formatting slip leaves on the page, as whole words ("∞", "info", "finance" are
# fine). Case-sensitive: "none" in prose is not a slip.
BAD_WORDS = re.compile(r"\b(nan|NaN|NAN|None|undefined|inf|Inf|Infinity)\b")
# ... except in English: "a value that is undefined", "None of the steps".
PROSE = re.compile(r"\b(?:is|are|was|were|be|been|being|remains?|stays?|left)\s+undefined\b|\bNone\s+of\b")
MAX_REPORTS = 8  # of one kind, per page and width


def browser_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) found on PATH, or None for each that is missing."""
    chrome = os.environ.get("GRADNOISE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    driver = os.environ.get("GRADNOISE_CHROMEDRIVER") or shutil.which("chromedriver")
    return chrome, driver


def missing() -> str | None:
    """Why the check cannot run here, or None when it can."""
    try:
        importlib.import_module("selenium.webdriver")
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    chrome, driver = browser_paths()
    if not chrome:
        return "chromium is not installed (apt-get install chromium)"
    if not driver:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


def _driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver = browser_paths()
    opts = webdriver.ChromeOptions()
    if chrome:
        opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver) if driver else Service()
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(120)
    d.set_script_timeout(60)
    return d


# Waits for every image to decode (lazy ones too: scrolls through the page first).
_WAIT_IMAGES = """
const done = arguments[arguments.length - 1];
window.scrollTo(0, document.documentElement.scrollHeight);
window.scrollTo(0, 0);
Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))
  .then(() => done(true), () => done(false));
"""

_IMAGES = """
return Array.from(document.images).map((img, n) => ({
  n: n, complete: img.complete, width: img.naturalWidth,
  src: (img.getAttribute('src') || '').slice(0, 60), alt: (img.getAttribute('alt') || '').slice(0, 80)}));
"""

# Elements reaching past the page, sideways, that no ancestor clips or scrolls; only the
# outermost of each nest.
_OVERFLOW = """
const root = document.documentElement;
const pageWidth = root.clientWidth;
const clips = el => {
  for (let a = el.parentElement; a && a !== root && a !== document.body; a = a.parentElement) {
    const s = getComputedStyle(a);
    if (s.overflowX !== 'visible') return true;
  }
  return false;
};
const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
  (typeof el.className === 'string' && el.className.trim()
     ? '.' + el.className.trim().split(/\\s+/).join('.') : '');
const out = [];
const reported = new Set();
for (const el of document.body.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) continue;
  const left = r.left + window.scrollX, right = r.right + window.scrollX;
  if (right <= pageWidth + 1 && left >= -1) continue;
  if (getComputedStyle(el).position === 'fixed') continue;
  if (clips(el)) continue;
  let p = el.parentElement, inside = false;
  for (; p; p = p.parentElement) if (reported.has(p)) { inside = true; break; }
  if (inside) continue;
  reported.add(el);
  out.push({name: name(el), left: Math.round(left), right: Math.round(right), width: Math.round(r.width),
            text: (el.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 60)});
}
return {pageWidth: pageWidth, scrollWidth: root.scrollWidth, offenders: out};
"""


def _context(text: str, m: re.Match) -> str:
    a, b = max(0, m.start() - 30), min(len(text), m.end() + 30)
    return " ".join(text[a:b].split())


def _screenshot(d, path: Path, width: int) -> None:
    """A full-page PNG: the whole document height, at the viewport's width."""
    height = d.execute_script("return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")
    full = d.execute_script("return document.documentElement.scrollWidth")
    shot = d.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "fromSurface": True,
        "clip": {"x": 0, "y": 0, "width": max(width, full), "height": height, "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def _check_at(d, url: str, label: str, size: tuple[int, int], shot: Path) -> list[str]:
    width, height = size
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    d.get_log("browser")  # drop what an earlier load logged
    d.get(url)
    d.execute_async_script(_WAIT_IMAGES)
    where = f"{label} @{width}px"
    problems = []

    for e in d.get_log("browser"):
        if e.get("level") == "SEVERE":
            problems.append(f"{where}: console error: {e.get('message', '')[:300]}")

    images = d.execute_script(_IMAGES)
    broken = [i for i in images if not i["complete"] or not i["width"]]
    for i in broken[:MAX_REPORTS]:
        problems.append(f"{where}: image {i['n'] + 1} of {len(images)} did not load "
                        f"(alt {i['alt']!r}, src {i['src']!r})")
    if len(broken) > MAX_REPORTS:
        problems.append(f"{where}: ... and {len(broken) - MAX_REPORTS} more images did not load")

    text = d.execute_script("return document.title + '\\n' + document.body.innerText")
    prose = [m.span() for m in PROSE.finditer(text)]
    found = [m for m in BAD_WORDS.finditer(text) if not any(a <= m.start() < b for a, b in prose)]
    for m in found[:MAX_REPORTS]:
        problems.append(f"{where}: text {m.group(1)!r} on the page: \"…{_context(text, m)}…\"")
    if len(found) > MAX_REPORTS:
        problems.append(f"{where}: ... and {len(found) - MAX_REPORTS} more nan/None/inf/undefined words")

    o = d.execute_script(_OVERFLOW)
    if o["scrollWidth"] > o["pageWidth"]:
        problems.append(f"{where}: the page scrolls sideways: scrollWidth {o['scrollWidth']} > "
                        f"clientWidth {o['pageWidth']}")
    for el in o["offenders"][:MAX_REPORTS]:
        problems.append(f"{where}: <{el['name']}> overflows the page width {o['pageWidth']}px: "
                        f"spans x {el['left']}..{el['right']} (width {el['width']}px)"
                        + (f", text \"{el['text']}\"" if el["text"] else ""))
    if len(o["offenders"]) > MAX_REPORTS:
        problems.append(f"{where}: ... and {len(o['offenders']) - MAX_REPORTS} more overflowing elements")

    _screenshot(d, shot, width)
    return problems


def narrow_path(screenshot_path) -> Path:
    """Where the narrow-width screenshot of ``screenshot_path`` goes."""
    p = Path(screenshot_path)
    return p.with_name(p.stem + ".narrow" + (p.suffix or ".png"))


def check_page(html_path, screenshot_path, driver=None) -> list[str]:
    """The problems headless Chromium finds on ``html_path`` (empty: none), at a desktop
    width and a narrow one; saves full-page screenshots at ``screenshot_path`` (desktop)
    and ``narrow_path(screenshot_path)``. ``driver``: a Selenium Chrome driver to reuse
    (it stays open), else one is started and quit here."""
    page = Path(html_path).resolve()
    if not page.is_file():
        return [f"{html_path}: no such file"]
    own = driver is None
    d = _driver() if own else driver
    try:
        problems = []
        for size, shot in ((DESKTOP, Path(screenshot_path)), (NARROW, narrow_path(screenshot_path))):
            problems += _check_at(d, page.as_uri(), str(html_path), size, shot)
        return problems
    finally:
        if own:
            d.quit()


def _shot_name(page: Path, taken: set) -> str:
    """A screenshot name from the page's folder and name: ``ci-report-index.png``."""
    base = re.sub(r"[^\w.-]+", "-", f"{page.resolve().parent.name}-{page.stem}").strip("-") or "page"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name + ".png"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Check report pages in headless Chromium.")
    ap.add_argument("pages", nargs="+", metavar="PAGE.html")
    ap.add_argument("--screenshots", default="browser-screenshots", metavar="DIR",
                    help="folder of the full-page screenshots (default browser-screenshots)")
    args = ap.parse_args(argv)
    why = missing()
    if why:
        print(f"browser check: cannot run: {why}")
        return 2
    out = Path(args.screenshots).resolve()
    out.mkdir(parents=True, exist_ok=True)
    taken: set = set()
    total = 0
    d = _driver()
    try:
        for page in map(Path, args.pages):
            shot = out / _shot_name(page, taken)
            problems = check_page(page, shot, driver=d)
            for p in problems:
                print(p)
            total += len(problems)
            for s in (shot, narrow_path(shot)):
                if s.exists():
                    print(f"screenshot: {s}")
    finally:
        d.quit()
    print(f"browser check: {len(args.pages)} page(s), {total} problem(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
