"""Test the rendered book in headless Chromium: what a reader of the HTML sees.

Usage: python scripts/check_book.py [--html _build/html] [--toc _toc.yml] [--screenshots DIR]

It serves the built HTML on localhost and opens every page of the table of contents (and the search
page) in Debian's Chromium through its ChromeDriver. On every page it checks:
  - the browser console has no errors (a SyntaxError, a failed request, a failed script);
  - every image is present, decoded and not blank (its pixels are not all one colour);
  - every formula was rendered by MathJax, without a MathJax error;
  - the Colab button of a chapter points to that chapter's own .ipynb in the repository;
  - every internal link resolves to a built page (and its #anchor exists there);
  - no code line is cut off: a code block is not wider than its column at desktop width;
  - every kernel-free slider changes the picture it shows when moved;
and that the search page finds a word from each chapter. With --screenshots it saves the landing page
and one chapter at desktop and phone widths. Exits 1 listing every failure.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import socketserver
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DESKTOP, PHONE = (1366, 900), (390, 844)

# Blank means one flat colour: the largest per-channel standard deviation of the pixels below this.
BLANK_STD = 2.0

IMAGE_STATS_JS = """
const img = arguments[0];
if (!img.complete || img.naturalWidth === 0) { return {decoded: false}; }
const w = Math.min(img.naturalWidth, 256), h = Math.min(img.naturalHeight, 256);
const c = document.createElement('canvas'); c.width = w; c.height = h;
const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0, w, h);
let d;
try { d = ctx.getImageData(0, 0, w, h).data; } catch (e) { return {decoded: true, std: null, error: String(e)}; }
let best = 0;
for (let ch = 0; ch < 4; ch++) {
  let s = 0, s2 = 0, n = 0;
  for (let i = ch; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; n++; }
  const m = s / n; best = Math.max(best, Math.sqrt(Math.max(0, s2 / n - m * m)));
}
return {decoded: true, std: best, width: img.naturalWidth, height: img.naturalHeight};
"""

# A code block is cut off when its content is wider than the box that shows it (it then scrolls).
WIDE_CODE_JS = """
const out = [];
document.querySelectorAll('div.highlight pre').forEach((pre) => {
  if (pre.scrollWidth > pre.clientWidth + 2) {
    const lines = pre.innerText.split('\\n');
    const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
    out.push({scroll: pre.scrollWidth, client: pre.clientWidth, line: longest.slice(0, 120)});
  }
});
return out;
"""

# Kernel-free explorers (matplotlib's JavaScript player, `slider_html`): moving a slider must change
# the picture it shows.
SLIDERS_JS = """
const out = [];
document.querySelectorAll('input[type=range]').forEach((slider) => {
  const box = slider.closest(".ldm-slider, .animation") || slider.parentElement;
  const img = box ? box.querySelector('img') : null;
  if (!img) { out.push({id: slider.id, error: 'no image beside the slider'}); return; }
  const before = img.src;
  slider.value = slider.max;
  slider.dispatchEvent(new Event('input', {bubbles: true}));
  slider.dispatchEvent(new Event('change', {bubbles: true}));
  out.push({id: slider.id, changed: img.src !== before, frames: Number(slider.max) + 1});
});
return out;
"""

MATH_JS = """
const math = document.querySelectorAll('div.math, span.math');
const rendered = document.querySelectorAll('mjx-container').length;
const errors = document.querySelectorAll('mjx-merror, merror').length;
const raw = Array.from(math).filter((m) => !m.querySelector('mjx-container')).length;
return {math: math.length, rendered: rendered, errors: errors, unrendered: raw};
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path) -> tuple[socketserver.TCPServer, str]:
    handler = functools.partial(_Quiet, directory=str(folder))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def toc_pages(toc_path: Path) -> list[str]:
    toc = yaml.safe_load(toc_path.read_text())
    pages = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "file":
                    pages.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return pages


