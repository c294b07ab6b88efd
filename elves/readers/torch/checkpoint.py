"""What reading a checkpoint yields: the records the unpickler hands the pickle for storages and
tensors, what its pickles told (:class:`_Pickled`), and where its storages lie in the file."""
from __future__ import annotations

from dataclasses import dataclass, field

# --- What the unpickler hands the pickle instead of real objects -------------------------------
# slots=True matters: pickle's BUILD opcode writes into an object's __dict__ directly, which would
# let a crafted pickle rewrite these records; without a __dict__ it fails instead.

@dataclass(frozen=True, slots=True)
class _DType:
    """A ``torch.<dtype>`` global; ``name`` is None for dtypes elves does not code."""

    name: str | None


@dataclass(frozen=True, slots=True)
class _StorageType:
    """A ``torch.<X>Storage`` global. An untyped storage holds bytes; its tensors give its dtype."""

    dtype: str | None
    itemsize: int          # 0 when unknown
    untyped: bool = False


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage the pickle points at (its persistent id). ``name`` is the storage key, prefixed by
    ``constants/`` for TorchScript constants; ``offset`` is in bytes (legacy storage views)."""

    name: str
    type: _StorageType
    offset: int = 0


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """Where a tensor's elements lie: ``offset``, ``shape`` and ``strides`` count elements."""

    storage: _StorageRef
    dtype: str | None
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass
class _Pickled:
    """What the pickles of one checkpoint told us."""

    # the tensors that data.pkl (or the legacy pickle) holds in plain containers, by dotted name
    named: dict[str, _TensorRef] = field(default_factory=dict)
    storage_types: dict[str, _StorageType] = field(default_factory=dict)
    tensors: list[_TensorRef] = field(default_factory=list)
    # globals outside the allowlist, in the order the pickle first uses them (a dict keeps it)
    unknown: dict[str, None] = field(default_factory=dict)
    # storage name -> its size in bytes, as the pickle records it (a hint for finding it in a zip)
    storage_bytes: dict[str, int] = field(default_factory=dict)

    def storage_dtypes(self) -> dict[str, str | None]:
        """Each storage's dtype: its class's, or for an untyped storage the one dtype its tensors
        agree on (None when they do not, or when none views it)."""
        viewed: dict[str, set[str | None]] = {}
        for t in self.tensors:
            viewed.setdefault(t.storage.name, set()).add(t.dtype)
        out = {}
        for name, stype in self.storage_types.items():
            if stype.untyped:
                kinds = viewed.get(name, set())
                out[name] = kinds.pop() if len(kinds) == 1 else None
            else:
                out[name] = stype.dtype
        return out


_Locations = dict[str, tuple[int, int]]  # storage name -> (offset, length) of its bytes in the file


@dataclass
class _Checkpoint:
    format: str                    # "torch-zip" or "torch-legacy"
    size: int
    pickled: _Pickled
    storages: _Locations           # the storages stored plainly (not compressed)
    little_endian: bool = True
    notes: list[str] = field(default_factory=list)
