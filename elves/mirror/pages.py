"""The mirror's read-only web pages, served beside the Hub API (``elves mirror serve``): what the
mirror holds, what it costs against full copies, and which repos are stored as deltas of which.

- ``/`` (and ``/ui``): the repos and their commits (revisions, files, logical and stored bytes,
  ratio, what each added to the store, last pull), sorted with ``?sort=&order=`` and filtered by
  name with ``?q=``, on the server: no JavaScript.
- ``/ui/models/{repo}`` (``/ui/datasets/{repo}``), ``?commit=``: one repo, its commits, and the
  files of one commit with their size, stored bytes, dtype and codec mix (by tensor bytes), and
  links that download through the mirror's own ``resolve`` URLs.
- ``/ui/families``: each base with the commits coded against it (a manifest's ``base``), drawn
  as a tree in server-side SVG, each delta with the bytes it added against a full copy.
- ``/ui/totals``: the store's stored bytes against full copies and file-level dedup.
- JSON of the same data: ``/api/elves/repos``, ``/api/elves/models/{repo}`` (or ``datasets``,
  with the commit's files), ``/api/elves/families``, ``/api/elves/totals``.

The server hands these pages only the paths its Hub API does not answer, so they never shadow
it. Access is the Hub API's: with a token list, a request without a listed token was already
refused (401, asking a browser for the token as the password of a Basic login). Gated and private repos are shown only to a request with a listed token; without
a token list, no request has one, so they are never shown. The totals are those of the whole
store. Whatever comes from a repo (ids, paths, revisions) is escaped by the templates
(autoescape, in the inline SVG too).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.templating import Jinja2Templates

from ..store import Store
from .inventory import CommitSummary, RepoSummary, inventory
from .records import REPO_ID_RE

TEMPLATES = Path(__file__).parent / "templates"
UNITS = ("B", "kB", "MB", "GB", "TB", "PB")
# The repos table's columns that sort, and what they sort by (a commit's row).
SORTS: dict[str, Callable[[RepoSummary, CommitSummary], Any]] = {
    "repo": lambda r, c: (r.repo_id.lower(), r.repo_type, c.pulled),
    "files": lambda r, c: c.files,
    "logical": lambda r, c: c.logical_bytes,
    "stored": lambda r, c: c.stored_bytes,
    "ratio": lambda r, c: c.ratio,
    "added": lambda r, c: c.new_bytes,
    "pulled": lambda r, c: c.pulled,
}
# The family graph's geometry, in SVG user units.
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 300, 74, 150, 18, 8
LABEL_CHARS = 32                   # the longest repo id a node shows whole


def size(n: float) -> str:
    """``n`` bytes in SI units, three significant figures or so: "91.6 MB"."""
    if n < 1000:
        return f"{int(n)} B"
    exp = min(int(math.log10(n)) // 3, len(UNITS) - 1)
    return f"{n / 1000 ** exp:.1f} {UNITS[exp]}"


def _shorten(text: str, chars: int = LABEL_CHARS) -> str:
    return text if len(text) <= chars else text[:chars // 2 - 1] + "…" + text[-(chars // 2 - 1):]


def _percent(x: float) -> str:
    return "100%" if x == 1 else "<0.1%" if 0 < x < 0.001 else f"{100 * x:.1f}%"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(size=size, short=_shorten,
                       ratio=lambda x: f"{x:.2f}×", pct=_percent,
                       when=lambda t: t.replace("T", " ").replace("Z", " UTC"))
    return env


_templates = Jinja2Templates(env=_env())


def visible(repos: list[RepoSummary], authorized: bool) -> list[RepoSummary]:
    """The repos a request may see: gated and private ones only with a listed token."""
    return [r for r in repos if authorized or not (r.gated or r.private)]


def repo_path(repo: RepoSummary) -> str:
    """Where a repo sits under ``/ui/`` and ``/api/elves/``: ``models/org/name``."""
    return f"{repo.repo_type}s/{repo.repo_id}"


# -- the repos table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One commit of a repo: a row of the repos table."""

    repo: RepoSummary
    commit: CommitSummary


def rows(repos: list[RepoSummary], query: str, sort: str, descending: bool) -> list[Row]:
    """The commits of ``repos`` whose repo id holds ``query`` (any case), sorted by column ``sort``."""
    key = SORTS.get(sort, SORTS["repo"])
    found = [Row(r, c) for r in repos if query.lower() in r.repo_id.lower() for c in r.commits]
    return sorted(found, key=lambda row: key(row.repo, row.commit), reverse=descending)


# -- one repo ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRow:
    """A file of a commit as the repo page shows it. ``dtypes`` and ``codecs`` are its tensors'
    bytes by dtype and by codec, largest first (empty for a file without tensors); ``delta_bytes``
    those coded against another model's tensors; ``url`` downloads it through the mirror."""

    path: str
    size: int
    stored_bytes: int
    format: str
    tensors: int
    dtypes: dict[str, int]
    codecs: dict[str, int]
    delta_bytes: int
    url: str

    @property
    def ratio(self) -> float:
        return self.size / max(self.stored_bytes, 1)