def new_driver(size=DESKTOP):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():
            raise SystemExit(f"{exe} is missing: `make check-book` installs Debian's chromium and "
                             f"chromium-driver (apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="check-book-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 f"--window-size={size[0]},{size[1]}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver._profile_dir = profile
    return driver


def close(driver) -> None:
    driver.quit()
    shutil.rmtree(getattr(driver, "_profile_dir", ""), ignore_errors=True)


def wait_ready(driver, timeout: float = 30.0) -> None:
    """Wait for the page and for MathJax (when the page loads it) to finish."""
    end = time.time() + timeout
    while time.time() < end:
        state = driver.execute_script(
            "if (document.readyState !== 'complete') return 'loading';"
            "if (window.MathJax && MathJax.startup && MathJax.startup.promise) {"
            "  if (!window.__mjDone) { MathJax.startup.promise.then(() => { window.__mjDone = true; }); }"
            "  return window.__mjDone ? 'done' : 'math'; }"
            "return 'done';")
        if state == "done":
            return
        time.sleep(0.1)


def internal_links(driver, base: str) -> list[str]:
    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map((a) => a.href);")
    return [h for h in hrefs if h.startswith(base)]


def colab_link(driver) -> str | None:
    return driver.execute_script(
        "const a = Array.from(document.querySelectorAll('a[href]')).find("
        "(a) => a.href.includes('colab.research.google.com')); return a ? a.href : null;")


def check_page(driver, base: str, html_dir: Path, page: str, repo_url: str, anchors: dict) -> list[str]:
    problems: list[str] = []
    url = base + page + ".html"
    driver.get(url)
    wait_ready(driver)
    for entry in driver.get_log("browser"):
        if entry.get("level") == "SEVERE":
            problems.append(f"console error: {entry.get('message', '')[:300]}")
    for i, img in enumerate(driver.find_elements("css selector", "img")):
        if not img.is_displayed() and "logo" in (img.get_attribute("class") or ""):
            continue
        stats = driver.execute_script(IMAGE_STATS_JS, img)
        src = (img.get_attribute("src") or "")[:80]
        if not stats.get("decoded"):
            problems.append(f"image {i} not decoded: {src}")
        elif stats.get("std") is None:
            problems.append(f"image {i} unreadable ({stats.get('error')}): {src}")
        elif stats["std"] < BLANK_STD:
            problems.append(f"image {i} is blank (pixel std {stats['std']:.2f}): {src}")
    math = driver.execute_script(MATH_JS)
    if math["math"] and (math["unrendered"] or math["errors"]):
        problems.append(f"math: {math['unrendered']} of {math['math']} formulas unrendered, "
                        f"{math['errors']} MathJax errors")
    if page.startswith("book/") and page != "book/intro" and (html_dir.parent.parent / f"{page}.ipynb").exists():
        link = colab_link(driver)
        want = f"{page}.ipynb"
        if link is None:
            problems.append("no Colab button")
        elif not link.endswith(want) or repo_url.split("github.com/")[-1] not in link:
            problems.append(f"Colab button points to {link}, not to {repo_url} ... {want}")
    for href in internal_links(driver, base):
        parsed = urllib.parse.urlparse(href)
        rel = parsed.path.lstrip("/") or "index.html"
        target = html_dir / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"broken link: {href}")
        elif parsed.fragment and target.suffix == ".html":
            ids = anchors.setdefault(target, set(re.findall(r'id="([^"]+)"', target.read_text())))
            if urllib.parse.unquote(parsed.fragment) not in ids:
                problems.append(f"missing anchor: {href}")
    for slider in driver.execute_script(SLIDERS_JS):
        if slider.get("error"):
            problems.append(f"slider {slider['id']}: {slider['error']}")
        elif not slider["changed"] and slider["frames"] > 1:
            problems.append(f"slider {slider['id']}: moving it does not change the picture")
    for wide in driver.execute_script(WIDE_CODE_JS):
        problems.append(f"code cut off ({wide['scroll']} px in a {wide['client']} px column): "
                        f"{wide['line']!r}")
    return problems


def search_words(html_dir: Path, pages: list[str]) -> dict[str, str]:
    """One word per chapter to search for: the longest word of its title (the page's <title>)."""
    words = {}
    for page in pages:
        text = (html_dir / f"{page}.html").read_text()
        m = re.search(r"<title>(.*?)(?:&#8212;|</title>)", text, re.S)
        cands = sorted(re.findall(r"[A-Za-z]{5,}", m.group(1) if m else ""), key=len, reverse=True)
        if cands:
            words[page] = cands[0].lower()
    return words


def check_search(driver, base: str, words: dict[str, str]) -> list[str]:
    problems = []
    for page, word in words.items():
        driver.get(base + "search.html?q=" + urllib.parse.quote(word))
        end = time.time() + 30
        while time.time() < end:          # Sphinx adds results one by one, then writes the summary
            done = driver.execute_script(
                "const s = document.querySelector('#search-results p.search-summary');"
                "return s ? s.innerText : '';")
            if done:
                break
            time.sleep(0.2)
        found = driver.execute_script(
            "return Array.from(document.querySelectorAll('#search-results a')).map((a) => a.href);")
        if not any(f"{page}.html" in h for h in found):
            problems.append(f"search for {word!r} does not find {page} ({len(found)} results)")
    return problems


def screenshots(base: str, pages: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    shots = []
    chapter = next((p for p in pages if p.startswith("book/0")), pages[0])
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        driver = new_driver(size)
        try:
            for name, page in (("landing", pages[0]), ("chapter", chapter)):
                driver.get(base + page + ".html")
                wait_ready(driver)
                path = folder / f"{name}-{label}.png"
                driver.save_screenshot(str(path))
                shots.append(path)
        finally:
            close(driver)
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--toc", type=Path, default=ROOT / "_toc.yml")
    ap.add_argument("--config", type=Path, default=ROOT / "_config.yml")
    ap.add_argument("--screenshots", type=Path, default=None)
    a = ap.parse_args(argv)
    if not (a.html / "index.html").exists():
        raise SystemExit(f"{a.html}/index.html is missing: build the book first (make book)")
    repo_url = yaml.safe_load(a.config.read_text())["repository"]["url"]
    pages = toc_pages(a.toc)
    server, base = serve(a.html)
    report: dict[str, list[str]] = {}
    driver = new_driver()
    try:
        anchors: dict = {}
        for page in pages:
            t = time.time()
            report[page] = check_page(driver, base, a.html, page, repo_url, anchors)
            print(f"{page}: {len(report[page])} problem(s) ({time.time() - t:.1f} s)", flush=True)
        report["search"] = check_search(driver, base, search_words(a.html, pages[1:]))
        print(f"search: {len(report['search'])} problem(s)", flush=True)
    finally:
        close(driver)
    if a.screenshots:
        for p in screenshots(base, pages, a.screenshots):
            print(f"screenshot: {p}")
    server.shutdown()
    failures = {k: v for k, v in report.items() if v}
    for page, problems in failures.items():
        print(f"\n{page}:")
        for p in problems:
            print(f"  - {p}")
    print(json.dumps({"pages": len(pages), "pages_with_problems": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
