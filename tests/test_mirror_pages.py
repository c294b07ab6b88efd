"""The mirror's web page, served for real beside the Hub API: the repos table with its figures,
sorted and filtered on the server; one repo's files with their mixes and working download links;
the family graph of a real base and its fine-tune (a delta of it); the totals. Names from a repo
come out escaped, gated and private repos stay hidden from a request without a token, the JSON
agrees with the inventory, and the Hub API's own paths answer as before. A real Chromium draws
the family graph. The store is filled by pulling from the Hub stand-in."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from elves.mirror.inventory import inventory
from elves.mirror.pages import size
from elves.mirror.pull import pull
from elves.mirror.server import app
from elves.store import Store
from tests.hub_standin import HubStandin, folder_files
from tests.test_mirror_serve import raw, running

pytestmark = pytest.mark.realdata

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TOKEN = "page-secret"
SCRIPT = "<script>alert(1)</script>.txt"
SMALL = {"config.json": b'{"hidden": 8}\n', SCRIPT: b"hello\n", "weights.bin": bytes(range(256)) * 64}
HIDDEN = ("org/gated", "org/private")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def mirror(dataset, tmp_path_factory):
    """A store holding minilm, a fine-tune of it (stored as its delta), a small repo with a file
    named like a script tag, and a gated and a private repo; served open and behind a token."""
    roots = {"minilm": dataset("minilm"), "ft": dataset("minilm-family/last-layers")}
    with HubStandin() as hub:
        hub.commit(MINILM, folder_files(roots["minilm"]))
        hub.commit("me/ft", folder_files(roots["ft"]))
        for name in ("org/small", *HIDDEN):
            hub.commit(name, SMALL)
        hub.set_gated("org/gated")
        hub.set_private("org/private")
        store = Store.init(tmp_path_factory.mktemp("pages") / "store")
        for name in (MINILM, "me/ft", "org/small", *HIDDEN):
            pull(store, name, endpoint=hub.url, token="hf_good")
    repos, totals = inventory(store)
    with running(app(store)) as url, running(app(store, tokens=[TOKEN])) as token_url:
        yield SimpleNamespace(store=store, url=url, token_url=token_url, roots=roots, repos=repos, totals=totals,
                              commits={r.repo_id: r.commits[-1] for r in repos})


def get(url: str, path: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    status, headers, body = raw(url, "GET", path, {"Authorization": f"Bearer {token}"} if token else {})
    return status, headers, body.decode()


def page(url: str, path: str, token: str | None = None) -> str:
    status, headers, body = get(url, path, token)
    assert status == 200 and headers["content-type"].startswith("text/html"), (path, status, body[:300])
    return body


def api(url: str, path: str, token: str | None = None) -> object:
    status, headers, body = get(url, path, token)
    assert status == 200 and headers["content-type"] == "application/json", (path, status, body[:300])
    return json.loads(body)


def table_repos(html: str) -> list[str]:
    """The repo ids of the repos table's rows, top to bottom."""
    return re.findall(r'<td class="repo"><a href="[^"]*">([^<]*)</a>', html)


def test_the_repos_page_shows_each_commit_and_the_totals(mirror):
    html = page(mirror.url, "/")
    assert table_repos(html) == ["me/ft", "org/small", MINILM]           # by name, hidden repos left out
    for name in table_repos(html):
        c = mirror.commits[name]
        row = html[html.index(f">{name}</a>"):].split("</tr>")[0]
        for figure in (c.commit[:12], size(c.logical_bytes), size(c.stored_bytes), size(c.new_bytes),
                       f"{c.ratio:.2f}×", c.pulled.replace("T", " ").replace("Z", " UTC"), f">{c.files}<"):
            assert figure in row, (name, figure)
    assert ('class="tag delta"' in html[html.index(">me/ft</a>"):].split("</tr>")[0])   # the fine-tune is a delta
    t = mirror.totals
    for figure in (size(t.logical_bytes), size(t.file_dedup_bytes), size(t.stored_bytes),
                   f"{t.logical_bytes / t.stored_bytes:.2f}×"):
        assert figure in html
    assert page(mirror.url, "/ui") == html
    assert "<script" not in html