def resolve_url(root: str, repo: RepoSummary, commit: str, path: str) -> str:
    """The mirror's Hub download URL of ``path`` at ``commit``."""
    kind = "datasets/" if repo.repo_type == "dataset" else ""
    return f"{root}/{kind}{quote(repo.repo_id)}/resolve/{commit}/{quote(path)}"


def files(store: Store, root: str, repo: RepoSummary, commit: CommitSummary) -> list[FileRow]:
    """The files of ``commit`` with what the store's listing says of them (no payload read)."""
    model = store.model(commit.model)
    dtypes: defaultdict[str, Counter[str]] = defaultdict(Counter)
    codecs: defaultdict[str, Counter[str]] = defaultdict(Counter)
    deltas: Counter[str] = Counter()
    for t in model.tensors():
        dtypes[t.file][t.dtype] += t.nbytes
        codecs[t.file][t.codec] += t.nbytes
        deltas[t.file] += t.nbytes if t.reference is not None else 0
    return [FileRow(f.path, f.size, f.stored_bytes, f.format, f.tensors, dict(dtypes[f.path].most_common()),
                    dict(codecs[f.path].most_common()), deltas[f.path], resolve_url(root, repo, commit.commit, f.path))
            for f in model.files()]


def chosen_commit(repo: RepoSummary, asked: str | None) -> CommitSummary | None:
    """The commit ``?commit=`` names (a sha or a tracked revision); by default main's, else the
    newest."""
    if asked:
        return next((c for c in repo.commits if c.commit == asked or asked in c.revisions), None)
    return next((c for c in repo.commits if "main" in c.revisions), repo.commits[-1] if repo.commits else None)


# -- families ---------------------------------------------------------------------------------------

@dataclass
class Node:
    """A stored commit in the family forest. ``base_hidden``: it is coded against a model this
    request is not shown (a hidden repo, or a store model the mirror did not pull)."""

    repo: RepoSummary
    commit: CommitSummary
    children: list[Node] = field(default_factory=list)
    base_hidden: bool = False

    def walk(self) -> list[Node]:
        return [self, *(n for child in self.children for n in child.walk())]

    def to_json(self) -> dict[str, Any]:
        c = self.commit
        return {"type": self.repo.repo_type, "repo": self.repo.repo_id, "commit": c.commit, "model": c.model,
                "revisions": c.revisions, "base": None if self.base_hidden else c.base,
                "logical_bytes": c.logical_bytes, "stored_bytes": c.stored_bytes, "new_bytes": c.new_bytes,
                "children": [n.to_json() for n in self.children]}


def families(repos: list[RepoSummary]) -> list[Node]:
    """The commits of ``repos`` as trees, each under the commit it is coded against: bases with
    deltas first (most logical bytes first), then the commits stored on their own."""
    nodes = {c.model: Node(r, c) for r in repos for c in r.commits}
    roots = []
    for node in nodes.values():
        base = nodes.get(node.commit.base) if node.commit.base else None
        if base is not None:
            base.children.append(node)
        else:
            node.base_hidden = node.commit.base is not None
            roots.append(node)
    return sorted(roots, key=lambda n: (not n.children, -sum(m.commit.logical_bytes for m in n.walk()),
                                        n.repo.repo_id.lower()))


@dataclass(frozen=True)
class Box:
    """A node placed in the graph: its top-left corner; ``root``: the family's base."""

    node: Node
    x: int
    y: int
    root: bool


@dataclass(frozen=True)
class Edge:
    """From a base to a model coded against it: the SVG path, and where its label sits."""

    d: str
    label_x: int
    label_y: int
    node: Node


@dataclass(frozen=True)
class Graph:
    width: int
    height: int
    boxes: list[Box]
    edges: list[Edge]


