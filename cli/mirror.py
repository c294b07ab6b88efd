"""``elves mirror``: Hugging Face Hub repos in a store (:mod:`elves.mirror`) from the command line."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from elves import mirror as hubmirror
from elves.errors import ElvesError, UsageError
from elves.mirror.hub import read_tokens
from elves.mirror.records import parse_spec

from ._common import EPILOG, emit, fail, force_option, human, json_option, quiet, quiet_option, reported, threads_option
from .store import executor_options, open_store, storage_option, store_location

F = TypeVar("F", bound=Callable[..., Any])


def store_option(f: F) -> F:
    """--store (a folder or a URL such as s3://bucket/prefix) and its --storage-option."""
    f = storage_option(f)
    return click.option("--store", "-s", "store_path", envvar="ELVES_STORE", required=True, metavar="STORE",
                        callback=store_location,
                        help="The store: a folder or a URL such as s3://bucket/prefix (or set ELVES_STORE).")(f)


type_option = click.option("--type", "repo_type", type=click.Choice(["model", "dataset"]), default="model",
                           show_default=True, help="The repos' type on the Hub.")
endpoint_option = click.option("--endpoint", default=None, metavar="URL",
                               help="The Hub to pull from (default: HF_ENDPOINT, else huggingface.co).")
token_option = click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            default=None, help="A file holding the Hub token (default: HF_TOKEN, or the stored login).")
jobs_option = click.option("--jobs", "-j", type=click.IntRange(min=1, max=64), default=4, show_default=True,
                           help="Files downloaded at once.")


def upstream_options(f: F) -> F:
    """What every command that downloads from the Hub takes."""
    for option in reversed((endpoint_option, token_option, jobs_option, threads_option, json_option, quiet_option)):
        f = option(f)
    return f


