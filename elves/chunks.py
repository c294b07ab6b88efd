"""Where chunk payloads come from, and the decode of one chunk.

An archive being read (:class:`~elves.archive.ArchiveReader`), an archive being written
(:class:`~elves.archive.ArchiveWriter`, which reads back what it wrote, so that a reference is
what restore will produce) and a store object (:class:`~elves.store.StoredObject`) all hand out a
stream's chunk payloads the same way, each checking the chunk's checksum first: they implement
:class:`ChunkSource`, and everything that decodes chunks takes one.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .codecs import Pipeline
from .index import Stream


class ChunkSource(Protocol):
    """A source of checked chunk payloads."""

    def read_payload(self, stream: Stream, chunk: int) -> bytes:
        """The payload of chunk ``chunk`` of ``stream``, its checksum checked."""
        ...


def decode_chunk(source: ChunkSource, stream: Stream, pipeline: Pipeline, i: int,
                 ref: np.ndarray | None = None) -> np.ndarray:
    """Chunk ``i`` of ``stream``, decoded; ``ref`` is its reference chunk, if its pipeline needs one."""
    payload = source.read_payload(stream, i)
    out = np.empty(stream.chunks[i][2], dtype=np.uint8)
    pipeline.decode(np.frombuffer(payload, dtype=np.uint8), out, ref=ref)
    return out
