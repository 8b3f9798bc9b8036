"""The report in a real browser: headless Chromium with networking off loads it, screenshots it, and
the dumped DOM shows the verdict, the charts and the tables; the page asked for nothing on the network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from report_run import make_run, remote_references

from infusion_audit.reports import render_report

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OFFLINE = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND"]


def load_in_chromium(page: Path, work: Path, window: str = "1280,2400") -> dict:
    """Open `page` offline in a `window` (width,height); return the dumped DOM, the screenshot path and the URLs
    the page requested."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    screenshot, net_log = work / "screenshot.png", work / "netlog.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={work / 'profile'}", *OFFLINE, f"--log-net-log={net_log}",
           f"--screenshot={screenshot}", f"--window-size={window}", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"dom": done.stdout, "screenshot": screenshot, "requests": page_requests(net_log)}


def page_requests(net_log: Path) -> list[str]:
    """URLs of network requests a page started. The browser's own background requests (update checks,
    account probes) carry the initiator 'not an origin'; a file:// page's requests carry its opaque origin."""
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [e["params"] for e in log["events"] if e["type"] == start_job and "url" in e.get("params", {})]
    return [p["url"] for p in starts
            if p.get("initiator") != "not an origin" and not p["url"].startswith(("file:", "data:"))]


class Elements(HTMLParser):
    """Counts tags and keeps each element's text by id (enough to check a dumped DOM)."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.ids: set[str] = set()
        self.img_sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "img":
            self.img_sources.append(attrs.get("src") or "")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("browser") / "run", tmp_path_factory.getbasetemp() / "report-train-cache")
    return render_report(run)


def test_network_check_catches_a_remote_image(tmp_path):
    """The check below can fail: a page that loads a remote image is caught, statically and in the browser."""
    page = tmp_path / "remote.html"
    page.write_text('<html><body><p>x</p><img src="http://example.invalid/pixel.png"></body></html>')
    assert remote_references(page.read_text()) != []
    assert load_in_chromium(page, tmp_path)["requests"] == ["http://example.invalid/pixel.png"]


def test_report_renders_offline_in_chromium(report, tmp_path):
    html = report.read_text(encoding="utf-8")
    assert remote_references(html) == []
    loaded = load_in_chromium(report, tmp_path)
    assert loaded["requests"] == []

    dom = Elements()
    dom.feed(loaded["dom"])
    assert {"verdict", "detection", "roc", "budget", "defence", "figures", "gallery", "provenance"} <= dom.ids
    assert dom.tags.get("svg", 0) == 4 and dom.tags.get("table", 0) >= 5
    assert dom.tags.get("img", 0) >= 9 and all(s.startswith("data:image/png;base64,") for s in dom.img_sources)
    assert "script" not in dom.tags
    verdict = loaded["dom"][loaded["dom"].index('id="verdict"'):loaded["dom"].index('id="detection"')]
    assert "attacks succeed" in verdict and 'class="badge caught"' in verdict and ">succeeds</span>" in verdict

    shot = Image.open(loaded["screenshot"])
    assert shot.size == (1280, 2400)
    top = shot.convert("L").crop((0, 0, 1280, 900))  # the verdict box: text, not a blank page
    assert top.getextrema()[0] < 60 and len(top.getcolors(1 << 16) or []) > 20


# Measures the laid-out page from inside it (a copy with this script and without the page's no-script policy):
# the window, the page's width, every table's box and whether its container scrolls, the first screen's parts.
MEASURE = """<script>
(() => {
  const box = e => { const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, right: r.right}; };
  const tables = [...document.querySelectorAll("table")].map(t => ({
    head: (t.querySelector("th") || t).textContent.trim().slice(0, 40), ...box(t),
    scrolls: t.parentElement.scrollWidth > t.parentElement.clientWidth + 1}));
  document.body.dataset.measured = JSON.stringify({width: innerWidth,
    page: document.documentElement.scrollWidth, tables: tables,
    glance: box(document.querySelector("table.glance")), levels: box(document.querySelector("ul.levels"))});
})();
</script>"""
FIRST_SCREEN = (1280, 800)


def measure_in_chromium(page: Path, work: Path) -> dict:
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text(encoding="utf-8"))
    copy = work / "measured.html"
    copy.write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = load_in_chromium(copy, work / "measure", window="{},{}".format(*FIRST_SCREEN))["dom"]
    found = re.search(r'data-measured="([^"]*)"', dom)
    assert found, "the measuring script did not run"
    from html import unescape

    return json.loads(unescape(found.group(1)))


def test_measuring_catches_a_table_too_wide(tmp_path):
    """The check below can fail: a table wider than the window is reported."""
    page = tmp_path / "wide.html"
    page.write_text('<html><body><div class="scroll" style="overflow-x:auto"><table class="glance"><tr><td '
                    'style="white-space:nowrap">' + "x" * 400 + '</td></tr></table></div><ul class="levels"></ul>'
                    '</body></html>')
    measured = measure_in_chromium(page, tmp_path)
    assert measured["tables"][0]["scrolls"]


def test_the_first_screen_answers_at_a_glance(report, tmp_path):
    """At 1280 x 800: one table (attack x what the defender has) and one sentence per level fit the first screen,
    and no table of the page is wider than the window."""
    measured = measure_in_chromium(report, tmp_path)
    assert measured["width"] == FIRST_SCREEN[0] and measured["page"] <= FIRST_SCREEN[0]
    too_wide = [t["head"] for t in measured["tables"] if t["scrolls"] or t["right"] > FIRST_SCREEN[0]]
    assert len(measured["tables"]) >= 8 and too_wide == []
    assert measured["glance"]["bottom"] <= FIRST_SCREEN[1] and measured["levels"]["bottom"] <= FIRST_SCREEN[1]

    loaded = load_in_chromium(report, tmp_path, window="{},{}".format(*FIRST_SCREEN))
    verdict = loaded["dom"][loaded["dom"].index('id="verdict"'):loaded["dom"].index('id="attacks-in-words"')]
    assert "attacks succeed" in verdict and verdict.count("<li><strong>With ") == 2  # a sentence per level
    assert "perturbation-norm" not in verdict
    shot = Image.open(loaded["screenshot"]).convert("RGB")
    assert shot.size == FIRST_SCREEN
    colours = {colour: n for n, colour in shot.getcolors(1 << 20)}
    red, green = (183, 28, 28), (30, 125, 50)  # the badges: succeeds / evades, caught
    assert colours.get(red, 0) > 200 and colours.get(green, 0) > 200
