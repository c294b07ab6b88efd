"""``elves store``: the multi-model store (:mod:`elves.store`) from the command line."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from elves.store import Store

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

store_arg = click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))


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
def init(store_path: Path, as_json: bool) -> None:
    """Create an empty store (a new or empty folder).

    \b
    Example:
      elves store init hub.store
    """
    with reported(as_json):
        s = Store.init(store_path)
        emit(as_json, {"ok": True, "store": str(s.path)}, f"created store {s.path}", summary=True)


@store.command(epilog=EPILOG)
@store_arg
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--name", "-n", default=None, help="Name in the store (default: the file or folder name).")
@click.option("--base", "base", default="auto", show_default=True,
              help="The stored model to code it against: a name, 'auto' (found from metadata and the "
                   "weights themselves) or 'none'.")
@click.option("--follow-symlinks", is_flag=True,
              help="Store the content of links that point outside the model folder (refused otherwise).")
@threads_option
@json_option
@quiet_option
def add(store_path: Path, src: Path, name: str | None, base: str, follow_symlinks: bool, threads: int | None,
        as_json: bool) -> None:
    """Add a model (a file or a folder). Data already stored costs nothing; a fine-tune of a
    stored model costs its delta. Models stored earlier whose base this one is are re-coded as
    its deltas.

    \b
    Examples:
      elves store add hub.store ./all-MiniLM-L6-v2
      elves store add hub.store ./ft --name acme/minilm-ft --base all-MiniLM-L6-v2
      elves store add hub.store ./other --base none --json
    """
    with reported(as_json):
        s = Store(store_path)
        with progress(source_size(src), "add", not as_json) as bar:
            r = s.add(src, name, base=None if base == "none" else base, threads=threads, progress=bar,
                      follow_symlinks=follow_symlinks)
        emit(as_json, {
            "ok": True, "name": r.name, "base": r.base, "reasons": r.reasons, "bytes_in": r.bytes_in,
            "bytes_added": r.bytes_added, "ratio": round(r.ratio, 4), "objects_new": r.objects_new,
            "objects_reused": r.objects_reused, "delta_objects": r.delta_objects, "repacked": r.repacked,
            "notes": r.notes, "seconds": round(r.seconds, 3),
        }, f"added {r.name}: {human(r.bytes_in)} -> {human(r.bytes_added)} stored ({r.ratio:.3f}x), "
           f"{r.objects_new} new objects ({r.delta_objects} deltas), {r.objects_reused} already stored, "
           f"{r.bytes_in / max(r.seconds, 1e-9) / 1e6:.0f} MB/s"
           + (f"\n  base: {r.base}" if r.base else "\n  base: none")
           + "".join(f"\n    {why}" for why in r.reasons)
           + (f"\n  re-coded as its deltas: {', '.join(r.repacked)}" if r.repacked else "")
           + "".join(f"\n  note: {n}" for n in r.notes), summary=True)


@store.command("ls", epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def ls(store_path: Path, as_json: bool) -> None:
    """List the stored models, in the order they were added.

    \b
    Example:
      elves store ls hub.store --json
    """
    with reported(as_json):
        models = Store(store_path).models()
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
def restore(store_path: Path, name: str, out: Path, threads: int | None, force: bool, as_json: bool) -> None:
    """Restore a model byte for byte (every file checked against its sha256).

    \b
    Examples:
      elves store restore hub.store my-finetune -o ./my-finetune
      elves store restore hub.store model.pt -o ./model.pt --force
    """
    with reported(as_json):
        s = Store(store_path)
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
def rm(store_path: Path, name: str, as_json: bool) -> None:
    """Remove a model. Its data is freed by `gc`, except what other models' deltas still use.

    \b
    Example:
      elves store rm hub.store my-finetune && elves store gc hub.store
    """
    with reported(as_json):
        Store(store_path).remove(name)
        emit(as_json, {"ok": True, "removed": name}, f"removed {name} (run `elves store gc` to free its data)",
             summary=True)


@store.command(epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def gc(store_path: Path, as_json: bool) -> None:
    """Delete data that no model uses, and files left by interrupted writers.

    \b
    Example:
      elves store gc hub.store
    """
    with reported(as_json):
        r = Store(store_path).gc()
        emit(as_json, {"ok": True, **asdict(r)},
              f"freed {human(r.bytes_freed)}: {r.objects_removed} objects removed, {r.objects_kept} kept"
              + (f", {r.temp_removed} temporary files removed" if r.temp_removed else ""), summary=True)


@store.command(epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def stats(store_path: Path, as_json: bool) -> None:
    """Show models, logical and stored sizes, the ratio and the objects.

    \b
    Example:
      elves store stats hub.store --json
    """
    with reported(as_json):
        st = Store(store_path).stats()
        emit(as_json, {"ok": True, **asdict(st), "ratio": round(st.ratio, 4)},
              f"{store_path}: {st.models} models, {human(st.logical_bytes)} -> {human(st.stored_bytes)} "
              f"({st.ratio:.3f}x), {st.objects} objects ({st.delta_objects} deltas)"
              + (f", {human(st.garbage_bytes)} garbage in {st.garbage_objects} objects (run gc)"
                 if st.garbage_objects else ""))


@store.command(epilog=EPILOG)
@store_arg
@json_option
@quiet_option
def families(store_path: Path, as_json: bool) -> None:
    """Show the families of stored models, and the evidence for each model's base.

    \b
    Example:
      elves store families hub.store
    """
    with reported(as_json):
        fams = Store(store_path).families()
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
def repack(store_path: Path, threads: int | None, as_json: bool) -> None:
    """Re-code models stored before their base arrived as deltas of it.

    \b
    Example:
      elves store repack hub.store
    """
    with reported(as_json):
        r = Store(store_path).repack(threads=threads)
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
def verify(store_path: Path, full: bool, threads: int | None, as_json: bool) -> None:
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
        s = Store(store_path)
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