def layout(root: Node) -> Graph:
    """A tree drawn left to right: a column per generation, each leaf a row, a base centred on
    the models coded against it."""
    boxes: list[Box] = []
    edges: list[Edge] = []
    rows = 0

    def place(node: Node, depth: int) -> int:
        nonlocal rows
        ys = [place(child, depth + 1) for child in node.children]
        if ys:
            y = (ys[0] + ys[-1]) // 2
        else:
            y = MARGIN + rows * (NODE_H + GAP_Y)
            rows += 1
        x = MARGIN + depth * (NODE_W + GAP_X)
        boxes.append(Box(node, x, y, depth == 0))
        for child, cy in zip(node.children, ys):
            x0, y0, x1, y1 = x + NODE_W, y + NODE_H // 2, x + NODE_W + GAP_X, cy + NODE_H // 2
            mid = (x0 + x1) // 2
            edges.append(Edge(f"M{x0},{y0} C{mid},{y0} {mid},{y1} {x1},{y1}", mid, (y0 + y1) // 2, child))
        return y

    place(root, 0)
    width = max(b.x for b in boxes) + NODE_W + MARGIN
    return Graph(width, MARGIN + rows * (NODE_H + GAP_Y) - GAP_Y + MARGIN, sorted(boxes, key=lambda b: (b.x, b.y)),
                 sorted(edges, key=lambda e: (e.label_x, e.label_y)))


# -- answers ----------------------------------------------------------------------------------------

class _Pages:
    """One request to the pages: what it may see, and the answers."""

    def __init__(self, store: Store, request: Request, authorized: bool):
        self.store = store
        self.request = request
        self.root = request.scope.get("root_path", "")
        summaries, self.totals = inventory(store)
        self.repos = visible(summaries, authorized)

    def page(self, name: str, status: int = 200, **context: Any) -> Response:
        context.update(root=self.root, totals=self.totals, repo_path=repo_path, node_w=NODE_W, node_h=NODE_H,
                       active="repos" if name.startswith("repo") else name.split(".")[0],
                       base_url=f"{self.request.url.scheme}://{self.request.url.netloc}{self.root}")
        return _templates.TemplateResponse(self.request, name, context, status_code=status)

    def find(self, kind: str, repo_id: str) -> RepoSummary | None:
        return next((r for r in self.repos if f"{r.repo_type}s" == kind and r.repo_id == repo_id), None)

    def repos_page(self) -> Response:
        params = self.request.query_params
        query, sort = params.get("q", "").strip(), params.get("sort", "repo")
        sort = sort if sort in SORTS else "repo"
        descending = params.get("order", "desc" if sort not in ("repo", "pulled") else "asc") == "desc"

        def link(column: str) -> str:
            first = "asc" if column == "repo" else "desc"
            order = ("asc" if descending else "desc") if column == sort else first
            return "?" + urlencode({**({"q": query} if query else {}), "sort": column, "order": order})

        return self.page("repos.html", rows=rows(self.repos, query, sort, descending), query=query, sort=sort,
                         descending=descending, links={c: link(c) for c in SORTS}, repo_count=len(self.repos))

    def repo_page(self, kind: str, repo_id: str) -> Response:
        repo = self.find(kind, repo_id)
        commit = chosen_commit(repo, self.request.query_params.get("commit")) if repo else None
        if repo is None or commit is None:
            return self.page("missing.html", 404, what=f"{kind[:-1]} {repo_id}")
        names = {c.model: (r, c) for r in self.repos for c in r.commits}
        return self.page("repo.html", repo=repo, commit=commit, bases=names,
                         files=files(self.store, self.root, repo, commit))

    def families_page(self) -> Response:
        roots = families(self.repos)
        trees = [(root, layout(root)) for root in roots if root.children]
        return self.page("families.html", trees=trees, alone=[r for r in roots if not r.children])

    def totals_page(self) -> Response:
        return self.page("totals.html")

    def repos_json(self) -> Response:
        return JSONResponse({"repos": [r.to_json() for r in self.repos], "totals": self.totals.to_json()})

    def families_json(self) -> Response:
        return JSONResponse({"families": [n.to_json() for n in families(self.repos)]})

    def totals_json(self) -> Response:
        return JSONResponse(self.totals.to_json())

    def repo_json(self, kind: str, repo_id: str) -> Response:
        repo = self.find(kind, repo_id)
        commit = chosen_commit(repo, self.request.query_params.get("commit")) if repo else None
        if repo is None or commit is None:
            return JSONResponse({"error": f"no {kind[:-1]} {repo_id} here"}, status_code=404)
        return JSONResponse({**repo.to_json(), "commit": commit.commit,
                             "files": [{**vars(f), "ratio": round(f.ratio, 3)}
                                       for f in files(self.store, self.root, repo, commit)]})


PAGES: dict[str, Callable[[_Pages], Response]] = {
    "": _Pages.repos_page, "families": _Pages.families_page, "totals": _Pages.totals_page}
API: dict[str, Callable[[_Pages], Response]] = {
    "repos": _Pages.repos_json, "families": _Pages.families_json, "totals": _Pages.totals_json}


def answer(store: Store, request: Request, authorized: bool) -> Response:
    """The page or JSON at the request's path; a plain 404 for any other path, as the Hub API
    gives. ``authorized``: the request carries one of the server's tokens."""
    if request.method not in ("GET", "HEAD"):
        return _not_found()
    parts = _route_path(request).strip("/").split("/")
    if parts == ["ui", "style.css"]:
        return Response((TEMPLATES / "style.css").read_bytes(), media_type="text/css",
                        headers={"Cache-Control": "max-age=3600"})
    api = parts[:2] == ["api", "elves"]
    if not (api or parts[0] in ("", "ui")):
        return _not_found()
    rest = parts[2:] if api else parts[1:]
    if len(rest) > 1 and rest[0] in ("models", "datasets"):
        repo_id = "/".join(rest[1:])
        if not REPO_ID_RE.fullmatch(repo_id):
            return _not_found()
        pages = _Pages(store, request, authorized)
        return pages.repo_json(rest[0], repo_id) if api else pages.repo_page(rest[0], repo_id)
    handler = (API if api else PAGES).get("/".join(rest))
    return _not_found() if handler is None else handler(_Pages(store, request, authorized))


def _route_path(request: Request) -> str:
    """The request's path (decoded) below where the application is mounted."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    return path[len(root):] if root and (path == root or path.startswith(root + "/")) else path


def _not_found() -> Response:
    return Response("Not Found", status_code=404, media_type="text/plain")
