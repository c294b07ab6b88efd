"""The codecs one stream's chunks go through, in the manner of zarr v3's codec pipeline.

A stream is cut into chunks and every chunk goes through the same pipeline, independently of the
others. Encoding applies the codecs in order; decoding applies them in reverse, and the first
codec of the list writes straight into the caller's output buffer. The pipeline knows codecs by
their kinds and declared properties only (:class:`~elves.codecs.base.Codec`): what each takes and
gives, whether it needs the chunk's reference chunk, whether it may leave nothing to store.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CodecError, CorruptArchiveError
from .base import U8, Codec, Config, DecodesThrough, Expected, Form
from .registry import codec_from_config


class Pipeline:
    """Built only in an order that decodes: each codec takes what the one before it gives, the
    last gives bytes, each codec's :meth:`~Codec.validate` accepts the codecs before it, and at
    most one may leave a chunk without a payload (CodecError otherwise)."""

    def __init__(self, codecs: list[Codec]):
        form = Form.ARRAY
        for i, codec in enumerate(codecs):
            if not form.feeds(codec.decodes_to):
                raise CodecError(f"codec {codec.codec_id!r} cannot follow "
                                 f"{[c.codec_id for c in codecs[:i]] or 'the start'} in a pipeline")
            codec.validate(codecs[:i])
            form = codec.encodes_to
        if not form.feeds(Form.BYTES):
            raise CodecError(f"a pipeline cannot end with {codecs[-1].codec_id!r}: it does not produce bytes")
        optional = [i for i, c in enumerate(codecs) if c.optional_payload]
        if len(optional) > 1:  # an empty payload would not say which of them left it
            raise CodecError(f"codecs {[codecs[i].codec_id for i in optional]} may each leave a chunk "
                             "without a payload: a pipeline takes one of them at most")
        self.codecs = codecs
        # codecs[i + 1]'s payloads decode in one step through codecs[i] (neither needs a reference)
        self._through: dict[int, DecodesThrough] = {
            i + 1: c for i, c in enumerate(codecs[:-1]) if isinstance(c, DecodesThrough)
            and not c.needs_ref and not codecs[i + 1].needs_ref and c.decodes_through(codecs[i + 1])}
        self._optional = optional[0] if optional else None
        # The last codec whose decode writes into the caller's buffer: the first, and the one
        # after it when the first decodes in place (an xor filter decodes its residual there).
        self._into = 1 if len(codecs) > 1 and codecs[0].decodes_in_place else 0
        self._expected: dict[int, list[Expected]] = {}  # a stream's chunks have one or two sizes

    @classmethod
    def from_config(cls, configs: list[Config]) -> Pipeline:
        """The pipeline ``configs`` describe. Codecs keep no state between chunks, so streams
        with the same configs share one: building it costs more than coding a small chunk."""
        if not isinstance(configs, list):
            raise CodecError(f"a pipeline must be a list of codec configs, not {type(configs).__name__}")
        key = repr(configs)  # configs hold JSON's types, which repr tells apart (1, 1.0, True)
        pipeline = _BUILT.get(key)
        if pipeline is None:
            pipeline = cls([codec_from_config(c) for c in configs])
            if len(_BUILT) >= _MAX_BUILT:  # a forged index can name any number of configs
                _BUILT.clear()
            _BUILT[key] = pipeline
        return pipeline

    def get_config(self) -> list[Config]:
        return [c.get_config() for c in self.codecs]

    @property
    def ref_codec(self) -> Codec | None:
        """The codec that needs a reference chunk, if any."""
        return next((c for c in self.codecs if c.needs_ref), None)

    def expected(self, nbytes: int) -> list[Expected]:
        """What each codec's decode must produce, for a chunk that decodes to ``nbytes``:
        ``expected(n)[i]`` for ``codecs[i]``. CorruptArchiveError if no payload can decode to
        ``nbytes`` (a length that is not whole elements of the pipeline's dtype)."""
        sizes = self._expected.get(nbytes)
        if sizes is None:
            sizes = [Expected.exactly(nbytes)]
            for codec in self.codecs[:-1]:
                sizes.append(codec.encoded_size(sizes[-1]))
            if len(self._expected) >= 16:
                self._expected.clear()
            self._expected[nbytes] = sizes
        return sizes

    def _ref(self, codec: Codec, ref: U8 | None) -> U8 | None:
        """What ``codec`` gets for a reference: ``ref`` if it needs one (CodecError if there is none)."""
        if not codec.needs_ref:
            return None
        if ref is None:
            raise CodecError(f"codec {codec.codec_id!r} needs a reference chunk")
        return ref

    def encode(self, chunk: U8, ref: U8 | None = None) -> bytes:
        """Encode one chunk given as a 1-D uint8 array of its raw bytes; ``ref`` is its
        reference chunk, given only to a codec that needs one."""
        data: Any = chunk
        for codec in self.codecs:
            data = codec.encode(data, self._ref(codec, ref))
            if data is None:  # the chunk needs no payload
                return b""
        return bytes(data)

    def decode(self, payload: U8 | bytes, out: U8, ref: U8 | None = None) -> U8:
        """Decode one chunk's payload into ``out`` (a 1-D uint8 array of the decoded length);
        ``ref`` is the chunk's reference chunk when a codec needs one. Every stage is held to
        the size ``out`` implies (:meth:`expected`)."""
        if not self.codecs:  # stored as it is
            if len(payload) != out.shape[0]:
                raise CorruptArchiveError(f"stored chunk holds {len(payload)} bytes, expected {out.shape[0]}")
            out[:] = np.frombuffer(payload, dtype=np.uint8)
            return out
        data: Any = payload
        last = len(self.codecs) - 1
        if len(payload) == 0 and self._optional is not None:  # a chunk its codec left without a payload
            last, data = self._optional, None
        sizes = self._expected.get(out.shape[0]) or self.expected(out.shape[0])
        i = last
        while i >= 0:
            codec = self.codecs[i]
            outer = self._through.get(i) if data is not None else None
            if outer is not None:
                data = outer.decode_through(codec, data, out if i - 1 <= self._into else None, sizes[i - 1])
                i -= 2
            else:
                data = codec.decode(data, out if i <= self._into else None, self._ref(codec, ref), expected=sizes[i])
                i -= 1
        return out


_BUILT: dict[str, Pipeline] = {}
_MAX_BUILT = 256
