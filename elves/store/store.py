"""The store as a whole (:class:`Store`): opening and creating one, adding, listing, restoring and
removing models, and the maintenance commands."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from .. import families
from ..decoder import LaterChecks, RestoreSummary, write_files
from ..errors import ArchiveError, InputError, StoreError, UsageError
from ..families import Family, ModelProfile
from ..index import ints
from ..parallel import default_threads
from ..readers import read_model
from . import maintenance, verify
from .ingest import ProgressFn
from .layout import FOLDERS, MARKER, MODELS, STORE_VERSION, manifest_at, profile_at
from .location import create_storage, open_storage, parse_location
from .manifests import manifest, manifests, profiles, read_json, write_json
from .model_view import StoredModel
from .reading import ModelObjects, file_parts, file_range, restore_file
from .reports import AddResult, GcReport, ModelEntry, RepackReport, StoreStats, StoreVerifyReport
from .staging import StagedAdd, check_name
from .storage import Storage


MANIFESTS_KEPT = 64


def default_name(src: str | os.PathLike[str]) -> str:
    """The name a model gets when none is given: its folder's or file's name."""
    return Path(src).resolve().name


class Store:
    """A model store. ``Store(path)`` opens one; :meth:`Store.init` creates one.

    ``path`` is a local folder (``path`` is then a Path) or an fsspec URL such as
    ``s3://bucket/prefix`` (kept as a str); ``storage_options`` go to fsspec for a URL
    (endpoint, credentials...: by default the standard variables, AWS_ENDPOINT_URL and so on).
    Opening a store reads its marker, so a wrong endpoint or credentials fail here, clearly."""

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self._manifests: dict[str, tuple[int, dict[str, Any]]] = {}   # name -> (file size, manifest)
        self._lock = threading.Lock()
        self.path: Path | str = parse_location(path)
        self.storage_options = storage_options   # what workers that open the store themselves need
        self.storage: Storage = open_storage(self.path, storage_options)
        try:
            info = read_json(self.storage, MARKER, MARKER)
            version = tuple(info["version"])
            if info.get("format") != "elves-store" or not ints(list(version), 2):
                raise ValueError("not an elves store marker")
        except FileNotFoundError:
            raise StoreError(f"not an elves store (no {MARKER}); create one with `elves store init`",
                             self.path) from None
        except ArchiveError as e:
            raise StoreError(e.message, e.path) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{MARKER} is malformed: {e}", self.path) from None
        if version[0] > STORE_VERSION[0]:
            raise StoreError(f"written by a newer elves (store version {version[0]}.{version[1]}, this elves "
                             f"reads {STORE_VERSION[0]}.x): upgrade elves", self.path)
        self.storage.check(FOLDERS)

    @classmethod
    def init(cls, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Store:
        """Create an empty store at ``path``: a new or empty folder, or a URL under which
        nothing lies yet (an S3 bucket must exist)."""
        storage = create_storage(path, FOLDERS, storage_options)
        write_json(storage, MARKER, {"format": "elves-store", "version": list(STORE_VERSION)})
        return cls(path, storage_options)

    def add(self, src: str | os.PathLike[str], name: str | None = None, *, base: str | None = "auto",
            threads: int | None = None, progress: ProgressFn | None = None,
            follow_symlinks: bool = False) -> AddResult:
        """Add the model at ``src`` (a file or a folder) as ``name`` (default: its file or folder name).

        ``base="auto"`` looks for its base among the stored models (:func:`elves.families.find_base`);
        ``base=None`` stores it on its own (a later :meth:`repack` may still find it a base);
        ``base="NAME"`` codes it against that stored model.
        Tensors coded against the base are BitX deltas where that is smaller (``bitx.delta``).
        Segments already in the store cost nothing. When the new model turns out to be the base
        of models stored before it (the family says which way: metadata first, then the weights),
        it is never coded against them: they are re-coded as its deltas (see :meth:`repack`).

        Links inside the model folder are stored as links; one that points outside it is refused
        unless ``follow_symlinks``. A write that fails (a full disk) raises OutputError and leaves
        the store as it was: what this add wrote is removed again.
        """
        t0 = time.perf_counter()
        src = Path(src)
        name = name or default_name(src)
        check_name(name)
        files, single = read_model(src, follow_symlinks)
        if not files:  # a manifest of no files would be refused by every later read
            raise InputError("the folder holds no files to add", src)
        prof = families.profile(src, name)
        with self.stage(name, base=base, threads=threads, progress=progress, profile=prof) as staged:
            staged.check_fits(files)
            for sf in files:
                staged.add_source(sf)
            result = staged.commit(source="file" if single else "folder")
        result.seconds = time.perf_counter() - t0
        return result

    @contextmanager
    def stage(self, name: str, *, base: str | None = "auto", threads: int | None = None,
              progress: ProgressFn | None = None, profile: ModelProfile | None = None,
              resumable: bool = False, replace: bool = False) -> Iterator[StagedAdd]:
        """Add model ``name`` file by file (:class:`~elves.store.staging.StagedAdd`): what the
        mirror's pull does as files arrive. The files are coded without the store's writer lock;
        the commit takes it (other adds code beside this one). With ``resumable``, an add cut
        short is taken up by the next one of that name; with ``replace``, a stored model of that
        name is replaced when the add commits."""
        nthreads = default_threads(threads)
        with self.storage.adding(), ThreadPoolExecutor(nthreads) as pool:
            with StagedAdd(self.storage, name, base, pool, nthreads, progress, profile, resumable, replace,
                           own_lock=True) as staged:
                yield staged

    def locked(self) -> AbstractContextManager[None]:
        """The store's writer lock, held by the block (for several changes made as one)."""
        return self.storage.locked()

    def models(self) -> list[ModelEntry]:
        """The stored models, in the order they were added."""
        return [ModelEntry(m["name"], m["source"], len(m["files"]), sum(f["size"] for f in m["files"]),
                           m.get("base"), list(m.get("reasons", [])), m["added"]) for m in manifests(self.storage)]

    def model(self, name: str) -> StoredModel:
        """Model ``name``'s files and tensors, with how each is stored (``elves ls STORE/NAME``);
        StoreError if there is none."""
        return StoredModel(self.storage, name)

    def restore(self, name: str, dst: str | os.PathLike[str], *, force: bool = False, threads: int | None = None,
                progress: ProgressFn | None = None) -> RestoreSummary:
        """Write model ``name`` to ``dst``, byte for byte: a folder, or a file path for a model
        added as a single file. Every file's sha256 is checked as it is written (on a thread beside
        the decode), and the file renamed into place only then; an existing ``dst`` is refused
        unless ``force``."""
        man = manifest(self.storage, name)
        nthreads = default_threads(threads)
        window = 2 * nthreads + 2
        files = man["files"]
        with ThreadPoolExecutor(nthreads) as pool, LaterChecks([f.get("link") for f in files]) as later:
            return write_files(Path(dst), [(f["path"], f.get("link"), f.get("mode")) for f in files],
                               man["source"] == "file", force, self.storage.where(manifest_at(name)),
                               later.after(lambda i, target: restore_file(self.storage, name, files[i], target,
                                                                          pool, window, progress, later)))

    def manifest(self, name: str) -> dict[str, Any]:
        """Model ``name``'s manifest, checked (StoreError naming the stored models if there is
        none). Kept for the next call while the file keeps its size, since checking a large
        model's manifest takes milliseconds, and a server asks for one on every request: the dict
        is shared, not to be changed."""
        try:
            blob = self.storage.open(manifest_at(name), "the manifest")
        except FileNotFoundError:
            return manifest(self.storage, name)
        try:
            size = blob.size
        finally:
            blob.close()
        with self._lock:
            held = self._manifests.get(name)
        if held is not None and held[0] == size:
            return held[1]
        man = manifest(self.storage, name)
        with self._lock:
            self._manifests[name] = (size, man)
            while len(self._manifests) > MANIFESTS_KEPT:
                self._manifests.pop(next(iter(self._manifests)))
        return man

    def read_file(self, name: str, path: str, start: int = 0, stop: int | None = None, *,
                  pool: Executor | None = None) -> Iterator[bytes]:
        """The bytes of file ``path`` of model ``name``, decoded as they are needed: all of it,
        checked against its sha256 at the end; or ``[start, stop)`` of it, decoding only the
        chunks that overlap (each checked by its checksum). Memory stays at a few chunks.
        ``pool`` decodes chunks beside each other (a server shares one among its requests)."""
        man = self.manifest(name)
        entry = next((f for f in man["files"] if f["path"] == path and f.get("link") is None), None)
        if entry is None:
            raise StoreError(f"model {name!r} has no file {path!r}", self.storage.where(manifest_at(name)))
        stop = entry["size"] if stop is None else stop
        if not 0 <= start <= stop <= entry["size"]:
            raise UsageError(f"bytes {start}-{stop} lie outside {path!r} ({entry['size']} bytes)")
        own = pool is None
        pool = pool or ThreadPoolExecutor(default_threads(None))
        window = 8
        try:
            if start == stop:
                return
            parts = (file_parts(self.storage, name, entry, pool, window) if (start, stop) == (0, entry["size"])
                     else file_range(self.storage, name, entry, start, stop, pool, window))
            for part in parts:
                yield part.tobytes()
        finally:
            if own:
                pool.shutdown()

    def load(self, name: str, device: Any = None) -> dict[str, Any]:
        """Model ``name``'s tensors by name, as ``elves.load_file`` names them: numpy arrays, or
        torch tensors on ``device`` ("cpu", "cuda:0", ...) when one is given. Each safetensors
        file is decoded on the CPU (as :meth:`read_file` decodes it, sha256 checked) and parsed
        with the reader compress used; ``elves.api.load_into`` puts them into a model. On a GPU
        (``device="cuda:0"``, or an index) its objects are decoded there instead, as an
        archive's streams are (:func:`elves.gpu.load_model`: every chunk checked, and each
        object's hash checked where the CPU decodes it)."""
        if isinstance(device, int) or str(device).startswith("cuda"):
            from ..gpu import load_model

            with ModelObjects(self.storage, name, self.manifest(name),
                              lambda f: str(f["path"]).endswith(".safetensors")) as objects:
                return load_model(objects, device)
        import numpy as np

        from .. import dtypes
        from ..readers.safetensors import from_header

        found: list[tuple[str, str, np.ndarray]] = []
        for f in self.manifest(name)["files"]:
            if f.get("link") is not None or not f["path"].endswith(".safetensors"):
                continue
            data = np.frombuffer(b"".join(self.read_file(name, f["path"])), dtype=np.uint8)
            where = f"{self.storage.where(manifest_at(name))}/{f['path']}"
            n = int(data[:8].view("<u8")[0]) if data.shape[0] >= 8 else -1
            if not 0 <= n <= data.shape[0] - 8:
                raise InputError("not a safetensors file: its header length does not fit", where)
            # a SourceFile's path is a file's (readers open it): this one's names only messages
            sf = from_header(Path(where), f["path"], data[8:8 + n].tobytes(), data.shape[0])
            for v in sf.tensors:
                seg = sf.segments[v.segment] if v.segment >= 0 else None
                dt = dtypes.numpy_dtype(v.dtype) if v.dtype in dtypes.DTYPES else np.dtype(np.uint8)
                raw = data[seg.offset + v.offset:seg.offset + seg.length] if seg is not None else data[:0]
                count = int(np.prod(v.shape, dtype=np.int64))
                found.append((f["path"], v.name, raw[:count * dt.itemsize].view(dt).reshape(v.shape)))
        plain = len({t for _, t, _ in found}) == len(found)  # unless two files share a name (tensor_names)
        out = {(t if plain else f"{path}:{t}"): arr for path, t, arr in found}
        if device is None:
            return out
        import torch

        def to_torch(arr: np.ndarray) -> Any:
            if arr.dtype.name == "bfloat16" or arr.dtype.name.startswith("float8"):
                bits = np.int16 if arr.dtype.itemsize == 2 else np.uint8
                return torch.from_numpy(arr.view(bits).copy()).view(getattr(torch, arr.dtype.name)).to(device)
            return torch.from_numpy(arr.copy()).to(device)

        return {key: to_torch(arr) for key, arr in out.items()}

    def remove(self, name: str, *, locked: bool = False) -> None:
        """Remove model ``name`` from the store. Its data stays until :meth:`gc`, and whatever
        another model's deltas reference stays after that too. ``locked``: the caller holds
        the writer lock (:meth:`locked`)."""
        with nullcontext() if locked else self.storage.locked():
            manifest(self.storage, name)
            self.storage.delete(manifest_at(name))
            self.storage.sync([MODELS])
            self.storage.delete(profile_at(name))

    def gc(self, grace: float | None = None) -> GcReport:
        """Delete the objects nothing references, files left in ``tmp/`` by killed writers, and
        profiles of removed models. Never deletes an object a manifest or a live delta uses.

        Objects and files in ``tmp/`` younger than ``grace`` seconds are kept, and the objects a
        kept journal of a staged add names: an add codes its files before it takes the lease to
        commit them, and a writer whose lease expired unknown to it may still be about to name
        them (by default an hour on object storage; none on a local disk, where gc waits for the
        adds under way, and whose flock cannot be lost)."""
        return maintenance.gc(self.storage, self.storage.gc_grace if grace is None else grace)

    def stats(self) -> StoreStats:
        """Model count, logical and stored bytes, objects and garbage."""
        return maintenance.stats(self.storage)

    def verify(self, full: bool = False, threads: int | None = None,
               progress: ProgressFn | None = None) -> StoreVerifyReport:
        """Check the whole store, as ``git fsck`` checks a repository; nothing is changed.

        Every manifest must parse and pass its checks (its profile too); every object a manifest
        names must exist, with its footer, trailer and every payload's xxh3-64 intact and the
        length the manifest gives it; a delta's reference must be a plain tensor object; nothing
        else may lie in ``objects/`` (orphans, which :meth:`gc` deletes; ``tmp/`` is not looked
        at). With ``full``, every model is decoded and each file's sha256 checked, which finds
        what the checksums cannot (a manifest whose segments were swapped, say). It holds the
        writers' lock, and on a local disk waits for the adds under way, so that their objects are
        not taken for orphans (on object storage, an add's objects not yet committed are listed).
        """
        return verify.verify(self.storage, full, threads, progress)

    def verify_bytes(self, full: bool = False) -> int:
        """What :meth:`verify` reads, in bytes (a progress bar's length)."""
        return verify.verify_bytes(self.storage, full)

    def families(self) -> list[Family]:
        """The families of the stored models (:func:`elves.families.cluster`): each a root model
        and its derived models, each with the evidence for its base."""
        return families.cluster(profiles(self.storage, manifests(self.storage)))

    def repack(self, *, threads: int | None = None, progress: ProgressFn | None = None) -> RepackReport:
        """Re-code models stored on their own as deltas of a base that arrived after them (as
        :func:`elves.families.cluster` finds it). Objects keep their keys and are replaced one by
        one, atomically; an object that some delta references, or that is no smaller as a delta,
        stays as it is."""
        nthreads = default_threads(threads)
        with self.storage.locked(), ThreadPoolExecutor(nthreads) as pool:
            return maintenance.repack(self.storage, pool, nthreads, progress=progress)