class _Progress:
    """One status line on stderr, redrawn at most 5 times a second: files, bytes, speed, and an
    ETA only once a speed is known. Nothing under -q or off a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and not quiet() and sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, p: hubmirror.PullProgress) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.2:
            return
        self.last = now
        elapsed = now - p.started
        rate = p.bytes_done / elapsed if elapsed > 1 and p.bytes_done else 0.0
        eta = f", {_duration((p.bytes_total - p.bytes_done) / rate)} left" if rate else ""
        click.echo(f"\r{p.repo}: {p.files_done}/{p.files_total} files, {human(p.bytes_done)} of "
                   f"{human(p.bytes_total)}" + (f", {rate / 1e6:.0f} MB/s" if rate else "") + eta + "\033[K",
                   err=True, nl=False)

    def done(self) -> None:
        if self.enabled and self.last:
            click.echo("\r\033[K", err=True, nl=False)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _pulled(r: hubmirror.PullResult) -> dict[str, Any]:
    return {"repo": r.repo_id, "type": r.repo_type, "revision": r.revision, "commit": r.commit, "model": r.model,
            "files": r.files, "bytes": r.bytes, "downloaded": r.downloaded, "downloaded_bytes": r.downloaded_bytes,
            "reused": r.reused, "already": r.already, "base": r.base, "stored_bytes": r.stored_bytes,
            "seconds": round(r.seconds, 3)}


def _pulled_text(r: hubmirror.PullResult) -> str:
    if r.already:
        return f"{r.repo_id}@{r.revision}: commit {r.commit[:12]} already stored, nothing downloaded"
    return (f"{r.repo_id}@{r.revision} -> {r.commit[:12]}: {r.files} files, {human(r.bytes)}; downloaded "
            f"{r.downloaded} ({human(r.downloaded_bytes)}), {r.reused} from blobs already held; "
            f"store grew {human(r.stored_bytes)}" + (f"; base {r.base}" if r.base else "")
            + f"; {r.seconds:.1f} s")


@click.group(epilog=EPILOG)
def mirror() -> None:
    """A Hugging Face Hub mirror on a store: pull repos, keep them up to date, export them, and
    serve the Hub's download API so that clients only set HF_ENDPOINT.

    \b
    Examples:
      elves store init hub.store
      elves mirror pull sentence-transformers/all-MiniLM-L6-v2 --store hub.store
      elves mirror pull --list repos.txt --store hub.store --jobs 8
      elves mirror update --store hub.store
      elves mirror ls --store hub.store
      elves mirror export sentence-transformers/all-MiniLM-L6-v2 --store hub.store --hf-cache ~/.cache/huggingface/hub
      elves mirror serve --store hub.store --port 8080    # then HF_ENDPOINT=http://127.0.0.1:8080
    """


@mirror.command(epilog=EPILOG)
@click.argument("specs", nargs=-1, metavar="REPO_ID[@REVISION]...")
@store_option
@type_option
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A file of repos to pull, one REPO_ID[@REVISION] a line (# comments).")
@click.option("--include", multiple=True, metavar="GLOB", help="Take only the files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out the files matching (repeatable).")
@executor_options
@upstream_options
def pull(specs: tuple[str, ...], store_path: Path | str, storage_options: tuple[str, ...], repo_type: str,
         list_file: Path | None, include: tuple[str, ...], exclude: tuple[str, ...], executor: str,
         workers: int | None, ray_address: str | None, endpoint: str | None, token_file: Path | None, jobs: int,
         threads: int | None, as_json: bool) -> None:
    """Pull repos from the Hub into the store: one file at a time, each checked against its
    sha256 (or git blob id) before it is stored. A commit already stored downloads nothing; an
    interrupted pull, run again, downloads only what is missing. A repo that fails is reported
    and the others go on; the exit code is then the first failure's.

    Several repos are pulled on --workers (local processes, or Ray): each worker downloads and
    reads a repo, bases are coded before the fine-tunes that delta against them, and this
    machine commits them; downloads do not hold the store's writer lock.

    \b
    Examples:
      elves mirror pull sentence-transformers/all-MiniLM-L6-v2 --store hub.store
      elves mirror pull org/model@v1.0 org/model@refs/pr/3 --store hub.store
      elves mirror pull meta-llama/Llama-3.2-1B --token-file ~/.hf-token --store hub.store
      elves mirror pull squad --type dataset --include '*.json' --store hub.store
      elves mirror pull --list repos.txt --store s3://models/hub --executor ray --ray-address 10.0.0.1:6379
    """
    with reported(as_json):
        items = list(specs)
        if list_file is not None:
            items += [line.split("#", 1)[0].strip() for line in list_file.read_text(encoding="utf-8").splitlines()]
        parsed = [parse_spec(s) for s in items if s]
        if not parsed:
            raise UsageError("no repo to pull: give REPO_ID[@REVISION] or --list FILE")
        store = open_store(store_path, storage_options)
        token = read_tokens(token_file)[0] if token_file else None
    if len(parsed) > 1 or executor != "local" or workers is not None or ray_address is not None:
        with reported(as_json):
            results, failures = hubmirror.pull_many(
                store, parsed, executor=executor, workers=workers, ray_address=ray_address, repo_type=repo_type,
                endpoint=endpoint, token=token, include=list(include) or None, exclude=list(exclude) or None,
                jobs=jobs, threads=threads)
        if not as_json:
            for what, e in failures:
                click.echo(f"elves: error: {what}: {e}", err=True)
            for r in results:
                emit(False, {}, _pulled_text(r), summary=True)
        _pulled_report(results, failures, as_json)
        return
    results = []
    failures = []
    for repo_id, revision in parsed:
        bar = _Progress(not as_json)
        try:
            r = hubmirror.pull(store, repo_id, revision, repo_type=repo_type, endpoint=endpoint, token=token,
                               include=list(include) or None, exclude=list(exclude) or None, jobs=jobs,
                               threads=threads, progress=bar)
        except ElvesError as e:
            bar.done()
            if len(parsed) == 1:
                fail(e, as_json)
            failures.append((f"{repo_id}@{revision or 'main'}", e))
            if not as_json:
                click.echo(f"elves: error: {e}", err=True)
            continue
        except KeyboardInterrupt:
            bar.done()
            click.echo("elves: interrupted; run the same pull again to go on where it stopped", err=True)
            sys.exit(130)
        bar.done()
        results.append(r)
        if not as_json:
            emit(False, {}, _pulled_text(r), summary=True)
    _pulled_report(results, failures, as_json)


def _pulled_report(results: list[hubmirror.PullResult], failures: list[tuple[str, ElvesError]], as_json: bool) -> None:
    """The JSON report of a pull, and its exit code: the first failure's."""
    if as_json:
        emit(True, {"ok": not failures, "pulled": [_pulled(r) for r in results],
                    "failed": [_failed(s, e) for s, e in failures]}, "")
    if failures:
        sys.exit(failures[0][1].exit_code)