def test_the_repos_table_sorts_and_filters_on_the_server(mirror):
    by_logical = sorted(table_repos(page(mirror.url, "/")), key=lambda n: mirror.commits[n].logical_bytes)
    assert table_repos(page(mirror.url, "/?sort=logical&order=desc")) == by_logical[::-1]
    assert table_repos(page(mirror.url, "/?sort=logical&order=asc")) == by_logical
    html = page(mirror.url, "/?q=MINILM&sort=added&order=desc")
    assert table_repos(html) == [MINILM]                                   # the name filter ignores case
    assert '<a href="?q=MINILM&amp;sort=added&amp;order=asc">Added' in html  # the active column flips
    assert 'value="MINILM"' in html
    assert table_repos(page(mirror.url, "/?q=nothing-like-it")) == []
    assert table_repos(page(mirror.url, "/?sort=bogus&order=sideways")) == table_repos(page(mirror.url, "/"))


def test_a_repo_page_lists_files_with_mixes_and_download_links(mirror):
    c = mirror.commits["me/ft"]
    html = page(mirror.url, "/ui/models/me/ft")
    listed = mirror.store.model(c.model).files()
    assert len(re.findall(r'<td class="path">', html)) == len(listed) == c.files
    for f in listed:
        row = html[html.index(f'<td class="path">{f.path}'):].split("</tr>")[0]
        assert size(f.size) in row and size(f.stored_bytes) in row, f.path
    weights = html[html.index('<td class="path">model.safetensors'):].split("</tr>")[0]
    assert "F32" in weights and "xor+planes+rans" in weights               # coded against the base
    assert f'href="/ui/models/{MINILM}?commit={mirror.commits[MINILM].commit}"' in html
    for link in re.findall(r'class="dl" href="([^"]*)"', html):
        path = link.split(f"/resolve/{c.commit}/")[1]
        if path != "model.safetensors":                                   # the small files, through the mirror
            status, _, body = raw(mirror.url, "GET", link)
            assert status == 200 and body == (mirror.roots["ft"] / path).read_bytes(), path
    status, _, body = get(mirror.url, "/ui/models/me/ft?commit=" + "0" * 40)
    assert status == 404 and "Not here" in body


def test_names_from_a_repo_are_escaped(mirror):
    html = page(mirror.url, "/ui/models/org/small")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.txt" in html
    assert "<script" not in html and "alert(1)</" not in html
    link = re.search(r'class="dl" href="([^"]*%3Cscript[^"]*)"', html)
    assert link and raw(mirror.url, "GET", link[1])[2] == SMALL[SCRIPT]    # and the link downloads it
    files = api(mirror.url, "/api/elves/models/org/small")["files"]
    assert SCRIPT in [f["path"] for f in files]
    status, _, body = get(mirror.url, "/ui/models/org/%3Cb%3E")           # not a repo id: plain 404
    assert status == 404 and "<b>" not in body


