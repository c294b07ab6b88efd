"""Every codec the registry names passes the same checks, as zarr v3 holds its codecs to one
contract: it declares a kind the pipeline can check; its config survives JSON and reads back to an
equal codec; it takes empty chunks, one element, NaNs with payloads, infinities, -0.0 and
subnormals, every dtype it accepts, odd lengths and the encoder's largest chunk; what it encodes
fits the sizes its ``encoded_size`` allows (decoding refuses anything else); and it decodes the
golden payloads of tests/golden/codecs/ (written by an earlier elves) and encodes their inputs to
the same bytes. A lossy codec holds its bound on every element instead of returning the input."""
from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitx.codec import Xor
from elves import dtypes
from elves.bounds import ErrorBound, parse_error_bound
from elves.codecs import Codec, Pipeline, codec_from_config
from elves.codecs.base import ArrayArrayCodec, ArrayPlanesCodec, BytesBytesCodec, PlanesBytesCodec
from elves.codecs.elf import CODE_DTYPE, ELF_DTYPES, Elf
from elves.codecs.planes import Planes
from elves.codecs.rans import Rans
from elves.codecs.registry import codecs
from elves.codecs.zstd import Zstd
from elves.encoder import TENSOR_CHUNK_BYTES
from elves.errors import CodecError, CorruptArchiveError

from .test_codecs import SPECIAL
from .test_elf import assert_within, special_bits

GOLDEN = json.loads((Path(__file__).parent / "golden" / "codecs" / "payloads.json").read_text())
H = "0" * 32  # xor takes its reference's hash on trust: the caller checks the reference
WORD = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64, 16: np.uint64}
LENGTHS = [0, 1, 2, 3, 31, 32, 33, 257]


@dataclass(frozen=True)
class Case:
    """A codec in a representative config, and the pipeline around it that yields bytes."""

    name: str
    codec_id: str
    dtype: str
    build: Callable[[int], list[Codec]]  # the pipeline's codecs, given the reference's byte count
    ref: bool = False                    # the chunks are coded against a reference chunk
    bound: ErrorBound | None = None      # lossy: the bound every element keeps
    shorter_ref: bool = False            # the reference is shorter than the chunk (a grown tensor)

    def __str__(self) -> str:
        return self.name


def elf_case(name: str, dtype: str, spec: str, delta: bool = False) -> Case:
    bound = parse_error_bound(spec)
    code = CODE_DTYPE[ELF_DTYPES[dtype][0]]
    return Case(name, "elf", dtype, lambda _: [Elf(dtype, bound.mode, bound.value, delta),
                                               Planes(code, rotate=False), Rans()], delta, bound)


def xor_case(name: str, dtype: str, shorter_ref: bool = False, **kw: Any) -> Case:
    return Case(name, "xor", dtype, lambda nref: [Xor(dtype, H, nref, **kw), Planes(dtype), Rans()], True,
                shorter_ref=shorter_ref)


XOR_DTYPES = [d for d in dtypes.DTYPES if dtypes.get(d).itemsize in (1, 2, 4, 8)]
CASES = [
    *(Case(f"planes-{d}", "planes", d, lambda _, d=d: [Planes(d), Rans()]) for d in dtypes.DTYPES),
    Case("planes-F32-unrotated", "planes", "F32", lambda _: [Planes("F32", rotate=False), Rans()]),
    *(Case(f"rans-{lanes}-{bits}", "rans", "BF16", lambda _, lanes=lanes, bits=bits: [Planes("BF16"), Rans(lanes, bits)])
      for lanes, bits in ((1, 1), (5, 9), (32, 12), (4096, 12))),
    *(Case(f"zstd-{level}", "zstd", "F32", lambda _, level=level: [Zstd(level)]) for level in (-5, 3, 19)),
    Case("zstd-after-rans", "zstd", "I16", lambda _: [Planes("I16"), Rans(), Zstd(3)]),
    *(xor_case(f"xor-full-{d}", d) for d in XOR_DTYPES),
    xor_case("xor-masked-BF16", "BF16", mask=0xFF00),
    xor_case("xor-sparse-F32", "F32", sparse=True),
    xor_case("xor-masked-sparse-I64", "I64", mask=0xFFFF_FFFF_0000_0000, sparse=True),
    *(xor_case(f"xor-remap-{d}", d, remap=[[0x79, [0x79, 0x78]], [0x3F, [0x3F, 0x40, 0x3E]]])
      for d in ("F16", "BF16", "F32", "F64")),
    xor_case("xor-shorter-ref-F32", "F32", shorter_ref=True),
    *(elf_case(f"elf-abs-{d}", d, "1e-3") for d in ELF_DTYPES),
    *(elf_case(f"elf-rel-{d}", d, "rel:2^-6") for d in ELF_DTYPES),
    elf_case("elf-exact-F32", "F32", "2^-60"),
    *(elf_case(f"elf-delta-{d}", d, "1e-3", delta=True) for d in ("BF16", "F32")),
]