def _failed(what: str, e: ElvesError) -> dict[str, Any]:
    return {"repo": what, "error": str(e), "kind": type(e).__name__, "exit_code": e.exit_code}


@mirror.command(epilog=EPILOG)
@store_option
@click.argument("repos", nargs=-1, metavar="[REPO_ID]...")
@upstream_options
def update(store_path: Path | str, storage_options: tuple[str, ...], repos: tuple[str, ...], endpoint: str | None,
           token_file: Path | None, jobs: int, threads: int | None, as_json: bool) -> None:
    """Resolve every tracked branch and tag again (of the given repos, or all) and pull the
    commits they moved to: only changed files are downloaded. Old commits stay until
    `elves mirror rm`.

    \b
    Examples:
      elves mirror update --store hub.store
      elves mirror update sentence-transformers/all-MiniLM-L6-v2 --store hub.store --json
    """
    with reported(as_json):
        store = open_store(store_path, storage_options)
        token = read_tokens(token_file)[0] if token_file else None
        u = hubmirror.update(store, endpoint=endpoint, token=token, jobs=jobs, threads=threads,
                             progress=_Progress(not as_json), only=list(repos) or None)
        lines = [_pulled_text(r) for r in u.pulled]
        lines += [f"{repo}@{rev}: unchanged ({commit[:12]})" for repo, rev, commit in u.unchanged]
        lines += [f"{repo}@{rev}: failed: {err}" for repo, rev, err in u.failed]
        emit(as_json, {"ok": not u.failed, "pulled": [_pulled(r) for r in u.pulled],
                       "unchanged": [{"repo": a, "revision": b, "commit": c} for a, b, c in u.unchanged],
                       "failed": [_failed(f"{a}@{b}", e) for a, b, e in u.failed]},
             "\n".join(lines) or "(no tracked revisions)", summary=True)
    if u.failed:
        sys.exit(u.failed[0][2].exit_code)


