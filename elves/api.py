"""The public Python API: compress and restore models, open archives, read tensors, verify.

    >>> import elves
    >>> elves.compress("all-MiniLM-L6-v2/", "minilm.elves")
    >>> with elves.open("minilm.elves") as a:
    ...     w = a.get_tensor("embeddings.word_embeddings.weight")     # numpy array
    ...     big = [t for t in a.tensors("*.weight") if t.nbytes > 1 << 20]  # name, codec, stored bytes ...
    ...     config = a.read_file("config.json")                        # one file's bytes
    >>> tensors = elves.load_file("minilm.elves", framework="pt")     # dict of torch tensors
    >>> elves.restore("minilm.elves", "restored/")                    # byte-exact files
"""
from __future__ import annotations

import builtins
import hashlib
import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, overload

import numpy as np

from . import dtypes
from .archive import ArchiveReader
from .decoder import (
    LaterChecks,
    attach_base,
    check_tensors,
    file_chunks,
    read_stream,
    restore_file,
    write_files,
)
from .errors import (
    CorruptArchiveError,
    ElvesError,
    InputError,
    OutputExistsError,
    UsageError,
)
from .index import FileEntry, TensorEntry, tensor_names
from .listing import (
    FileInfo,
    TensorInfo,
    codec_name,
    files_of,
    matching_files,
    matching_tensors,
    tensors_of,
)
from .parallel import default_threads

if TYPE_CHECKING:
    import cupy
    import torch

    from .gpu import GpuArchive

Framework = Literal["np", "numpy", "pt", "torch", "cupy"]
PathLike = str | os.PathLike[str]
# base=: a model, a folder or an archive of one; on a GPU also the base's tensors already there, by name
BaseLike = PathLike | Mapping[str, Any]


# The largest file read_file returns as bytes: a larger one belongs on disk (extract).
MAX_READ_BYTES = 1 << 30
MAX_LINK_HOPS = 40