def test_gated_and_private_repos_need_a_token(mirror):
    for path in ("/", "/ui/families", "/api/elves/repos", "/api/elves/families"):
        body = get(mirror.url, path)[2]
        assert all(name not in body for name in HIDDEN), path
    for name in HIDDEN:                                                   # no token list: nobody has one
        for path in (f"/ui/models/{name}", f"/api/elves/models/{name}"):
            assert get(mirror.url, path)[0] == 404
            assert get(mirror.url, path, TOKEN)[0] == 404
    for token in (None, "wrong"):                                         # a token list: as the Hub API
        assert get(mirror.token_url, "/", token)[0] == 401
        assert get(mirror.token_url, "/api/elves/repos", token)[0] == 401
    status, headers, _ = get(mirror.token_url, "/")
    assert headers["www-authenticate"].startswith("Basic")                # a browser asks for the token...
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    for password in (TOKEN, "wrong"):                                      # ...and sends it as the password
        auth = {"Authorization": "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()}
        assert raw(mirror.token_url, "GET", "/", auth)[0] == (200 if password == TOKEN else 401)
    assert raw(mirror.token_url, "GET", "/", {"Authorization": "Basic !!notbase64"})[0] == 401
    html = raw(mirror.token_url, "GET", "/", {"Authorization": f"Basic {basic}"})[2].decode()
    assert table_repos(html) == ["me/ft", "org/gated", "org/private", "org/small", MINILM]
    html = page(mirror.token_url, "/", TOKEN)
    assert table_repos(html) == ["me/ft", "org/gated", "org/private", "org/small", MINILM]
    assert 'class="tag warn">gated<' in html and 'class="tag warn">private<' in html
    assert SCRIPT.replace("<", "&lt;").replace(">", "&gt;") in page(mirror.token_url, "/ui/models/org/gated", TOKEN)


def test_the_json_agrees_with_the_inventory(mirror):
    shown = [r.to_json() for r in mirror.repos if r.repo_id not in HIDDEN]
    assert api(mirror.url, "/api/elves/repos") == {"repos": shown, "totals": mirror.totals.to_json()}
    assert api(mirror.token_url, "/api/elves/repos", TOKEN)["repos"] == [r.to_json() for r in mirror.repos]
    assert api(mirror.url, "/api/elves/totals") == mirror.totals.to_json()
    families = api(mirror.url, "/api/elves/families")["families"]
    base, ft = mirror.commits[MINILM], mirror.commits["me/ft"]
    assert [(f["repo"], [c["repo"] for c in f["children"]]) for f in families] == [(MINILM, ["me/ft"]),
                                                                                   ("org/small", [])]
    child = families[0]["children"][0]
    assert (child["base"], child["new_bytes"], child["logical_bytes"]) == (base.model, ft.new_bytes,
                                                                          ft.logical_bytes)
    repo = api(mirror.url, "/api/elves/models/me/ft")
    assert repo["commit"] == ft.commit and repo["commits"] == shown[0]["commits"]
    model = mirror.store.model(ft.model)
    assert ([(f["path"], f["size"], f["stored_bytes"], f["tensors"]) for f in repo["files"]]
            == [(f.path, f.size, f.stored_bytes, f.tensors) for f in model.files()])
    weights = next(f for f in repo["files"] if f["path"] == "model.safetensors")
    assert sum(weights["dtypes"].values()) == sum(weights["codecs"].values()) == sum(
        t.nbytes for t in model.tensors())
    assert weights["url"] == f"/me/ft/resolve/{ft.commit}/model.safetensors"


def test_the_hub_api_answers_as_before(mirror):
    info = api(mirror.url, "/api/models/org/small")
    assert info["sha"] == mirror.commits["org/small"].commit
    assert raw(mirror.url, "HEAD", "/org/small/resolve/main/config.json")[0] == 200
    for path in ("/api/telemetry/x", "/datasets/ui/families", "/ui/nothing", "/api/elves/nothing"):
        status, headers, body = get(mirror.url, path)
        assert (status, headers["content-type"], body) == (404, "text/plain; charset=utf-8", "Not Found"), path
    assert raw(mirror.url, "POST", "/")[0] == 404
    status, headers, _ = get(mirror.url, "/ui/style.css")
    assert status == 200 and headers["content-type"].startswith("text/css")


def test_links_follow_where_the_app_is_mounted(mirror):
    with running(Starlette(routes=[Mount("/hub", app(mirror.store))])) as url:
        html = page(url, "/hub/ui/models/org/small")
        assert 'href="/hub/ui/style.css"' in html and 'href="/hub/ui/families"' in html
        link = re.search(r'class="dl" href="(/hub/org/small/resolve/[^"]*config.json)"', html)
        assert link and raw(url, "GET", link[1])[2] == SMALL["config.json"]


def test_a_browser_draws_the_family_graph_and_the_totals(mirror, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            view = browser.new_page(viewport={"width": 1280, "height": 720})
            view.goto(mirror.url + "/ui/families")
            graph = view.locator("svg.graph")
            assert graph.count() == 1
            nodes, edges = graph.locator("g.node"), graph.locator("path.edge")
            assert [n.locator("title").text_content() for n in nodes.all()] == [
                f"{name} @ {mirror.commits[name].commit}" for name in (MINILM, "me/ft")]
            base, ft, edge = nodes.nth(0).bounding_box(), nodes.nth(1).bounding_box(), edges.bounding_box()
            assert edges.count() == 1 and base and ft and edge
            base_right, edge_right = base["x"] + base["width"], edge["x"] + edge["width"]
            assert base["width"] > 100 and base_right < ft["x"]                    # base, edge, delta: left to right
            assert base["x"] < edge["x"] <= base_right + 2 and ft["x"] - 2 <= edge_right < ft["x"] + ft["width"]
            assert f"+{size(mirror.commits['me/ft'].new_bytes)}" in graph.text_content()
            totals = view.locator("#totals").inner_text()
            assert size(mirror.totals.logical_bytes) in totals and size(mirror.totals.stored_bytes) in totals
            view.screenshot(path=tmp_path / "mirror-page.png", full_page=True)
            assert (tmp_path / "mirror-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            browser.close()