@mirror.command("ls", epilog=EPILOG)
@store_option
@json_option
@quiet_option
def ls(store_path: Path | str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """List the mirrored repos: their revisions and commits, logical and stored bytes.

    For each commit: its logical size -> what adding it cost the store (objects no model added
    before it names; a fine-tune stored as a delta costs its deltas), and what it shares with
    models added before it.

    \b
    Examples:
      elves mirror ls --store hub.store
      elves mirror ls --store hub.store --json
    """
    from elves.mirror.inventory import inventory
    with reported(as_json):
        repos, totals = inventory(open_store(store_path, storage_options))
        lines = []
        for r in repos:
            lines.append(f"{'dataset ' if r.repo_type == 'dataset' else ''}{r.repo_id}"
                         + (" (gated)" if r.gated else "") + (" (private)" if r.private else ""))
            for c in r.commits:
                lines.append(f"  {c.commit[:12]}  {', '.join(c.revisions) or '-':<16} {c.files:>4} files  "
                             f"{human(c.logical_bytes):>9} -> {human(c.new_bytes):>9} ({c.ratio:.2f}x)"
                             + (f" + {human(c.stored_bytes - c.new_bytes)} shared" if c.stored_bytes > c.new_bytes
                                else "") + (f", base {c.base}" if c.base else "") + f", pulled {c.pulled}")
        lines.append(f"store: {totals.models} models, {human(totals.logical_bytes)} as full copies, "
                     f"{human(totals.file_dedup_bytes)} with file dedup, {human(totals.stored_bytes)} stored "
                     f"({totals.logical_bytes / max(totals.stored_bytes, 1):.2f}x)")
        emit(as_json, {"ok": True, "repos": [r.to_json() for r in repos], "totals": totals.to_json()},
             "\n".join(lines))


@mirror.command("rm", epilog=EPILOG)
@click.argument("spec", metavar="REPO_ID[@REVISION]")
@store_option
@type_option
@json_option
@quiet_option
def rm(spec: str, store_path: Path | str, storage_options: tuple[str, ...], repo_type: str, as_json: bool) -> None:
    """Forget a repo's revision (or commit sha), or the whole repo without one. Its data goes
    with the next `elves store gc`, but for what other commits share.

    \b
    Examples:
      elves mirror rm org/model@v1.0 --store hub.store && elves store gc hub.store
      elves mirror rm org/model --store hub.store
    """
    with reported(as_json):
        repo_id, revision = parse_spec(spec)
        removed = hubmirror.remove(open_store(store_path, storage_options), repo_id, revision, repo_type=repo_type)
        emit(as_json, {"ok": True, "removed": removed},
             f"removed {len(removed)} commit(s) of {repo_id}; run `elves store gc` to free their bytes", summary=True)


@mirror.command(epilog=EPILOG)
@click.argument("spec", metavar="REPO_ID[@REVISION]")
@store_option
@type_option
@click.option("--to", "to", type=click.Path(path_type=Path), default=None, help="Write a plain snapshot folder.")
@click.option("--hf-cache", type=click.Path(path_type=Path), default=None,
              help="Write into a huggingface_hub cache folder (e.g. ~/.cache/huggingface/hub).")
@force_option
@threads_option
@json_option
@quiet_option
def export(spec: str, store_path: Path | str, storage_options: tuple[str, ...], repo_type: str, to: Path | None,
           hf_cache: Path | None, force: bool, threads: int | None, as_json: bool) -> None:
    """Write a mirrored repo out, bit-exact: as a plain folder, or into the huggingface_hub cache
    so that HF_HUB_OFFLINE=1 loads it (blobs already there are reused).

    \b
    Examples:
      elves mirror export org/model --store hub.store --to ./model
      elves mirror export org/model@v1.0 --store hub.store --hf-cache ~/.cache/huggingface/hub
    """
    from elves.mirror.export import export as run_export
    with reported(as_json):
        if (to is None) == (hf_cache is None):
            raise UsageError("give one of --to DIR and --hf-cache DIR")
        repo_id, revision = parse_spec(spec)
        r = run_export(open_store(store_path, storage_options), repo_id, revision, repo_type=repo_type, to=to, hf_cache=hf_cache,
                       force=force, threads=threads)
        emit(as_json, {"ok": True, "repo": r.repo_id, "type": r.repo_type, "revision": r.revision,
                       "commit": r.commit, "files": r.files, "bytes": r.bytes, "bytes_written": r.bytes_written,
                       "blobs_reused": r.blobs_reused, "where": str(r.where), "seconds": round(r.seconds, 3)},
             f"exported {r.repo_id}@{r.revision} ({r.commit[:12]}) -> {r.where}: {r.files} files, {human(r.bytes)}"
             + (f", {r.blobs_reused} blobs already there" if hf_cache is not None else ""), summary=True)


@mirror.command(epilog=EPILOG)
@store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--upstream", default=None, metavar="URL",
              help="Pull repos and revisions the mirror lacks from this Hub (a pull-through cache).")
@click.option("--upstream-token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The token for --upstream.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Bearer tokens clients must present, one a line; gated repos need one.")
@jobs_option
@quiet_option
def serve(store_path: Path | str, storage_options: tuple[str, ...], host: str, port: int, upstream: str | None,
          upstream_token_file: Path | None, token_file: Path | None, jobs: int) -> None:
    """Serve the store through the Hub's API: clients set HF_ENDPOINT to this server and change
    nothing else. Files are decoded as they stream; a Range decodes only what it covers.

    \b
    Examples:
      elves mirror serve --store hub.store --port 8080
      HF_ENDPOINT=http://127.0.0.1:8080 hf download sentence-transformers/all-MiniLM-L6-v2
      elves mirror serve --store hub.store --upstream https://huggingface.co --token-file tokens.txt
    """
    from elves.mirror.server import serve as run_server
    with reported(False):
        store = open_store(store_path, storage_options)
        upstream_token = read_tokens(upstream_token_file)[0] if upstream_token_file else None
        run_server(store, host=host, port=port, upstream=upstream, upstream_token=upstream_token,
                   token_file=token_file, jobs=jobs, log_level="error" if quiet() else "warning")