class Archive:
    """An open archive: lazy, per-tensor access. Open it with :func:`elves.open`."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 base: str | os.PathLike[str] | None = None):
        self._reader = ArchiveReader(path)
        if base is not None:  # without one, reading a tensor coded against the base raises
            try:
                attach_base(self._reader, base)
            except BaseException:
                self._reader.close()
                raise
        self._threads = default_threads(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._views = tensor_names(self._reader.files)
        self._checked: set[str] = set()  # files whose tensor entries agree with their own structure
        self._tensors: list[TensorInfo] | None = None
        self._by_path = {e.path: e for e in self._reader.files}

    @property
    def path(self) -> Path:
        return self._reader.path

    @property
    def lossy(self) -> bool:
        return self._reader.lossy

    def files(self, pattern: str | None = None) -> list[FileInfo]:
        """The files of the archive, as restore writes them, in order; with ``pattern``, those
        whose path matches that glob (``*`` crosses "/")."""
        return matching_files(files_of(self._reader.streams, self._reader.files), pattern)

    def tensors(self, pattern: str | None = None) -> list[TensorInfo]:
        """The tensors of the archive, in file order, with how each is stored; with ``pattern``,
        those whose name, or "file:name", matches that glob."""
        if self._tensors is None:
            self._tensors = tensors_of(self._reader.streams, self._reader.files)
        return matching_tensors(self._tensors, pattern)

    def keys(self) -> list[str]:
        """The names of the tensors, in file order."""
        return list(self._views)

    def __contains__(self, name: object) -> bool:
        return name in self._views

    def tensor_info(self, name: str) -> TensorInfo:
        """How the tensor called ``name`` (a key of :meth:`keys`) is stored: see :class:`TensorInfo`."""
        entry, t = self._lookup(name)
        return next(i for i in self.tensors() if i.file == entry.path and i.name == t.name)

    def read_file(self, name: str) -> bytes:
        """The bytes of the file at path ``name`` (a link: the file it leads to in the archive),
        decoding only its streams and checking its sha256 (a lossy file: its streams' decoded
        hashes, as restore does). A file over 1 GiB raises
        :class:`UsageError`: :meth:`extract` writes it to disk instead."""
        entry = self._resolve(name)
        if entry.size > MAX_READ_BYTES:
            raise UsageError(f"{name} is {entry.size} bytes, too large to read into memory: extract it to disk "
                             "(Archive.extract, `elves extract`) or stream it (Archive.iter_file)", self.path)
        return b"".join(self.iter_file(name))

    def iter_file(self, name: str) -> Iterator[memoryview]:
        """The bytes of the file at path ``name``, as :meth:`read_file` gives them, in pieces as
        they are decoded (a chunk at a time, memory bounded by the decode window): for writing a
        file of any size to a stream. Each piece has passed its chunk's checks; the file's sha256
        is known only at its end, so a file that fails it raises after its last piece, and the
        caller must drop what it wrote (``elves restore -o -`` then exits non-zero)."""
        entry = self._resolve(name)
        for chunk in file_chunks(self._reader, entry, self._ensure_pool(), 2 * self._threads + 2):
            yield chunk.data

    @property
    def single_file(self) -> bool:
        """Whether the archive is of a single model file (compressed from a file, not a folder)."""
        return self._reader.source_kind == "file"

    def extract(self, names: list[str], dst: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
        """Write the files at paths ``names`` into the folder ``dst`` (made if missing), each at its
        path in the archive, links as links; only their streams are decoded. Each file is checked
        (sha256) and renamed into place once complete; nothing is written through a link under
        ``dst``. A file that is already there is refused unless ``force``. Returns where they lie."""
        chosen = [self._file(n) for n in dict.fromkeys(names)]
        dst = Path(dst)
        there = [e.path for e in chosen if os.path.lexists(dst / e.path)]
        if there and not force:
            raise OutputExistsError("already exists (use --force to overwrite)", dst / there[0])
        pool, window = self._ensure_pool(), 2 * self._threads + 2
        # force: dst may hold other files; the files are moved in one by one, links not followed
        with LaterChecks([e.link for e in chosen]) as later:
            write_files(dst, [(e.path, e.link, e.mode) for e in chosen], False, True, self.path, later.after(
                lambda i, target: restore_file(self._reader, chosen[i], target, pool, window, None, True, later)))
        return [dst / e.path for e in chosen]

    def _file(self, name: str) -> FileEntry:
        try:
            return self._by_path[name]
        except KeyError:
            raise UsageError(f"no file {name!r} in the archive (`elves ls` lists them)", self.path) from None

    def _resolve(self, name: str) -> FileEntry:
        """The file at ``name``, or the file the link there leads to in the archive."""
        entry = self._file(name)
        for _ in range(MAX_LINK_HOPS):
            if entry.link is None:
                return entry
            target = posixpath.normpath(posixpath.join(posixpath.dirname(entry.path), entry.link))
            if target not in self._by_path:
                break
            entry = self._by_path[target]
        raise UsageError(f"{name} is a link that leads to no file of the archive", self.path)

    def _ensure_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads)
        return self._pool

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor called ``name`` as a numpy array (bfloat16 and float8 via ml_dtypes).

        Sub-byte kinds (F4, F6_*), which numpy cannot hold, come back as their packed bytes: a
        1-D uint8 array.
        """
        entry, t = self._lookup(name)
        # The index parser checked that the tensor lies inside its segment, in its dtype.
        if t.dtype in dtypes.PACKED:
            npdt = np.dtype(np.uint8)
            shape: tuple[int, ...] = (self._reader.streams[entry.segments[t.segment]].nbytes if t.segment >= 0 else 0,)
        else:
            npdt, shape = dtypes.numpy_dtype(t.dtype), t.shape
        pool = self._ensure_pool()
        if entry.path not in self._checked:  # an empty tensor too: the file may say it is not
            check_tensors(self._reader, entry, pool, 2 * self._threads + 2)
            self._checked.add(entry.path)
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype=npdt)
        raw = read_stream(self._reader, entry.segments[t.segment], pool, 2 * self._threads + 2)
        flat = raw[t.offset:]
        if t.strides is None:
            return flat[:count * npdt.itemsize].view(npdt).reshape(shape)
        base = flat[:len(flat) - len(flat) % npdt.itemsize].view(npdt)
        view = np.lib.stride_tricks.as_strided(base, shape, tuple(s * npdt.itemsize for s in t.strides),
                                               writeable=False)
        return np.ascontiguousarray(view)

    def _lookup(self, name: str) -> tuple[FileEntry, TensorEntry]:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._reader.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@overload
def open(path: PathLike, *, threads: int | None = None, base: BaseLike | None = None,  # noqa: A001
         device: None = None) -> Archive: ...


@overload
def open(path: PathLike, *, threads: int | None = None, base: BaseLike | None = None,  # noqa: A001
         device: Any = None) -> Archive | GpuArchive: ...


