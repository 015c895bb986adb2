"""The HTML report (``moescope report DIR --html FILE``) and ``--plot-format``.

The page is checked three ways: statically (parsed: no script, no external URL, every
figure inlined, the numbers equal to the trace's CSV files recomputed here, text escaped,
missing data shown as "not available"), against the destination rules (only its own
reports are replaced), and in a real browser: headless Chromium loads it through the
DevTools protocol (``--remote-debugging-pipe``), every request the page makes and every
failed load or console error is recorded, and a screenshot is taken. A negative control
(a page with an external image) shows that the checker sees what it must refuse.

The browser tests are skipped when Chromium is absent, except in CI (``CI`` or
``MOESCOPE_CI`` set, as ``.ci/run`` does), where a missing browser fails them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from moescope.errors import OutputError
from moescope.reporting.page import write_html_report
from moescope.stats.definitions import DEFINITIONS, WHY
from moescope.stats.plots import FIGURES, PLOT_FORMATS, write_plots
from moescope.stats.report import MIN_PAIR_COUNT, NEAR_DEAD_FRACTION
from moescope.tracing import TraceState, write_trace_dir
from tests.safety import assert_clean_error, invoke, snapshot

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p is not None), None
)
IN_CI = bool(os.environ.get("CI") or os.environ.get("MOESCOPE_CI"))
#: schemes a self-contained page may load
LOCAL = ("file:", "data:", "about:", "blob:")


# --------------------------------------------------------------------------- the browser


@dataclass
class PageLoad:
    """What Chromium saw while loading one page."""

    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshot: bytes = b""

    @property
    def external(self) -> list[str]:
        """Requests to anything but the page's own file and inline data."""
        return [u for u in self.requests if not u.startswith(LOCAL)]


