"""The upstream Hub, through ``huggingface_hub``: resolving a revision to its commit, listing a
commit's files with their LFS metadata, and downloading one file, checked as it streams.

``huggingface_hub`` takes HF_ENDPOINT and HF_TOKEN from the environment, as its own commands do.
Its errors become the mirror's (:class:`~elves.errors.HubNotFoundError`,
:class:`~elves.errors.HubAccessError`, :class:`~elves.errors.HubError`), so that no traceback
reaches the user. The client never checks what it downloads; :meth:`Hub.download` does: the
sha256 of an LFS file, the git blob id of any other.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

from ..errors import HubAccessError, HubError, HubIntegrityError, HubNotFoundError, OutputError, UsageError
from .records import COMMIT_RE, RemoteFile

PIECE = 1 << 20            # bytes read from the network and hashed at a time
MAX_REDIRECTS = 10
TIMEOUT = 60.0             # seconds without a byte before a download is given up


@contextmanager
def _hub_errors(what: str, where: str) -> Iterator[None]:
    """huggingface_hub's and the network's errors as the mirror's, naming ``where``."""
    from huggingface_hub import errors as hf
    import httpx2
    try:
        yield
    except hf.GatedRepoError:
        raise HubAccessError(f"{what}: the repo is gated; accept its terms on the Hub and give a token "
                             "(HF_TOKEN or --token-file)", where, gated=True) from None
    except (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError,
            hf.RemoteEntryNotFoundError) as e:
        kind = ("revision" if isinstance(e, hf.RevisionNotFoundError) else
                "file" if isinstance(e, (hf.EntryNotFoundError, hf.RemoteEntryNotFoundError)) else "repo")
        hint = " (or it is private: give a token)" if kind == "repo" else ""
        raise HubNotFoundError(f"{what}: no such {kind} on the Hub{hint}", where, kind) from None
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubAccessError(f"{what}: the Hub refused access ({status}): give a valid token", where) from None
        raise HubError(f"{what}: the Hub answered {status}: {str(e).splitlines()[0][:200]}", where) from None
    except httpx2.HTTPError as e:
        raise HubError(f"{what}: the Hub cannot be reached: {type(e).__name__}: {str(e)[:200]}", where) from None


