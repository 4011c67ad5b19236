"""The live dashboard in a real browser: headless Chromium loads ``/dashboard`` from the API
on Ray Serve, runs its polling JavaScript under virtual time, and the rendered DOM (and a
screenshot) is checked against what the API itself answers."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from api_fixtures import ApiServer

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Virtual time runs the page's 2 s polling timers without waiting for them in real time.
    "--virtual-time-budget=15000",
)
SVG_NS = "http://www.w3.org/2000/svg"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def elements(self, tag: str | None = None) -> list[Node]:
        """Descendant elements in document order, of one tag if given."""
        out: list[Node] = []
        for child in self.children:
            if isinstance(child, Node):
                if tag is None or child.tag == tag:
                    out.append(child)
                out.extend(child.elements(tag))
        return out


class Dom(HTMLParser):
    """The dumped DOM as a tree (Chromium serializes it well formed, so no repair)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self._open = [self.root]
        self.feed(html)
        self.close()
        self.ids = {n.attrs["id"]: n for n in self.root.elements() if "id" in n.attrs}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self._open[-1].children.append(node)
        if tag not in VOID:
            self._open.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)

    def __getitem__(self, id_: str) -> Node:
        return self.ids[id_]

    def body(self) -> Node:
        return self.root.elements("body")[0]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if path is None:
        pytest.fail(
            f"Chromium is not installed ({CHROMIUM}): `make test` installs it (Debian package "
            "`chromium`); or run `sudo apt-get install -y chromium`",
            pytrace=False,
        )
    return path


def _browse(chromium: str, url: str, profile: Path, *extra: str) -> str:
    """Run headless Chromium on ``url`` with a fresh profile; returns its stdout."""
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def _dom(chromium: str, url: str, profile: Path) -> tuple[Dom, str]:
    html = _browse(chromium, url, profile, "--dump-dom")
    return Dom(html), html


def _get(api: ApiServer, path: str) -> dict:
    r = httpx.get(api.url + path, headers={"X-API-Key": api.read_key}, timeout=60)
    r.raise_for_status()
    return r.json()


def test_page_is_served_without_a_key_and_loads_nothing_else(api_server: ApiServer) -> None:
    r = httpx.get(api_server.url + "/dashboard", timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    # Air-gapped: the only URL in the page is the SVG namespace, which is never fetched.
    assert set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", page)) == {SVG_NS}
    assert "default-src 'none'" in page
    assert "connect-src 'self'" in page


def test_dashboard_renders_the_api_live(
    api_server: ApiServer, chromium: str, tmp_path: Path
) -> None:
    pnl = _get(api_server, "/v1/pnl")
    positions = _get(api_server, "/v1/positions")["items"]
    newest = _get(api_server, "/v1/decisions?order=desc&limit=1")["items"]
    assert positions, "the backtest should have traded"
    assert newest
    assert pnl["equity_curve"]

    dom, html = _dom(
        chromium, f"{api_server.url}/dashboard#key={api_server.read_key}", tmp_path / "profile"
    )

    assert dom.body().attrs.get("data-state") == "live", dom["status"].text()
    assert dom["status"].attrs["data-status"] == "live"
    assert "Connected" in dom["status"].text()
    # The key travels in a header only: the page never writes it anywhere.
    assert api_server.read_key not in html

    equity = dom["equity"]
    assert float(equity.attrs["data-value"]) == pytest.approx(pnl["equity"])
    assert equity.text() == f"{pnl['equity']:,.2f}"
    for id_, key in [("realized", "realized_pnl"), ("fees", "fees"), ("drawdown", "drawdown")]:
        assert float(dom[id_].attrs["data-value"]) == pytest.approx(pnl[key])
    assert int(dom["open-positions"].attrs["data-value"]) == pnl["open_positions"]
    assert dom["risk-state"].attrs["data-value"] in {"active", "reducing", "halted"}

    shown = {r.attrs["data-symbol"]: r for r in dom["positions-body"].elements("tr")}
    assert len(shown) == len(dom["positions-body"].elements("tr")) == len(positions)
    for position in positions:
        row = shown[position["symbol"]]
        assert int(row.attrs["data-quantity"]) == position["quantity"]
        assert row.elements("td")[0].text() == position["symbol"]

    first = dom["decisions-body"].elements("tr")[0]
    cells = [td.text() for td in first.elements("td")]
    assert first.attrs["data-symbol"] == newest[0]["symbol"]
    assert newest[0]["symbol"] in cells
    assert first.attrs["data-action"] == newest[0]["action"]
    assert newest[0]["action"].upper() in cells

    path = dom["equity-path"]
    points = re.findall(r"(-?[\d.]+),(-?[\d.]+)", path.attrs["d"])
    assert path.attrs["d"].startswith("M")
    assert len(points) == max(2, int(path.attrs["data-points"])) >= 2
    assert len({x for x, _ in points}) > 1, "the curve should span time"


def test_dashboard_screenshot(api_server: ApiServer, chromium: str, tmp_path: Path) -> None:
    shot = tmp_path / "dash.png"
    _browse(
        chromium,
        f"{api_server.url}/dashboard#key={api_server.read_key}",
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1280,800",
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1280, 800)  # the IHDR chunk's size
    # A blank or error page compresses to a few kB; the rendered desk is far larger.
    assert len(data) > 10_000


@pytest.mark.parametrize(
    ("fragment", "state"), [("#key=rf_not-a-valid-key", "refused"), ("", "nokey")]
)
def test_dashboard_without_a_valid_key_asks_for_one(
    api_server: ApiServer, chromium: str, tmp_path: Path, fragment: str, state: str
) -> None:
    dom, _ = _dom(chromium, f"{api_server.url}/dashboard{fragment}", tmp_path / "profile")
    assert dom.body().attrs.get("data-state") == state
    assert dom["status"].attrs["data-status"] == state
    assert "open" in dom["key-dialog"].attrs.get("class", "").split()
    assert dom["equity"].attrs.get("data-value") is None  # nothing rendered
    if state == "refused":
        assert "refused" in dom["key-message"].text()