def open(path: PathLike, *, threads: int | None = None, base: BaseLike | None = None,  # noqa: A001
         device: Any = None) -> Archive | GpuArchive:
    """Open an archive for lazy, per-tensor reading. ``base``: the base model (file, folder or
    ``.elves`` archive) of an archive compressed against one; it is checked when opened.

    With ``device="cuda:0"`` (say), tensors are decoded on that GPU and come back as torch
    tensors (see :mod:`elves.gpu`); otherwise as numpy arrays. On a GPU, ``base`` may also be
    the base's tensors already on the device, by name (``base_model.state_dict()``).
    """
    if _on_gpu(device):
        from . import gpu

        return gpu.open(path, device, base=base)
    return Archive(path, threads=threads, base=_host_base(base))


def _host_base(base: BaseLike | None) -> PathLike | None:
    """``base`` for a decode on the CPU, which reads a base model from files only."""
    if isinstance(base, Mapping):
        raise UsageError("a base given as tensors on the device is for loads onto that device (device='cuda:N'): "
                         "on the CPU, pass the base model's file, folder or archive")
    return base


def _on_gpu(device: Any) -> bool:
    return device is not None and str(device) != "cpu"


@overload
def load_file(path: PathLike, framework: Literal["np", "numpy"] | None = None, *, threads: int | None = None,
              base: BaseLike | None = None, device: None = None) -> dict[str, np.ndarray]: ...


@overload
def load_file(path: PathLike, framework: Literal["pt", "torch"], *, threads: int | None = None,
              base: BaseLike | None = None, device: Any = None) -> dict[str, torch.Tensor]: ...


@overload
def load_file(path: PathLike, framework: Literal["cupy"], *, threads: int | None = None,
              base: BaseLike | None = None, device: Any = None) -> dict[str, cupy.ndarray]: ...


@overload
def load_file(path: PathLike, framework: Framework | None = None, *, threads: int | None = None,
              base: BaseLike | None = None, device: Any = None) -> dict[str, Any]: ...


def load_file(path: PathLike, framework: Framework | None = None, *, threads: int | None = None,
              base: BaseLike | None = None, device: Any = None) -> dict[str, Any]:
    """Every tensor of the archive, by name: numpy arrays, or torch tensors with ``framework="pt"``.

    With ``device="cuda:0"`` (say), the chunks are decoded on that GPU as they stream in, and the
    result is torch tensors there (or cupy arrays with ``framework="cupy"``): see :mod:`elves.gpu`.
    ``base``: as for :func:`open`.
    """
    if _on_gpu(device):
        from . import gpu

        if framework not in (None, "pt", "torch", "cupy"):
            raise UsageError(f"framework={framework!r} holds no GPU tensors: use 'pt' or 'cupy' with a device, "
                             "or no device for numpy")
        return gpu.load_file(path, device, framework if framework not in (None, "torch") else "pt", base=base)
    framework = framework or "np"
    if framework not in ("np", "numpy", "pt", "torch"):
        raise UsageError(f"framework must be 'np' or 'pt' without a device, not {framework!r}")
    with Archive(path, threads=threads, base=_host_base(base)) as a:
        arrays = {k: a.get_tensor(k) for k in a.keys()}
    if framework in ("np", "numpy"):
        return arrays
    return {k: to_torch(v) for k, v in arrays.items()}


def load_into(module: torch.nn.Module, src: PathLike, *, name: str | None = None, device: Any = "cpu",
              base: BaseLike | None = None, strict: bool = True) -> torch.nn.Module:
    """Load the weights of archive ``src`` (or, with ``name``, of model ``name`` of the store at
    ``src``) into the torch module ``module`` (a ``transformers`` model, say) on ``device``, and
    return it.

    On a GPU (``device="cuda:0"``) an archive is decoded there (:mod:`elves.gpu`, ``base`` for a
    delta against a base model) and the decoded tensors *become* the module's parameters
    (``load_state_dict(..., assign=True)``): no second copy on the device; the module's buffers
    follow them there. A store's models likewise (:meth:`elves.store.Store.load`: decoded on the
    GPU, or on the CPU and moved to ``device``). Tensor names may carry the module's ``base_model_prefix``
    ("bert.") or not; ``strict`` refuses a checkpoint that leaves a parameter of the module
    unset. Build the module on the CPU (``from_config``), not on the ``meta`` device: the
    values of its non-persistent buffers (position ids) are in no checkpoint.
    """
    if name is not None:
        from .store import Store

        state = Store(src).load(name, device=device)
    else:
        state = load_file(src, "pt", base=base, device=device if _on_gpu(device) else None)
        if not _on_gpu(device):
            state = {k: v.to(device) for k, v in state.items()}
    own = set(module.state_dict())
    prefix = getattr(module, "base_model_prefix", "") or ""
    if prefix and not own & set(state):
        # transformers saves a base model's weights with or without its prefix ("bert.")
        plus = {f"{prefix}.{k}": v for k, v in state.items()}
        minus = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        state = plus if len(own & set(plus)) >= len(own & set(minus)) else minus
    if not own & set(state):
        raise UsageError(f"{src}: none of its tensors is a parameter of {type(module).__name__}")
    missing, _ = module.load_state_dict(state, strict=False, assign=True)
    if strict and missing:
        raise UsageError(f"{src}: no tensor for {len(missing)} parameters of {type(module).__name__}, "
                         f"such as {missing[0]!r}")
    meta = [n for n, b in module.named_buffers() if b.is_meta]
    if meta:
        raise UsageError(f"{type(module).__name__} was built on the meta device: its buffer {meta[0]!r} has no "
                         "value (build the module on the CPU)")
    return module.to(device)


