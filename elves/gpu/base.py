"""A base model already on the device: ``base=`` as a mapping of tensor name -> torch CUDA tensor
or cupy array (the base model's ``state_dict()`` loaded on the GPU, say).

The archive's index lists every base tensor its references need (``base.tensors``: name, dtype,
byte count, xxh3-128). Each is found in the mapping by name (wrapper prefixes such as ``model.``
ignored on both sides, as :func:`bitx.base.normalize` does) and checked for dtype, size, device
and layout before anything is decoded; its memory is then the reference the kernels read, in
place. Its content hash is not recomputed: that would need its bytes on the host, the round trip
this form of ``base=`` exists to avoid. A cast reference (an F32 base of a BF16 fine-tune) is
built by the CPU from a host copy of the tensor, as the CPU decoder builds it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bitx.base import BaseModel, normalize

from .. import dtypes
from ..archive import ArchiveReader
from ..decoder import attach_base
from ..errors import BaseMismatchError
from ..index import Where

BaseArg = str | os.PathLike[str] | BaseModel | Mapping[str, Any] | None


def _is_torch(x: Any) -> bool:
    return hasattr(x, "data_ptr")


def dtype_matches(x: Any, dtype: str) -> bool:
    """Whether device array ``x`` holds elements of the archive's ``dtype``: torch's own dtype;
    for cupy, numpy's (bfloat16 and float8, which cupy cannot hold, as their bits)."""
    if dtype not in dtypes.DTYPES:
        return False
    d = dtypes.get(dtype)
    if _is_torch(x):
        return str(x.dtype) == f"torch.{d.torch}"
    want = np.dtype(d.numpy) if hasattr(np, d.numpy) else np.dtype(f"<u{d.itemsize}")
    return bool(np.dtype(x.dtype) == want)


def _bytes(x: Any) -> Any:
    """Device array ``x``'s memory as a 1-D uint8 array (a view)."""
    if _is_torch(x):
        import torch

        return x.reshape(-1).view(torch.uint8)
    return x.reshape(-1).view(np.uint8)


def nbytes_of(x: Any) -> int:
    return int(x.numel() * x.element_size()) if _is_torch(x) else int(x.nbytes)


class DeviceBase:
    """The base tensors an archive's references need, found and checked in a mapping of device
    arrays (see the module docstring). It is the archive's source of references by content
    (:class:`elves.references.ContentSource`); :func:`elves.gpu.plan.reference_plan` reads the
    device memory of :meth:`tensor` straight away."""

    def __init__(self, tensors: Mapping[str, Any], needed: dict[str, Any], path: Where):
        self.path = path
        by_name: dict[str, tuple[str, Any]] = {}
        for key, x in tensors.items():
            by_name.setdefault(normalize(str(key)), (str(key), x))
        self._found: dict[tuple[str, int], tuple[str, Any]] = {}
        for t in needed.get("tensors", []):
            name, dt, nbytes = t["name"], t["dtype"], int(t["nbytes"])
            what = f"base tensor {name!r} ({t.get('file', '?')})"
            got = by_name.get(normalize(name))
            if got is None:
                raise BaseMismatchError(f"the base given on the device has no tensor {name!r}, which the archive "
                                        f"references ({dt}, {nbytes} bytes)", path)
            key, x = got
            if not hasattr(x, "dtype") or not (_is_torch(x) or hasattr(x, "__cuda_array_interface__")):
                raise BaseMismatchError(f"{what}: {key!r} is a {type(x).__name__}, not a torch tensor or cupy array",
                                        path)
            if not dtype_matches(x, dt):
                raise BaseMismatchError(f"{what}: {key!r} is {x.dtype}, but the archive's references need {dt}", path)
            if nbytes_of(x) != nbytes:
                raise BaseMismatchError(f"{what}: {key!r} has shape {tuple(x.shape)} ({nbytes_of(x)} bytes), but the "
                                        f"archive's references need {nbytes} bytes", path)
            contiguous = x.is_contiguous() if _is_torch(x) else bool(x.flags.c_contiguous)
            if not contiguous:
                raise BaseMismatchError(f"{what}: {key!r} is not contiguous (pass it .contiguous())", path)
            self._found[(t["hash"], nbytes)] = (key, x)

    def on(self, device: int) -> None:
        """Check that every tensor found is on CUDA device ``device``."""
        for key, x in self._found.values():
            where = (x.device.index if x.device.type == "cuda" else None) if _is_torch(x) else int(x.device.id)
            if where != device:
                raise BaseMismatchError(f"base tensor {key!r} is on {x.device}, not on cuda:{device}", self.path)

    def tensor(self, digest: str, nbytes: int) -> Any | None:
        """The device array of the base tensor with that hash and size, if the archive needs it."""
        got = self._found.get((digest, nbytes))
        return None if got is None else got[1]

    def bytes_of(self, digest: str, nbytes: int) -> Any:
        """That tensor's memory as a 1-D uint8 array (a view, on the device)."""
        x = self.tensor(digest, nbytes)
        assert x is not None, "a reference the archive's index does not list"
        return _bytes(x)

    # elves.references.ContentSource
    def find(self, digest: str, nbytes: int) -> object | None:
        return self.tensor(digest, nbytes)

    def hash_segments(self, nbytes: Iterable[int] | None = None, with_sha256: bool = False) -> None:
        """Nothing to hash: the tensors were matched by name, dtype and size."""

    def read(self, digest: str, offset: int, length: int) -> np.ndarray:
        """Bytes of a tensor copied to the host (for the references the CPU builds: casts)."""
        x = next(x for (h, _), (_, x) in self._found.items() if h == digest)
        view = _bytes(x)[offset:offset + length]
        return np.ascontiguousarray(view.cpu().numpy() if _is_torch(view) else view.get(), dtype=np.uint8)

    def close(self) -> None:
        self._found = {}


def attach(reader: ArchiveReader, base: BaseArg, device: int | None) -> None:
    """Make ``base`` the source of the archive's references by content: a model, a folder or an
    archive of one (:func:`elves.decoder.attach_base`), or a mapping of device arrays
    (:class:`DeviceBase`, checked to be on CUDA device ``device`` unless that is None)."""
    if not isinstance(base, Mapping):
        attach_base(reader, base)
        return
    needed = reader.base_needed
    if not needed:
        return
    found = DeviceBase(base, needed, reader.path)
    if device is not None:
        found.on(device)
    reader.references.close()
    reader.references.content, reader.references.owns_content = found, False