class Hub:
    """One Hub endpoint (``endpoint``: default HF_ENDPOINT, else huggingface.co) and token
    (default HF_TOKEN, or the stored login)."""

    def __init__(self, endpoint: str | None = None, token: str | None = None):
        from huggingface_hub import HfApi
        # read now, not when huggingface_hub was imported: a caller may have set it since
        self.api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
        self.endpoint: str = self.api.endpoint.rstrip("/")
        self.token = token

    def resolve(self, repo_type: str, repo_id: str, revision: str | None) -> tuple[str, bool, bool]:
        """The commit ``revision`` (None: the default branch) points at, and whether the repo is
        gated and private."""
        where = f"{self.endpoint}/{repo_id}"
        with _hub_errors(f"{repo_id}@{revision or 'main'}", where):
            info = self.api.repo_info(repo_id, repo_type=repo_type, revision=revision)
        sha = getattr(info, "sha", None)
        if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha):
            raise HubError(f"{repo_id}@{revision or 'main'}: the Hub gave no commit sha ({sha!r:.60})", where)
        gated = getattr(info, "gated", False)
        return sha, bool(gated), bool(getattr(info, "private", False))

    def files(self, repo_type: str, repo_id: str, commit: str, include: list[str] | None = None,
              exclude: list[str] | None = None) -> list[RemoteFile]:
        """The files of ``repo_id`` at ``commit`` (those ``include`` and ``exclude``, glob
        patterns, leave), with size, blob id and LFS metadata."""
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils._paths import filter_repo_objects
        where = f"{self.endpoint}/{repo_id}"
        with _hub_errors(f"{repo_id}@{commit}: listing its files", where):
            entries = [e for e in self.api.list_repo_tree(repo_id, revision=commit, repo_type=repo_type,
                                                          recursive=True) if isinstance(e, RepoFile)]
        out = []
        for e in filter_repo_objects(entries, allow_patterns=include, ignore_patterns=exclude,
                                     key=lambda e: e.path):
            try:
                lfs = e.lfs
                out.append(RemoteFile.from_json({
                    "path": e.path, "size": e.size, "blob_id": e.blob_id,
                    **({} if lfs is None else {"lfs_sha256": lfs.sha256, "pointer_size": lfs.pointer_size})}))
            except (ValueError, AttributeError) as err:
                raise HubError(f"{repo_id}@{commit}: the Hub listed a malformed file: {err}", where) from None
            if lfs is not None and lfs.size != e.size:
                raise HubError(f"{repo_id}@{commit}: {e.path} is listed with two sizes", where)
        return out

    def url(self, repo_type: str, repo_id: str, commit: str, path: str) -> str:
        from huggingface_hub import hf_hub_url
        return hf_hub_url(repo_id, path, repo_type=repo_type, revision=commit, endpoint=self.endpoint)

    def download(self, repo_type: str, repo_id: str, commit: str, f: RemoteFile, dst: Path,
                 progress: Callable[[int], None] | None = None) -> None:
        """Download ``f`` to ``dst``, checking it as it streams; a ``dst + ".part"`` left by an
        interrupted run is continued with a Range request. Nothing is at ``dst`` unless it is
        complete and matches its sha256 (LFS) or git blob id."""
        from huggingface_hub import get_session, hf_raise_for_status
        from huggingface_hub.utils._headers import build_hf_headers
        url = self.url(repo_type, repo_id, commit, f.path)
        part = dst.with_name(dst.name + ".part")
        label = f"{repo_id}@{commit[:12]}: {f.path}"
        if dst.exists():  # complete before an interruption, and not stored yet: checked again
            digest, have = _hashed(f, dst)
            if have == f.size and digest.hexdigest() == f.etag:
                return
            dst.unlink()
        digest, have = _hashed(f, part)
        if have > f.size:
            part.unlink()
            digest, have = _hashed(f, part)
        headers = build_hf_headers(token=self.token)
        if have:
            headers["Range"] = f"bytes={have}-"
        session = get_session()
        try:
            with _hub_errors(label, url):
                for _ in range(MAX_REDIRECTS):
                    if have == f.size:  # all there before the run was cut: nothing to ask for
                        break
                    with session.stream("GET", url, headers=headers, follow_redirects=False, timeout=TIMEOUT) as r:
                        if r.has_redirect_location:
                            target = urljoin(url, r.headers["Location"])
                            if _origin(target) != _origin(url):  # a CDN's signed URL: no token leaves the Hub
                                headers.pop("authorization", None)
                                headers.pop("Authorization", None)
                            url = target
                            continue
                        hf_raise_for_status(r)
                        if have and r.status_code != 206:  # the server ignored the Range: start over
                            part.unlink()
                            digest, have = _hashed(f, part)
                        with open(part, "ab" if have else "wb") as out:
                            for piece in r.iter_bytes():  # as it arrives: a cut loses nothing received
                                if have + len(piece) > f.size:
                                    raise HubIntegrityError(f"{label}: the Hub sent more than its {f.size} bytes", url)
                                out.write(piece)
                                digest.update(piece)
                                have += len(piece)
                                if progress:
                                    progress(len(piece))
                            out.flush()
                            os.fsync(out.fileno())
                        break
                else:
                    raise HubError(f"{label}: more than {MAX_REDIRECTS} redirects", url)
        except OSError as e:
            raise OutputError(f"cannot stage {f.path}: {e.strerror}", part) from None
        if have != f.size:
            raise HubError(f"{label}: the download stopped at {have} of {f.size} bytes", url)
        if digest.hexdigest() != f.etag:
            part.unlink(missing_ok=True)
            raise HubIntegrityError(f"{label}: the download does not match its "
                                    f"{'sha256' if f.lfs_sha256 else 'git blob id'}: nothing of it is stored", url)
        os.replace(part, dst)


def _hashed(f: RemoteFile, path: Path) -> tuple[Any, int]:
    """The hash ``f`` is checked by (sha256 for LFS, else the git blob id), fed what ``path``
    already holds (an interrupted download, continued from there), and its length."""
    digest = f.hasher()
    have = 0
    try:
        with open(path, "rb") as fh:
            while piece := fh.read(PIECE):
                digest.update(piece)
                have += len(piece)
    except FileNotFoundError:
        pass
    return digest, have


def read_tokens(path: Path) -> list[str]:
    """The tokens in a token file, in order: one a line; blank lines and ``#`` comments are
    skipped. UsageError if it cannot be read, lists none, or a token has a space or a control
    character in it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the token file {path}: {getattr(e, 'strerror', None) or e}") from None
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise UsageError(f"the token file {path} lists no token")
    if any(any(c.isspace() or not c.isprintable() for c in t) for t in tokens):
        raise UsageError(f"the token file {path} has a token with a space or a control character in it")
    return tokens


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme)
