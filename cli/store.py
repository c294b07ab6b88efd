"""``elves store``: the multi-model store (:mod:`elves.store`) from the command line."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from elves.errors import UsageError
from elves.store import AddResult, Store
from elves.store.location import parse_location

from ._common import (
    EPILOG,
    PROBLEMS_FOUND,
    emit,
    emit_restored,
    epilog,
    force_option,
    human,
    json_option,
    progress,
    quiet_option,
    reported,
    source_size,
    threads_option,
)

F = TypeVar("F", bound=Callable[..., Any])


def store_location(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
    """A store given on the command line: a local folder, or an fsspec URL (``s3://bucket/prefix``)
    kept as it is (click.Path would fold its '//')."""
    return None if value is None else parse_location(value)


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="An option for a store at a URL, given to fsspec (s3fs: endpoint_url, key, secret, ...); "
         "repeatable. A JSON value is parsed (true, 5, {...}); a dotted KEY nests "
         "(client_kwargs.region_name=eu-west-1). Endpoint and credentials come from the usual AWS "
         "variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) without it.")


def store_arg(f: F) -> F:
    """The STORE argument (a folder or a URL) and its --storage-option."""
    return click.argument("store_path", metavar="STORE", callback=store_location)(storage_option(f))


def executor_options(f: F) -> F:
    """--executor, --workers and --ray-address: where the work on several models runs."""
    for option in reversed((
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where several models are hashed and encoded: local processes, or a Ray cluster "
                          "(pip install 'elves[ray]'). Bases go in before the fine-tunes coded against them."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Models worked on at once (default: one per CPU core, or the cluster's)."),
        click.option("--ray-address", default=None, metavar="ADDR",
                     help="The Ray cluster to join (default: start a local one); fails fast if it cannot be joined."),
    )):
        f = option(f)
    return f


def parse_storage_options(items: tuple[str, ...]) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` values as fsspec's storage options."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option takes KEY=VALUE, not {item!r}")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--storage-option {key}: {part} is already given a value")
        node[last] = parsed
    return out or None


def open_store(location: Path | str, storage_options: tuple[str, ...]) -> Store:
    return Store(location, parse_storage_options(storage_options))


@click.group(epilog=EPILOG)
def store() -> None:
    """A folder of many models: each unique tensor and file stored once, fine-tunes as deltas.

    \b
    Examples:
      elves store init hub.store
      elves store add hub.store ./llama-3-8b
      elves store add hub.store ./my-finetune            # finds its base, stores the delta
      elves store ls hub.store
      elves ls hub.store/my-finetune 'model.layers.0.*'   # its files and tensors
      elves store restore hub.store my-finetune -o ./out
      elves store rm hub.store my-finetune && elves store gc hub.store
      elves store verify hub.store --full
    """


@store.command(epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def init(store_path: Path | str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Create an empty store: a new or empty folder, or an object storage URL under which
    nothing lies yet (an S3 bucket must exist).

    \b
    Examples:
      elves store init hub.store
      AWS_ENDPOINT_URL=http://minio:9000 elves store init s3://models/hub
    """
    with reported(as_json):
        s = Store.init(store_path, parse_storage_options(storage_options))
        emit(as_json, {"ok": True, "store": str(s.path)}, f"created store {s.path}", summary=True)


@store.command(epilog=EPILOG)
@store_arg
@click.argument("srcs", nargs=-1, required=True, metavar="SRC...", type=click.Path(exists=True, path_type=Path))
@click.option("--name", "-n", default=None, help="Name in the store (default: the file or folder name); one SRC only.")
@click.option("--base", "base", default="auto", show_default=True,
              help="The stored model to code it against: a name, 'auto' (found from metadata and the "
                   "weights themselves) or 'none'.")
@click.option("--follow-symlinks", is_flag=True,
              help="Store the content of links that point outside the model folder (refused otherwise).")
@executor_options
@threads_option
@json_option
@quiet_option
def add(store_path: Path | str, storage_options: tuple[str, ...], srcs: tuple[Path, ...], name: str | None,
        base: str, follow_symlinks: bool, executor: str, workers: int | None, ray_address: str | None,
        threads: int | None, as_json: bool) -> None:
    """Add models (files or folders). Data already stored costs nothing; a fine-tune of a
    stored model costs its delta. Models stored earlier whose base this one is are re-coded as
    its deltas. Several models at once are spread over --workers, locally or on Ray.

    \b
    Examples:
      elves store add hub.store ./all-MiniLM-L6-v2
      elves store add hub.store ./ft --name acme/minilm-ft --base all-MiniLM-L6-v2
      elves store add hub.store ./other --base none --json
      elves store add s3://models/hub ./llama-* --executor ray --ray-address 10.0.0.1:6379
    """
    with reported(as_json):
        if name is not None and len(srcs) > 1:
            raise UsageError("--name names one model: give it with one SRC")
        s = open_store(store_path, storage_options)
        with progress(sum(source_size(src) for src in srcs), "add", not as_json) as bar:
            if len(srcs) == 1 and executor == "local" and workers is None and ray_address is None:
                results = [s.add(srcs[0], name, base=None if base == "none" else base, threads=threads,
                                 progress=bar, follow_symlinks=follow_symlinks)]
            else:
                from elves.store.batch import add_many  # the executors, and Ray when asked for
                results = add_many(s, [(src, name) for src in srcs], executor=executor, workers=workers,
                                   ray_address=ray_address, base=None if base == "none" else base,
                                   threads=threads, progress=bar, follow_symlinks=follow_symlinks)
        if len(results) == 1:
            emit(as_json, _added_json(results[0]), _added_text(results[0]), summary=True)
        else:
            emit(as_json, {"ok": True, "added": [_added_json(r) for r in results]},
                 "\n".join(_added_text(r) for r in results), summary=True)


def _added_json(r: AddResult) -> dict[str, Any]:
    return {"ok": True, "name": r.name, "base": r.base, "reasons": r.reasons, "bytes_in": r.bytes_in,
            "bytes_added": r.bytes_added, "ratio": round(r.ratio, 4), "objects_new": r.objects_new,
            "objects_reused": r.objects_reused, "delta_objects": r.delta_objects, "repacked": r.repacked,
            "notes": r.notes, "seconds": round(r.seconds, 3)}


def _added_text(r: AddResult) -> str:
    return (f"added {r.name}: {human(r.bytes_in)} -> {human(r.bytes_added)} stored ({r.ratio:.3f}x), "
            f"{r.objects_new} new objects ({r.delta_objects} deltas), {r.objects_reused} already stored, "
            f"{r.bytes_in / max(r.seconds, 1e-9) / 1e6:.0f} MB/s"
            + (f"\n  base: {r.base}" if r.base else "\n  base: none")
            + "".join(f"\n    {why}" for why in r.reasons)
            + (f"\n  re-coded as its deltas: {', '.join(r.repacked)}" if r.repacked else "")
            + "".join(f"\n  note: {n}" for n in r.notes))


@store.command("ls", epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def ls(store_path: Path | str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """List the stored models, in the order they were added.

    \b
    Example:
      elves store ls hub.store --json
    """
    with reported(as_json):
        models = open_store(store_path, storage_options).models()
        names = {m.name for m in models}
        emit(as_json, {"ok": True, "models": [
            {"name": m.name, "source": m.source, "files": m.files, "bytes": m.bytes, "base": m.base,
             "reasons": m.reasons, "added": m.added} for m in models]},
            "\n".join(f"{m.name}  {human(m.bytes)}  {m.files} files  added {m.added}"
                      + (f"  base {m.base}" + ("" if m.base in names else " (removed; its data stays)")
                         if m.base else "") for m in models) or "(no models)")


@store.command(epilog=EPILOG)
@store_arg
@click.argument("name")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Folder to restore into, or a file path for a model added as one file.")
@threads_option
@force_option
@json_option
@quiet_option
def restore(store_path: Path | str, storage_options: tuple[str, ...], name: str, out: Path, threads: int | None,
            force: bool, as_json: bool) -> None:
    """Restore a model byte for byte (every file checked against its sha256).

    \b
    Examples:
      elves store restore hub.store my-finetune -o ./my-finetune
      elves store restore hub.store model.pt -o ./model.pt --force
    """
    with reported(as_json):
        s = open_store(store_path, storage_options)
        total = next((m.bytes for m in s.models() if m.name == name), 0)
        t0 = time.perf_counter()
        with progress(total, "restore", not as_json) as bar:
            r = s.restore(name, out, force=force, threads=threads, progress=bar)
        emit_restored(as_json, name, r, time.perf_counter() - t0)


@store.command(epilog=EPILOG)
@store_arg
@click.argument("name")
@json_option
@quiet_option
def rm(store_path: Path | str, storage_options: tuple[str, ...], name: str, as_json: bool) -> None:
    """Remove a model. Its data is freed by `gc`, except what other models' deltas still use.

    \b
    Example:
      elves store rm hub.store my-finetune && elves store gc hub.store
    """
    with reported(as_json):
        open_store(store_path, storage_options).remove(name)
        emit(as_json, {"ok": True, "removed": name}, f"removed {name} (run `elves store gc` to free its data)",
             summary=True)


@store.command(epilog=EPILOG)
@store_arg
@click.option("--grace", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Keep unused data younger than this: a writer on another machine may be about to use "
                   "it (default: 3600 for a store on object storage, 0 for a local one).")
@json_option
@quiet_option
def gc(store_path: Path | str, storage_options: tuple[str, ...], grace: float | None, as_json: bool) -> None:
    """Delete data that no model uses, and files left by interrupted writers.

    \b
    Examples:
      elves store gc hub.store
      elves store gc s3://models/hub --grace 600
    """
    with reported(as_json):
        r = open_store(store_path, storage_options).gc(grace)
        emit(as_json, {"ok": True, **asdict(r)},
              f"freed {human(r.bytes_freed)}: {r.objects_removed} objects removed, {r.objects_kept} kept"
              + (f", {r.temp_removed} temporary files removed" if r.temp_removed else "")
              + (f", {r.kept_young} unused but younger than the grace period kept" if r.kept_young else ""),
              summary=True)


@store.command(epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def stats(store_path: Path | str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Show models, logical and stored sizes, the ratio and the objects.

    \b
    Example:
      elves store stats hub.store --json
    """
    with reported(as_json):
        st = open_store(store_path, storage_options).stats()
        emit(as_json, {"ok": True, **asdict(st), "ratio": round(st.ratio, 4)},
              f"{store_path}: {st.models} models, {human(st.logical_bytes)} -> {human(st.stored_bytes)} "
              f"({st.ratio:.3f}x), {st.objects} objects ({st.delta_objects} deltas)"
              + (f", {human(st.garbage_bytes)} garbage in {st.garbage_objects} objects (run gc)"
                 if st.garbage_objects else ""))


@store.command(epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def families(store_path: Path | str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Show the families of stored models, and the evidence for each model's base.

    \b
    Example:
      elves store families hub.store
    """
    with reported(as_json):
        fams = open_store(store_path, storage_options).families()
        data = [{"root": f.root, "members": [
            {"name": n, "base": m.base, "score": round(m.score, 4), "pairs": m.pairs, "evidence": m.evidence}
            for n, m in f.members]} for f in fams]
        lines = []
        for f in fams:
            lines.append(f.root)
            for n, m in f.members:
                lines.append(f"  {n}  <- {m.base}  (score {m.score:.2f})")
                lines += [f"      {why}" for why in m.evidence]
        emit(as_json, {"ok": True, "families": data}, "\n".join(lines) or "(no models)")


@store.command(epilog=EPILOG)
@store_arg
@threads_option
@json_option
@quiet_option
def repack(store_path: Path | str, storage_options: tuple[str, ...], threads: int | None, as_json: bool) -> None:
    """Re-code models stored before their base arrived as deltas of it.

    \b
    Example:
      elves store repack hub.store
    """
    with reported(as_json):
        r = open_store(store_path, storage_options).repack(threads=threads)
        emit(as_json, {"ok": True, "models": [{"name": n, "base": b} for n, b in r.models],
                        "objects_rewritten": r.objects_rewritten, "bytes_before": r.bytes_before,
                        "bytes_after": r.bytes_after, "skipped": r.skipped},
              f"{r.objects_rewritten} objects re-coded as deltas: {human(r.bytes_before)} -> "
              f"{human(r.bytes_after)}" + "".join(f"\n  {n} <- {b}" for n, b in r.models)
              + "".join(f"\n  note: {s}" for s in r.skipped), summary=True)


@store.command(epilog=epilog(f"store verify ends with {PROBLEMS_FOUND} when it finds problems: they are listed, "
                            "and under --json by kind (bad_manifests, missing_objects, damaged_objects, "
                            "bad_refs, orphans, bad_files)."))
@store_arg
@click.option("--full", is_flag=True, help="Also decode every model and check each file's sha256 (slower: "
                                           "reads as much as restoring everything).")
@threads_option
@json_option
@quiet_option
def verify(store_path: Path | str, storage_options: tuple[str, ...], full: bool, threads: int | None, as_json: bool) -> None:
    """Check the whole store, as git fsck does a repository; nothing is changed.

    Every manifest parses and passes its checks; every object a model uses exists and its footer,
    trailer and chunk checksums hold; a delta reads only plain tensor objects; nothing in objects/
    is left that no model reaches (an orphan: `gc` deletes it). --full also decodes every model
    and checks each file's sha256, which finds what checksums alone cannot. Holds the store's
    lock: an add waits for it.

    \b
    Examples:
      elves store verify hub.store
      elves store verify hub.store --full --json
    """
    with reported(as_json):
        s = open_store(store_path, storage_options)
        with progress(s.verify_bytes(full), "verify", not as_json) as bar:
            r = s.verify(full, threads=threads, progress=bar)
        lines = [f"{store_path}: " + ("OK" if r.ok else "PROBLEMS FOUND") + f", {r.models} models, "
                 f"{r.objects} objects, {human(r.bytes_checked)} checked"
                 + (f", {r.files_checked} files decoded and matched with their sha256" if full else "")]
        for kind, problems in r.problems.items():
            lines.append(f"  {kind.replace('_', ' ')}: {len(problems)}")
            lines += [f"    {p.path}: {p.message}" for p in problems]
        if not r.orphans_checked:
            lines.append("  orphans not looked for: a manifest is unreadable, so what it uses is unknown")
        emit(as_json, {"ok": r.ok, **asdict(r)}, "\n".join(lines), summary=r.ok)
        if not r.ok:
            sys.exit(PROBLEMS_FOUND)