def to_torch(arr: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing ``arr``'s memory; bfloat16/float8 arrays are reinterpreted bitwise."""
    try:
        import torch
    except ImportError:
        raise UsageError("framework='pt' needs torch, which is not installed") from None

    if arr.dtype.name in ("bfloat16",) or arr.dtype.name.startswith("float8"):
        bits = np.int16 if arr.dtype.itemsize == 2 else np.uint8
        return torch.from_numpy(arr.view(bits)).view(getattr(torch, arr.dtype.name))
    return torch.from_numpy(arr)


@dataclass
class DTypeStats:
    original_bytes: int = 0
    stored_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.stored_bytes, 1)


@dataclass
class ArchiveInfo:
    """What an archive holds (``elves info``)."""

    path: Path
    format: tuple[int, int]
    writer: str
    lossy: bool
    archive_bytes: int
    original_bytes: int
    files: list[dict[str, Any]]
    tensors: int
    by_dtype: dict[str, DTypeStats] = field(default_factory=dict)
    codecs: dict[str, int] = field(default_factory=dict)
    base: dict[str, Any] | None = None   # the base model restore needs (BitX), from the index
    error_bound: dict[str, Any] | None = None  # lossy archives: {"codec", "mode", "value", "spec"}
    lossy_streams: int = 0               # streams that restore within the bound rather than exactly
    ref_streams: int = 0                 # streams coded against another stream of the archive

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.archive_bytes, 1)