def raw_input(dtype: str, n: int, seed: int) -> np.ndarray:
    """``n`` elements: N(0, 0.3) weights salted with the special values for floats, random bytes
    for the rest."""
    rng = np.random.default_rng(seed)
    d = dtypes.get(dtype)
    if not d.is_float or d.itemsize == 1:
        return rng.integers(0, 256, n * d.itemsize, dtype=np.uint8)
    raw = (rng.standard_normal(n) * 0.3).astype(dtypes.numpy_dtype(dtype)).view(np.uint8).copy()
    words = raw.view(WORD[d.itemsize])
    sp = np.array(SPECIAL[d.itemsize], dtype=words.dtype)
    at = rng.choice(n, size=min(n, sp.size), replace=False) if n else np.zeros(0, np.int64)
    words[at] = sp[: at.size]
    return raw


def reference(case: Case, raw: np.ndarray, seed: int) -> np.ndarray | None:
    """A reference chunk: ``raw`` with a third of its bytes' low bits flipped (a fine-tune's base),
    or its first two thirds (a base tensor smaller than the chunk's)."""
    if not case.ref:
        return None
    w = dtypes.get(case.dtype).itemsize
    if case.shorter_ref:
        return raw[: raw.size // w * 2 // 3 * w].copy()
    rng = np.random.default_rng(seed)
    return raw ^ np.where(rng.random(raw.size) < 0.3, rng.integers(0, 4, raw.size), 0).astype(np.uint8)


def check_roundtrip(case: Case, raw: np.ndarray, ref: np.ndarray | None) -> bytes:
    """Encode, check each stage's output against the sizes the pipeline allows it, decode from the
    config into a poisoned buffer, and compare (lossless) or check the bound (lossy)."""
    pipeline = Pipeline(case.build(0 if ref is None else ref.size))
    payload = pipeline.encode(raw, ref)
    sizes = pipeline.expected(raw.size)
    data: Any = raw
    for i, codec in enumerate(pipeline.codecs[:-1]):
        data = codec.encode(data, ref if codec.needs_ref else None)
        if data is None:  # the chunk needs no payload: nothing after it runs
            assert payload == b""
            break
        arr = np.asarray(data)
        want = sizes[i + 1]
        assert want.lo <= arr.nbytes <= want.hi, f"{codec.codec_id} gave {arr.nbytes} bytes, allowed {want}"
        assert want.planes == (arr.shape[0] if arr.ndim == 2 else 0)
    out = np.full(raw.size, 0xA5, np.uint8)  # every byte must be written
    Pipeline.from_config(pipeline.get_config()).decode(np.frombuffer(payload, np.uint8), out, ref)
    if case.bound is None:
        assert np.array_equal(out, raw)
    else:
        assert_within(case.dtype, case.bound, raw, out)
    return payload


def test_every_registered_codec_is_covered() -> None:
    registered = set(codecs())
    assert registered == {"elf", "planes", "rans", "xor", "zstd"}
    assert registered == {c.codec_id for c in CASES}
    assert registered == {cfg["id"] for rec in GOLDEN for cfg in rec["pipeline"]}


@pytest.mark.parametrize("codec_id", sorted(codecs()))
def test_a_codec_declares_one_kind(codec_id: str) -> None:
    kinds = (ArrayArrayCodec, ArrayPlanesCodec, PlanesBytesCodec, BytesBytesCodec)
    assert sum(issubclass(codecs()[codec_id], k) for k in kinds) == 1


@pytest.mark.parametrize("case", CASES, ids=str)
def test_config_round_trip(case: Case) -> None:
    pipeline = Pipeline(case.build(96))
    for codec in pipeline.codecs:
        config = codec.get_config()
        again = codec_from_config(json.loads(json.dumps(config)))
        assert again == codec and type(again) is type(codec)
        assert list(again.get_config().items()) == list(config.items())  # keys in the same order
        assert type(codec).from_config(config) == codec
    assert Pipeline.from_config(json.loads(json.dumps(pipeline.get_config()))).get_config() == pipeline.get_config()


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_roundtrip_of_any_length(case: Case, n: int) -> None:
    raw = raw_input(case.dtype, n, n)
    check_roundtrip(case, raw, reference(case, raw, n + 1))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_special_values(case: Case) -> None:
    """Every special bit pattern of the dtype, twice, in an odd count: NaNs with payloads, +-inf,
    +-0, the smallest and largest subnormals, the largest finite values (for integers: 0, the
    extremes and all-ones words)."""
    w = dtypes.get(case.dtype).itemsize
    if case.dtype in ELF_DTYPES:
        words = special_bits(case.dtype)
    elif w in SPECIAL and dtypes.get(case.dtype).is_float:
        words = np.array(SPECIAL[w], dtype=WORD[w])
    else:
        words = np.array([0, 1, 0x7F, 0x80, 0xFF], dtype=np.uint8).repeat(w)
    raw = np.concatenate([words.view(np.uint8)] * 2 + [words.view(np.uint8)[:w]])
    check_roundtrip(case, raw, reference(case, raw, 5))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_largest_chunk_and_its_odd_neighbour(case: Case) -> None:
    """The encoder's tensor chunk (256 KiB), and one element less (a tensor's last chunk)."""
    w = dtypes.get(case.dtype).itemsize
    full = TENSOR_CHUNK_BYTES // w
    for n in (full, full - 1):
        raw = raw_input(case.dtype, n, 7)
        check_roundtrip(case, raw, reference(case, raw, 8))


@pytest.mark.parametrize("record", GOLDEN, ids=lambda r: r["name"])
def test_golden_payloads_decode_and_encode_bit_for_bit(record: dict[str, Any]) -> None:
    raw = np.frombuffer(base64.b64decode(record["input"]), np.uint8)
    ref = np.frombuffer(base64.b64decode(record["ref"]), np.uint8) if "ref" in record else None
    payload = base64.b64decode(record["payload"])
    pipeline = Pipeline.from_config(record["pipeline"])
    assert pipeline.get_config() == record["pipeline"]
    out = np.full(raw.size, 0xA5, np.uint8)
    pipeline.decode(np.frombuffer(payload, np.uint8), out, ref)
    decoded = base64.b64decode(record.get("decoded", record["input"]))
    assert out.tobytes() == decoded
    first = pipeline.codecs[0]
    if isinstance(first, Elf):  # lossy: the bound holds on every element, checked apart from the codec
        assert_within(first.dtype, ErrorBound(first.mode, first.bound, record["name"]), raw, out)
    assert pipeline.encode(raw, ref) == payload


def test_the_pipeline_checks_kinds_and_codecs_check_their_place() -> None:
    planes, rans, zstd = Planes("F32"), Rans(), Zstd()
    xor = Xor("F32", H, 400)
    for codecs_ in ([rans], [planes], [zstd, planes, rans], [planes, planes, rans], [planes, zstd]):
        with pytest.raises(CodecError):
            Pipeline(codecs_)
    for first in (xor, Elf("F32", "abs", 1e-3, delta=True)):  # a reference lines up with the raw chunk only
        with pytest.raises(CodecError, match="against its reference"):
            Pipeline([Elf("F32", "abs", 1e-3), first, Planes("U32"), rans])
        with pytest.raises(CodecError, match="needs a reference chunk"):
            Pipeline([first, Planes("U32"), rans]).encode(np.zeros(400, np.uint8))
    for ok in ([], [zstd], [xor], [planes, rans, zstd], [xor, Elf("F32", "abs", 1e-3), Planes("U32"), rans]):
        assert Pipeline(ok).codecs == ok


def test_a_chunk_its_codec_leaves_without_payload() -> None:
    """xor of a chunk equal to its reference gives None: the payload is empty, and decoding it
    asks xor alone; a pipeline without such a codec reads an empty payload as a broken one."""
    ref = raw_input("F32", 100, 3)
    assert Xor("F32", H, ref.size).encode(ref.copy(), ref) is None
    assert Xor("F32", H, ref.size, sparse=True).encode(ref.copy(), ref) is None
    pipeline = Pipeline([Xor("F32", H, ref.size), Planes("F32"), Rans()])
    assert pipeline.encode(ref.copy(), ref) == b""
    out = np.zeros(ref.size, np.uint8)
    pipeline.decode(b"", out, ref)
    assert np.array_equal(out, ref)

    class Elides(ArrayArrayCodec):  # a filter that may leave a chunk without a payload, and needs no reference
        codec_id = "elides"
        optional_payload = True

        def encode(self, data: Any, ref: Any = None) -> Any:
            return data if data.any() else None

        def decode(self, data: Any, out: Any = None, ref: Any = None, *, expected: Any = None) -> Any:
            out[:] = 0 if data is None else data
            return out

        def encoded_size(self, decoded: Any) -> Any:
            return decoded

        def get_config(self) -> dict[str, Any]:
            return {"id": self.codec_id}

    elides = Pipeline([Elides(), Zstd()])
    assert elides.encode(np.zeros(64, np.uint8)) == b""
    out = np.ones(64, np.uint8)
    elides.decode(b"", out)  # zstd is not asked: an empty payload is no zstd frame
    assert not out.any()
    with pytest.raises(CorruptArchiveError):
        Pipeline([Zstd()]).decode(b"", out)
    with pytest.raises(CodecError, match="at most"):  # an empty payload would not say which left it
        Pipeline([Elides(), Elides(), Zstd()])