class _Pipe:
    """The DevTools protocol over ``--remote-debugging-pipe``: NUL-separated JSON on fds 3 and 4."""

    def __init__(self, write_fd: int, read_fd: int, timeout: float) -> None:
        self.w, self.r, self.timeout = write_fd, read_fd, timeout
        self.buf, self.next_id, self.events = b"", 0, []  # type: tuple[bytes, int, list[dict[str, Any]]]

    def _read_until(self, done: Any, seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" not in msg:
                    self.events.append(msg)
                if done(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if select.select([self.r], [], [], left)[0]:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        reply = self._read_until(lambda m: m.get("id") == want, self.timeout)
        if reply is None:
            raise TimeoutError(f"chromium did not answer {method}")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, seconds: float) -> bool:
        hit = lambda m: m.get("method") == method and m.get("sessionId") == session  # noqa: E731
        if any(hit(m) for m in self.events):
            return True
        return self._read_until(hit, seconds) is not None

    def drain(self, seconds: float) -> None:
        self._read_until(lambda m: False, seconds)


def _high(fds: tuple[int, int]) -> tuple[int, int]:
    """The pipe's ends moved to fds >= 10, so bash's ``3<&R 4>&W`` cannot overwrite one with the other."""
    import fcntl

    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return moved[0], moved[1]


def load_in_chromium(url: str, *, width: int = 1280, height: int = 1200, timeout: float = 60.0) -> PageLoad:
    """Open ``url`` in a fresh headless Chromium; record its requests, failures, errors and a screenshot."""
    assert CHROMIUM is not None
    cmd_r, cmd_w = _high(os.pipe())
    res_r, res_w = _high(os.pipe())
    with tempfile.TemporaryDirectory() as profile:
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--hide-scrollbars", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
        ]  # fmt: skip
        proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{res_w}', "bash", *args],
            pass_fds=(cmd_r, res_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        pipe = _Pipe(cmd_w, res_r, timeout)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                pipe.call(f"{domain}.enable", session=sid)
            pipe.call("Page.navigate", {"url": url}, session=sid)
            assert pipe.wait_event("Page.loadEventFired", sid, timeout), "the page never finished loading"
            pipe.drain(0.5)  # late events (failed loads are reported after the load event too)
            shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]
            pipe.call("Browser.close")
        finally:
            os.close(cmd_w)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(res_r)
    load = PageLoad(screenshot=base64.b64decode(shot))
    for ev in (e for e in pipe.events if e.get("sessionId") == sid):
        method, params = ev["method"], ev.get("params", {})
        if method == "Network.requestWillBeSent":
            load.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            load.failed.append(
                f"{params.get('type')}: {params.get('errorText')} {params.get('blockedReason') or ''}"
            )
        elif method == "Network.responseReceived" and params["response"].get("status", 200) >= 400:
            load.failed.append(f"HTTP {params['response']['status']} {params['response']['url']}")
        elif method == "Runtime.exceptionThrown":
            load.errors.append(json.dumps(params.get("exceptionDetails", {}))[:300])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            load.errors.append(params["entry"]["text"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            load.errors.append(json.dumps(params.get("args", []))[:300])
    return load


@pytest.fixture()
def chromium() -> str:
    """Chromium's path; skipped without it, except in CI where it must be installed."""
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return CHROMIUM


def assert_renders_clean(page: Path) -> PageLoad:
    """Load ``page``: no external request, nothing failed, no error; the screenshot is not blank."""
    from PIL import Image

    load = load_in_chromium(page.resolve().as_uri())
    assert load.requests and load.requests[0].startswith("file:"), load.requests
    assert load.external == [], load.external
    assert load.failed == [], load.failed
    assert load.errors == [], load.errors
    assert load.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(load.screenshot) > 20_000
    img = Image.open(io.BytesIO(load.screenshot)).convert("RGB")
    pixels = np.asarray(img).reshape(-1, 3)
    colours = len(np.unique(pixels, axis=0))
    not_white = float((pixels.min(axis=1) < 245).mean())
    assert colours > 50 and not_white > 0.05, (colours, not_white)
    return load


# --------------------------------------------------------------------------- parsing the page


class _Page(HTMLParser):
    """Tags, URL-bearing attributes, sections, and the tables of each section as cell texts."""

    URL_ATTRS = {"src", "href", "xlink:href", "action", "poster", "srcset", "data", "formaction"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.meta: dict[str, str] = {}
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.defs: dict[str, list[str]] = {}
        self.text: list[str] = []
        self.style = ""
        self.css_urls: list[str] = []  # url(...) in any attribute (SVG clip-path="url(#p1)", style=...)
        self._section = ""
        self._cell: list[str] | None = None
        self._in_dt = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.urls += [v for k, v in a.items() if k in self.URL_ATTRS]
        self.css_urls += [m.strip("'\" ") for v in a.values() for m in re.findall(r"url\(([^)]*)\)", v)]
        if tag == "meta":
            self.meta[a.get("name") or a.get("http-equiv", "")] = a.get("content", "")
        elif tag == "section":
            self._section = a.get("id", "")
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self.tables[self._section][-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "dt":
            self._in_dt = True
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._section][-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "dt" and self._cell is not None:
            self.defs.setdefault(self._section, []).append("".join(self._cell).strip())
            self._cell, self._in_dt = None, False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.tags and self.tags[-1] == "style":
            self.style += data
        if self._cell is not None:
            self._cell.append(data)

    def table(self, section: str, index: int = 0) -> pd.DataFrame:
        rows = self.tables[section][index]
        return pd.DataFrame(rows[1:], columns=rows[0])


def assert_self_contained(text: str) -> _Page:
    """No script or external resource; every URL inline or in-page; the generator and CSP tags."""
    page = _Page(text)
    for tag in ("script", "link", "iframe", "object", "embed", "base", "img", "audio", "video"):
        assert tag not in page.tags, tag
    assert all(u.startswith(("data:", "#")) for u in page.urls), [
        u[:60] for u in page.urls if u[:5] != "data:"
    ]
    assert "@import" not in page.style and "url(" not in page.style
    assert all(u.startswith(("#", "data:")) for u in page.css_urls), page.css_urls
    assert page.meta["generator"].startswith("moescope ")
    assert "default-src 'none'" in page.meta["Content-Security-Policy"]
    return page


# --------------------------------------------------------------------------- traces


def _synthetic(
    meta: dict[str, Any] | None = None, domains: tuple[str, ...] = ("code", "prose")
) -> TraceState:
    """A 2-layer, 8-expert trace with known sums (a dead expert in layer 1, two domains)."""
    rng = np.random.default_rng(0)
    s = TraceState(layers=[1, 2], num_experts=8, top_k=2,
                   meta={"model": "synthetic", "hidden_size": 64, "dtype": "bfloat16", **(meta or {})})  # fmt: skip
    s.tokens, s.windows, s.batches = 1000, 4, 2
    s.counts[0] = [700, 500, 400, 300, 50, 40, 10, 0]
    s.counts[1] = [250] * 8
    s.weight_fx[:] = (s.counts * 0.5 * 2**20).astype(np.int64)
    s.top1_fx[:] = int(0.7 * 1000 * 2**20)
    s.top1_hist[:, 12] = 600
    s.top1_hist[:, 16] = 400
    s.coact[0, 0, 1] = 400
    s.coact[1, 2, 3] = 60
    s.reuse[:] = [900, 300]
    s.reuse_pairs[:] = [900, 900]
    s.cap_dropped[:] = [[300, 200, 100, 0], [0, 0, 0, 0]]
    s.ep_distinct[:] = rng.integers(1000, 2000, size=s.ep_distinct.shape)
    s.ep_batch_max[:] = rng.integers(500, 1000, size=s.ep_batch_max.shape)
    for d, name in enumerate(domains):
        i = s.domain_index(name)
        s.dom_counts[i] = s.counts // len(domains) + (d if d else 0)
    return s


def _write(tmp: Path, state: TraceState, name: str = "t") -> Path:
    out = tmp / name
    write_trace_dir(out, state, timings={"trace_seconds": 1.0}, plots=False)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo model traced (through the CLI, SVG plots) on a 3-domain slice of its corpus,
    its similarity (PDF heatmaps) and a pruning plan, and the HTML page of all three."""
    from moescope.corpus.read import read_corpus

    root = tmp_path_factory.mktemp("demo_html")
    picked: dict[str, int] = {}
    lines = []
    for doc in read_corpus(["demo"], split="heldout"):
        if picked.get(doc.domain, 0) < 2:
            picked[doc.domain] = picked.get(doc.domain, 0) + 1
            lines.append(json.dumps({"text": doc.text[:1500], "domain": doc.domain}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    t, sim, pruned = root / "trace", root / "sim", root / "pruned"
    for args in (
        [
            "trace",
            "demo",
            root / "corpus.jsonl",
            "--seq-len",
            "128",
            "--plot-format",
            "svg",
            "--out",
            t,
            "-q",
        ],
        ["similarity", "demo", "--trace", t, "--no-outputs", "--plot-format", "pdf", "--out", sim, "-q"],
        ["prune", "demo", "--trace", t, "--drop", "2", "--out", pruned, "-q"],
    ):
        res = invoke(args)
        assert res.exit_code == 0, (args, res.stderr)
    html = root / "report.html"
    page = write_html_report(t, html, similarity=sim, prune_manifest=pruned / "prune_manifest.json")
    return {"root": root, "trace": t, "sim": sim, "pruned": pruned, "html": html, "page": page}


# --------------------------------------------------------------------------- the demo page


@pytest.mark.slow
def test_demo_page_is_self_contained_and_complete(demo: dict[str, Any]) -> None:
    text = demo["html"].read_text()
    page = assert_self_contained(text)
    sections = [
        "summary",
        "layers",
        "confidence",
        "capacity",
        "ep",
        "coactivation",
        "domains",
        "similarity",
        "prune",
    ]
    assert [s for s in sections if s in page.tables or s in page.defs] == sections
    figures = demo["page"].figures
    assert sorted(f for f in figures if f in FIGURES) == sorted(FIGURES) and "confidence" in figures
    assert [f for f in figures if f.startswith("similarity_layer")] == [
        f"similarity_layer{i:03d}" for i in range(4)
    ]
    assert text.count("<svg") == len(figures)
    assert demo["page"].bytes == demo["html"].stat().st_size
    print(f"\ndemo HTML report: {demo['page'].bytes:,} bytes, written in {demo['page'].seconds:.2f} s")


@pytest.mark.slow
def test_demo_page_numbers_equal_the_trace_files(demo: dict[str, Any]) -> None:
    """Per-layer imbalance, dead experts, capacity, the top redundant pair and the plan, from the files."""
    page = _Page(demo["html"].read_text())
    load = pd.read_csv(demo["trace"] / "expert_load.csv")
    layers = page.table("layers", 0).set_index("layer")
    for layer, grp in load.groupby("layer"):
        counts = grp["count"].to_numpy(float)
        row = layers.loc[str(layer)]
        assert float(row["max/mean"]) == pytest.approx(counts.max() / counts.mean(), abs=0.006)
        assert float(row["cv"]) == pytest.approx(counts.std() / counts.mean(), abs=6e-4)
        assert int(row["dead"]) == int((counts == 0).sum())
    cap = pd.read_csv(demo["trace"] / "capacity.csv")
    shown = page.table("capacity", 0).set_index("layer")
    for r in cap.itertuples():
        assert (
            shown.loc[str(r.layer), f"C={r.capacity_factor:g}"] == f"{100 * r.dropped / r.assignments:.1f}%"
        )
    pairs = pd.read_csv(demo["sim"] / "pairs.csv")
    per_layer = page.table("similarity", 0).set_index("layer")
    for layer, grp in pairs.groupby("layer"):
        best = grp.sort_values("redundancy", ascending=False).iloc[0]
        assert per_layer.loc[str(layer), "top pair"] == f"{int(best.expert_a)}-{int(best.expert_b)}"
    manifest = json.loads((demo["pruned"] / "prune_manifest.json").read_text())
    plan = page.table("prune", 1).set_index("layer")
    for layer, rec in manifest["layers"].items():
        assert plan.loc[layer, "dropped"] == ", ".join(str(e) for e in rec["dropped"])


@pytest.mark.slow
def test_plot_format_files_are_the_owned_files(demo: dict[str, Any]) -> None:
    summary = json.loads((demo["trace"] / "summary.json").read_text())
    svgs = sorted(f for f in summary["owned_files"] if f.startswith("plots/"))
    assert svgs == sorted(f"plots/{n}.svg" for n in FIGURES)
    assert all((demo["trace"] / f).read_bytes().lstrip().startswith(b"<?xml") for f in svgs)
    sim = json.loads((demo["sim"] / "similarity.json").read_text())
    pdfs = sorted(f for f in sim["owned_files"] if f.startswith("plots/"))
    assert pdfs == [f"plots/similarity_layer{i:03d}.pdf" for i in range(4)]
    assert all((demo["sim"] / f).read_bytes().startswith(b"%PDF") for f in pdfs)


@pytest.mark.slow
def test_demo_page_renders_in_chromium(demo: dict[str, Any], chromium: str) -> None:
    load = assert_renders_clean(demo["html"])
    # every raster inside the SVG figures was loaded as inline data, and nothing else
    assert all(u.startswith("data:image/png") for u in load.requests[1:])


# --------------------------------------------------------------------------- synthetic pages


@pytest.mark.slow
def test_synthetic_page_renders_in_chromium(tmp_path: Path, chromium: str) -> None:
    out = tmp_path / "r.html"
    write_html_report(_write(tmp_path, _synthetic()), out)
    assert_renders_clean(out)


@pytest.mark.slow
def test_checker_sees_external_requests_and_failed_loads(tmp_path: Path, chromium: str) -> None:
    """Negative control: the same checks flag an external image and a missing local one."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><h1 style="color:#c00">x</h1>'
        '<img src="http://example.invalid/x.png"><img src="missing.png"></body></html>'
    )
    load = load_in_chromium(bad.as_uri())
    assert load.external == ["http://example.invalid/x.png"]
    assert len(load.failed) == 2, load.failed
    with pytest.raises(AssertionError):
        assert_renders_clean(bad)
    with pytest.raises(AssertionError):
        assert_self_contained(bad.read_text())


def test_definitions_sit_beside_their_tables(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    write_html_report(_write(tmp_path, _synthetic()), out)
    page = assert_self_contained(out.read_text())
    assert {"max/mean", "cv", "entropy", "dead / near-dead", "reuse/chance"} <= set(page.defs["layers"])
    assert page.defs["capacity"] == ["capacity"] and "co-activation" in page.defs["coactivation"]
    assert f"{NEAR_DEAD_FRACTION:g} ×" in DEFINITIONS["dead / near-dead"]
    assert f"fewer than {MIN_PAIR_COUNT} times" in DEFINITIONS["co-activation"]
    layers = page.table("layers", 0).set_index("layer")
    counts = _synthetic().counts[0]
    near = int(((counts > 0) & (counts < NEAR_DEAD_FRACTION * counts.mean())).sum())
    assert layers.loc["1", "dead"] == "1" and layers.loc["1", "near-dead"] == str(near)
    assert page.table("layers", 1).set_index("layer").loc["1", "dead experts"] == "7"


def test_text_from_the_inputs_is_escaped(tmp_path: Path) -> None:
    evil = '<script>alert(1)</script><img src="http://example.invalid/x">'
    state = _synthetic({"model": evil}, domains=("<marquee>code</marquee>", "prose & more"))
    out = tmp_path / "r.html"
    write_html_report(_write(tmp_path, state), out)
    text = out.read_text()
    page = assert_self_contained(text)
    assert "<script>alert(1)</script>" in "".join(page.text)  # shown as text, not run
    assert (
        "marquee" not in page.tags
        and "&lt;marquee&gt;code&lt;/marquee&gt;" in text
        and "prose &amp; more" in text
    )


def test_missing_data_reads_not_available(tmp_path: Path) -> None:
    """Imported counts-only routing: the statistics it cannot support say why instead of 0."""
    state = _synthetic({"lacks": ["gate_weights", "token_order", "coactivation"]}, domains=())
    out = tmp_path / "r.html"
    result = write_html_report(_write(tmp_path, state), out)
    page = _Page(out.read_text())
    layers = page.table("layers", 0)
    for col in ("top-1 weight", "reuse", "reuse by chance", "reuse/chance", "max co-act"):
        assert set(layers[col]) == {"not available"}, col
    text = " ".join(" ".join(page.text).split())
    assert "not available: the routing was recorded without the gate weights" in text
    assert "not available: only per-expert counts were recorded, not which experts" in text
    assert "not available: the corpus had no domain labels" in text
    assert "max/mean" in layers and layers["max/mean"].iloc[0] != "not available"  # counts still shown
    assert not {"confidence", "coactivation", "domain_heatmap"} & set(result.figures)
    assert {"mean_top1_weight", "reuse_ratio", "coactivation", "domains"} <= set(result.unavailable)


def test_counts_only_import_reads_not_available(tmp_path: Path) -> None:
    """SGLang ``stat`` dumps (counts only): capacity, per-batch EP, co-activation, confidence say why."""
    from moescope.importers import common
    from moescope.importers.api import STAT_LACKS

    names = {v for k, v in vars(common).items() if k.startswith("LACKS_")}
    assert names <= set(WHY), names - set(WHY)  # every lack the importers record is explained
    out = tmp_path / "r.html"
    result = write_html_report(_write(tmp_path, _synthetic({"lacks": list(STAT_LACKS)}, domains=())), out)
    page = _Page(out.read_text())
    ep = page.table("ep", 0)
    assert set(ep["per batch"]) == {"not available"} and set(ep["dedup a2a/token"]) == {"not available"}
    assert ep["imbalance (mean)"].str.match(r"^\d+\.\d\d$").all()  # from counts: still shown
    assert "capacity" not in page.tables and "capacity" not in result.figures
    text = " ".join(" ".join(page.text).split())
    assert f"not available: {WHY['capacity']}" in text and f"not available: {WHY['gate_weights']}" in text
    assert {"load_bars", "load_heatmap"} <= set(result.figures)
    assert not {"confidence", "coactivation", "capacity", "domain_heatmap"} & set(result.figures)


# --------------------------------------------------------------------------- destinations


@pytest.mark.slow
def test_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    trace = _write(tmp_path, _synthetic())
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>my notes</html>")
    (tmp_path / "folder").mkdir()
    before = snapshot(tmp_path)
    for dest, words in (
        (foreign, "not a moescope HTML report"),
        (tmp_path / "folder", "is a directory"),
        (trace, "is a directory"),
        (trace / "report.html", "inside the input"),
        (trace / "summary.json", "inside the input"),
    ):
        with pytest.raises(OutputError, match=words):
            write_html_report(trace, dest)
        assert_clean_error(invoke(["report", trace, "--html", dest, "-q"]), 1, words)
    assert snapshot(tmp_path) == before
    ours = tmp_path / "ours.html"
    write_html_report(trace, ours)
    first = ours.read_bytes()
    ours.write_bytes(first.replace(b"synthetic", b"edited"))
    write_html_report(trace, ours)  # its own report: replaced
    assert ours.read_bytes() == first
    res = invoke(["report", trace, "--html", ours])  # and through the CLI, tables still printed
    assert res.exit_code == 0 and "max/mean" in res.stdout and f"wrote {ours}" in res.stderr, res.stderr
    assert ours.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.html", "ours.html", "t"]


def test_extra_inputs_are_checked(tmp_path: Path) -> None:
    trace = _write(tmp_path, _synthetic())
    out = tmp_path / "r.html"
    assert_clean_error(invoke(["report", trace, "--html", out, "--similarity", trace]), 1, "similarity.json")
    assert_clean_error(invoke(["report", trace, "--html", out, "--prune-manifest", trace / "summary.json"]), 1,
                       "not a complete moescope prune output")  # fmt: skip
    assert_clean_error(invoke(["report", trace, "--similarity", trace]), 2, "--html")
    assert not out.exists()


# --------------------------------------------------------------------------- --plot-format


@pytest.mark.slow
def test_plot_formats(tmp_path: Path) -> None:
    from moescope.cli._options import PLOT_FORMATS as CLI_FORMATS

    assert CLI_FORMATS == PLOT_FORMATS
    state = _synthetic()
    heads = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}
    for fmt in PLOT_FORMATS:
        paths = write_plots(state, tmp_path / fmt, fmt)
        assert [p.name for p in paths] == [f"{n}.{fmt}" for n in FIGURES]
        assert all(p.read_bytes().startswith(heads[fmt]) for p in paths)
        if fmt != "png":  # no creation date: the same sums give the same bytes
            again = write_plots(state, tmp_path / f"{fmt}2", fmt)
            assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    with pytest.raises(ValueError, match="png, svg, pdf"):
        write_plots(state, tmp_path / "x", "jpg")


def test_plot_format_is_validated_before_any_work(tmp_path: Path) -> None:
    for cmd in (
        ["trace", "demo", "demo", "--out", tmp_path / "t"],
        ["similarity", "demo", "--out", tmp_path / "s"],
    ):
        res = invoke([*cmd, "--plot-format", "jpeg"])
        assert_clean_error(res, 2, "unknown plot format 'jpeg'")
    assert list(tmp_path.iterdir()) == []