def info(path: str | os.PathLike[str]) -> ArchiveInfo:
    """Summarise an archive without decoding it: files, tensors, codecs and ratio per dtype.

    Per-dtype ratios count each unique stream once; what dedup saved shows in the total ratio.
    """
    with ArchiveReader(path) as r:
        by_dtype: dict[str, DTypeStats] = defaultdict(DTypeStats)
        codecs: dict[str, int] = defaultdict(int)
        for s in r.streams:
            st = by_dtype[s.dtype or "bytes"]
            st.original_bytes += s.nbytes
            st.stored_bytes += s.stored_bytes
            codecs[codec_name(s.pipeline)] += 1
        files = [{"path": e.path, "size": e.size, "format": e.format, "tensors": len(e.tensors),
                  **({"link": e.link} if e.link is not None else {})} for e in r.files]
        return ArchiveInfo(
            path=r.path, format=r.version, writer=r.writer, lossy=r.lossy,
            archive_bytes=r.path.stat().st_size, original_bytes=sum(e.size for e in r.files),
            files=files, tensors=sum(len(e.tensors) for e in r.files),
            by_dtype=dict(by_dtype), codecs=dict(codecs), base=r.base_needed,
            error_bound=r.error_bound, lossy_streams=sum(1 for s in r.streams if s.decoded_hash is not None),
            ref_streams=sum(1 for s in r.streams if s.ref is not None),
        )


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`. ``ok`` is False when ``problems`` is not empty."""

    path: Path
    files: int
    bytes_checked: int
    problems: list[str] = field(default_factory=list)
    # Lossy archives: the bound, and with ``against`` the largest errors of the restored elements
    # against the source (absolute; relative over nonzero elements) and how many exceed the bound.
    error_bound: dict[str, Any] | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    over_bound: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike[str], against: str | os.PathLike[str] | None = None, *,
           threads: int | None = None, base: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Decode everything and check every checksum; with ``against``, that the model at that path
    is exactly what restore would write (same files, same sha256).

    For a lossy archive, ``against`` is the original model: its files must match the sha256
    recorded at compress time, and every restored element of a lossy tensor is compared with the
    source's: the report holds the largest absolute and relative errors, and any element outside
    the bound (or a NaN, infinity or signed zero that did not come back exactly) is a problem.

    Corruption is reported as a problem, not raised; an archive that cannot be opened raises,
    and so does one compressed against a base model when ``base`` is missing or wrong.
    """
    nthreads = default_threads(threads)
    report_problems: list[str] = []
    checked = 0
    with ArchiveReader(path) as reader, ThreadPoolExecutor(nthreads) as pool:
        attach_base(reader, base)
        sources = _source_files(reader, Path(against)) if against is not None else {}
        errors = _LossyErrors()
        for entry in reader.files:
            try:
                if entry.lossy and entry.path in sources:
                    checked += _check_lossy_file(reader, entry, sources[entry.path], pool,
                                                 2 * nthreads + 2, errors)
                else:
                    for chunk in file_chunks(reader, entry, pool, 2 * nthreads + 2):
                        checked += chunk.shape[0]
            except ElvesError as e:
                report_problems.append(e.message)
        report_problems += errors.problems
        if against is not None:
            report_problems += _compare_source(reader, Path(against), sources)
        return VerifyReport(reader.path, len(reader.files), checked, report_problems,
                            error_bound=reader.error_bound,
                            max_abs_error=errors.max_abs if errors.elements else None,
                            max_rel_error=errors.max_rel if errors.elements else None,
                            over_bound=errors.over)


@dataclass
class _LossyErrors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    over: int = 0
    elements: int = 0
    problems: list[str] = field(default_factory=list)


def _check_lossy_file(reader: ArchiveReader, entry: FileEntry, src: Path, pool: ThreadPoolExecutor,
                      window: int, errors: _LossyErrors) -> int:
    """Decode a lossy file (every checksum and decoded hash checked) and compare each lossy
    tensor's elements with the source file's; return the bytes decoded."""
    from .decoder import iter_stream, stream_label
    from .lossy import bound_of, error_stats

    pos = 0
    with builtins.open(src, "rb") as f:
        fd = f.fileno()
        for index in entry.segments:
            stream = reader.streams[index]
            bound = bound_of(stream.pipeline) if stream.decoded_hash is not None else None
            over = 0
            for chunk in iter_stream(reader, index, pool, window):
                if bound is not None and stream.dtype is not None:  # lossy streams are tensors
                    orig = np.frombuffer(os.pread(fd, chunk.shape[0], pos), dtype=np.uint8)
                    if orig.shape[0] != chunk.shape[0]:
                        raise InputError("is shorter than the archived file", src)
                    max_abs, max_rel, bad = error_stats(stream.dtype, bound, orig, chunk)
                    errors.max_abs = max(errors.max_abs, max_abs)
                    errors.max_rel = max(errors.max_rel, max_rel)
                    errors.elements += chunk.shape[0]
                    over += bad
                pos += chunk.shape[0]
            if over:
                errors.over += over
                errors.problems.append(f"{stream_label(reader, index)}: {over} elements differ from {src} "
                                       f"by more than the error bound")
    if pos != entry.size:
        raise CorruptArchiveError(f"{entry.path}: restored size does not match the stored size", reader.path)
    return pos


def _source_files(reader: ArchiveReader, src: Path) -> dict[str, Path]:
    """The files (and links) of the model at ``src`` by relative path, links not followed."""
    if not os.path.lexists(src):
        raise InputError("no such file or folder", src)
    if not src.is_dir():
        return {reader.files[0].path if len(reader.files) == 1 else src.name: src}
    found = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            found[p.relative_to(src).as_posix()] = p
    return found


def _compare_source(reader: ArchiveReader, src: Path, sources: dict[str, Path]) -> list[str]:
    problems = []
    stored = {e.path: e for e in reader.files}
    for rel in sorted(set(sources) - set(stored)):
        problems.append(f"{rel}: in {src} but not in the archive")
    for rel in sorted(set(stored) - set(sources)):
        problems.append(f"{rel}: in the archive but not in {src}")
    for rel in sorted(set(stored) & set(sources)):
        entry, path = stored[rel], sources[rel]
        if entry.link is not None or path.is_symlink() and src.is_dir():
            # Links are compared by where they lead within the model, as compress records them.
            leads = posixpath.normpath(posixpath.join(posixpath.dirname(rel), entry.link or ""))
            if not path.is_symlink() or os.path.relpath(os.path.realpath(path), os.path.realpath(src)) != leads:
                problems.append(f"{rel}: differs from {path} (the link or its target)")
            continue
        h = hashlib.sha256()
        with builtins.open(path, "rb") as f:
            for piece in iter(lambda: f.read(8 << 20), b""):
                h.update(piece)
        if h.hexdigest() != entry.sha256:
            problems.append(f"{rel}: differs from {path} (sha256)")
    return problems
