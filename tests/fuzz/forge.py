"""Forgers: what a hostile uploader does to a valid input. Every forger edits the structure (index
fields, trailer fields, manifest and header fields, payload bytes) and then RECOMPUTES every
checksum the format has, so that the forgery reaches the parser and the decoder instead of being
stopped at the first checksum.

A mutation is drawn as plain numbers (which node, which operation, which value) and resolved
against the seed when applied; ``describe`` returns the resolved form, which is the reproducer.
"""
from __future__ import annotations

import copy
import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import msgpack
import xxhash
import zstandard

from elves import dtypes
from elves.store.layout import ADDING, LOCK

HEADER = struct.Struct("<8sHHIQQQ")  # docs/FORMAT.md: magic, major, minor, flags, index offset, length, xxh3-64
FOOTER = struct.Struct("<QQ8s")      # store objects: trailer length, its xxh3-64, magic

INTS = [0, -1, 1, 2, 3, 7, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
        2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -2**31, -2**63]
ENUMS: dict[str, list[Any]] = {
    "dtype": list(dtypes.DTYPES) + ["F4", "F6_E2M3", "F6_E3M2", "X", "u32"],
    "kind": ["tensor", "bytes", "object"],
    "id": ["zstd", "planes", "rans", "xor", "elf", "lz4"],
    "format": ["safetensors", "torch-zip", "torch-legacy", "onnx", "opaque", "gguf", "elves-store-model"],
    "source": ["file", "folder", "stream"],
    "mode": ["abs", "rel", "exact"],
    "rotate": [True, False],
    "sparse": [True, False],
    "delta": [True, False],
    "lossy": [True, False],
    "path": ["x", "a/b", "config.json", ".", "./x", "a//b", "x" * 300],
}
WRONG = [None, "", "x", "0", [], [0], [[]], {}, {"a": 1}, 0.5, -1.5, float("nan"), float("inf"), True, False, b"\x00"]
TREE_OPS = ["set", "set", "set", "remove", "dup", "swap", "halve", "double", "copy"]
PAYLOAD_OPS = ["flip", "flip", "truncate", "extend", "splice", "zero", "field", "field", "bomb"]


def walk(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path below the root, containers and leaves, in a fixed order."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out.extend(walk(v, path + (k,)))
    return out


def get(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


def values_like(tree: Any, path: tuple, value: Any, json_only: bool) -> list[Any]:
    """Candidate replacements for the node at ``path``: boundary integers around it, other valid
    values of its field, the same field's values elsewhere in the tree, wrong types."""
    key = path[-1]
    cands: list[Any] = []
    if isinstance(value, int) and not isinstance(value, bool):
        cands += [value // 2, value * 2, value + 1, value - 1, -value] + INTS
    if isinstance(value, str) and len(value) in (32, 64):  # a hash: another one of the same shape
        cands += ["0" * len(value), value[::-1], value[:-1]]
    if isinstance(key, str):
        cands += ENUMS.get(key, [])
        cands += [get(tree, p) for p in walk(tree) if p[-1] == key and p != path][:8]
    cands += WRONG
    cands = [c for c in cands if not isinstance(c, int) or -2**63 <= c < 2**64]
    if json_only:
        cands = [c for c in cands if not isinstance(c, bytes)]
    return cands


def mutate_tree(tree: Any, sel: int, op: str, val: int, json_only: bool = False) -> dict[str, Any]:
    """Apply one drawn mutation to a decoded index, trailer, manifest or header in place; return
    its resolved description."""
    paths = walk(tree)
    if not paths:
        return {"op": "none"}
    path = paths[sel % len(paths)]
    parent, key = get(tree, path[:-1]), path[-1]
    value = parent[key]
    desc: dict[str, Any] = {"path": list(path), "op": op}
    if op in ("halve", "double", "dup", "swap") and not isinstance(parent, list) and isinstance(value, list):
        parent, key, value = value, None, None  # act on the list the path names
    if op == "remove":
        del parent[key]
    elif op == "dup" and isinstance(parent, list) and (key is not None or parent):
        i = key if key is not None else 0
        parent.insert(i, copy.deepcopy(parent[i]))
    elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
        i = key if key is not None else 0
        j = (i + 1 + val % (len(parent) - 1)) % len(parent)
        parent[i], parent[j] = parent[j], parent[i]
        desc["with"] = j
    elif op == "halve" and isinstance(parent, list) and key is None:
        del parent[len(parent) // 2:]
    elif op == "double" and isinstance(parent, list) and key is None:
        parent.extend(copy.deepcopy(parent))
    elif op == "copy":  # another node of the same shape: a chunk, pipeline or entry from elsewhere
        same = [p for p in paths if p != path and type(get(tree, p)) is type(value) and len(p) == len(path)]
        if same:
            src = same[val % len(same)]
            parent[key] = copy.deepcopy(get(tree, src))
            desc["from"] = list(src)
    elif key is None:
        desc["op"] = "none"
    else:
        cands = values_like(tree, path, value, json_only)
        parent[key] = copy.deepcopy(cands[val % len(cands)])
        desc["op"], desc["value"] = "set", repr(parent[key])[:80]
    return desc


def rans_fields(payload: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every header field of a ``rans`` chunk container, as far as
    the payload's own plane offsets locate them."""
    if len(payload) < 8:
        return []
    fields = [(0, "<I"), (4, "<H"), (6, "<B"), (7, "<B")]
    n_planes = payload[6]
    for p in range(min(n_planes, 16)):
        at = 8 + 4 * p
        if at + 4 > len(payload):
            break
        fields.append((at, "<I"))
        (start,) = struct.unpack_from("<I", payload, at)
        if start + 4 <= len(payload):  # mode, prob_bits, k of a rANS plane section
            fields += [(start, "<B"), (start + 1, "<B"), (start + 2, "<H")]
    return fields


_BOMB: bytes | None = None


def zstd_bomb() -> bytes:
    """A zstd frame of 1 GiB of zeros that declares its size: 32 KB on disk."""
    global _BOMB
    if _BOMB is None:
        _BOMB = zstandard.ZstdCompressor(level=1).compress(b"\0" * (1 << 30))
    return _BOMB


def mutate_payload(payloads: list[bytes], i: int, op: str, a: int, b: int) -> tuple[bytes, dict[str, Any]]:
    """A forged version of payload ``i`` (of all the container's ``payloads``) and its description."""
    p = payloads[i]
    desc: dict[str, Any] = {"payload": i, "op": op}
    if op == "flip" and p:
        pos = a % len(p)
        p = p[:pos] + bytes([p[pos] ^ (1 << (b % 8))]) + p[pos + 1:]
        desc.update(pos=pos, bit=b % 8)
    elif op == "truncate":
        p = p[:a % (len(p) + 1)]
        desc["length"] = len(p)
    elif op == "extend":
        p = p + bytes((a * k + b) & 0xFF for k in range(1 + a % 300))
        desc["length"] = len(p)
    elif op == "splice":
        other = payloads[a % len(payloads)]
        cut = b % (len(p) + 1)
        p = p[:cut] + other[cut:]
        desc.update(other=a % len(payloads), at=cut)
    elif op == "zero":
        p = bytes(len(p))
    elif op == "field" and rans_fields(p):
        fields = rans_fields(p)
        at, fmt = fields[a % len(fields)]
        width = struct.calcsize(fmt) * 8
        cands = [v & ((1 << width) - 1) for v in INTS] + [struct.unpack_from(fmt, p, at)[0] * 2 & ((1 << width) - 1)]
        v = cands[b % len(cands)]
        p = p[:at] + struct.pack(fmt, v) + p[at + struct.calcsize(fmt):]
        desc.update(at=at, value=v)
    elif op == "bomb":
        p = zstd_bomb()
    return p, desc


# ------------------------------------------------------------------------------- archives

def read_archive(data: bytes) -> tuple[list[Any], Any, bytes]:
    fields = list(HEADER.unpack_from(data))
    off, length = fields[4], fields[5]
    index = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data[off:off + length]), raw=False)
    return fields, index, data[:off]


def chunk_lists(index: Any) -> list[list[Any]]:
    """The chunk entries ([offset, length, decoded, xxh3]) that still look like chunk entries."""
    out = []
    for s in index.get("streams", []) if isinstance(index, dict) and isinstance(index.get("streams"), list) else []:
        if isinstance(s, dict) and isinstance(s.get("chunks"), list):
            out += [c for c in s["chunks"] if isinstance(c, list) and len(c) == 4
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in c[:2])]
    return out


def write_archive(fields: list[Any], index: Any, data: bytes) -> bytes:
    """The archive with every chunk checksum, the index checksum and the header checksum recomputed."""
    for c in chunk_lists(index):
        if 0 <= c[0] and 0 <= c[1] and c[0] + c[1] <= len(data):
            c[3] = xxhash.xxh3_64_intdigest(data[c[0]:c[0] + c[1]])
    blob = zstandard.ZstdCompressor().compress(msgpack.packb(index, use_bin_type=True))
    fields = fields[:4] + [len(data), len(blob), xxhash.xxh3_64_intdigest(blob)]
    return header(fields) + data[HEADER.size + 8:] + blob


def header(fields: list[Any]) -> bytes:
    head = HEADER.pack(*fields)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))


def forge_archive(data: bytes, muts: list[tuple]) -> tuple[bytes, list[dict[str, Any]]]:
    fields, index, region = read_archive(data)
    descs, header_muts = [], []
    for target, sel, op, a, b in muts:
        if target == "index":
            descs.append({"target": "index", **mutate_tree(index, sel, TREE_OPS[op % len(TREE_OPS)], a)})
        elif target == "payload":
            chunks = chunk_lists(index)
            if not chunks:
                continue
            i = sel % len(chunks)
            payloads = [region[x[0]:x[0] + x[1]] for x in chunks]
            new, desc = mutate_payload(payloads, i, PAYLOAD_OPS[op % len(PAYLOAD_OPS)], a, b)
            chunks[i][0], chunks[i][1] = len(region), len(new)  # appended after the data, as a forger would
            region += new
            descs.append({"target": "payload", "chunk": i, **desc})
        else:
            header_muts.append((sel, a))
    out = write_archive(fields, index, region)
    for sel, a in header_muts:  # after the rest, so that the forged header field stays as forged
        f = list(HEADER.unpack_from(out))
        k = 1 + sel % 6
        cands = [v for v in INTS if 0 <= v < 2 ** (16 if k < 3 else 32 if k == 3 else 64)]
        f[k] = cands[a % len(cands)] if k != 3 else f[k] ^ (1 << (a % 32))
        out = header(f) + out[HEADER.size + 8:]
        descs.append({"target": "header", "field": ["major", "minor", "flags", "index_offset", "index_len",
                                                    "index_hash"][k - 1], "value": f[k]})
    return out, descs


# ---------------------------------------------------------------------------------- store

def forge_object(data: bytes, muts: list[tuple]) -> tuple[bytes, list[dict[str, Any]]]:
    tlen = FOOTER.unpack(data[-FOOTER.size:])[0]
    start = len(data) - FOOTER.size - tlen
    trailer = msgpack.unpackb(data[start:len(data) - FOOTER.size], raw=False)
    pos, payloads = 0, []
    for c in trailer["chunks"]:
        payloads.append(data[pos:pos + c[0]])
        pos += c[0]
    descs = []
    for target, sel, op, a, b in muts:
        if target == "payload" and payloads:
            i = sel % len(payloads)
            payloads[i], desc = mutate_payload(payloads, i, PAYLOAD_OPS[op % len(PAYLOAD_OPS)], a, b)
            descs.append({"target": "object payload", **desc})
        else:
            descs.append({"target": "trailer", **mutate_tree(trailer, sel, TREE_OPS[op % len(TREE_OPS)], a)})
    chunks = trailer.get("chunks") if isinstance(trailer, dict) else None
    if isinstance(chunks, list) and len(chunks) == len(payloads):
        for c, p in zip(chunks, payloads):
            if isinstance(c, list) and len(c) == 3:
                c[2] = xxhash.xxh3_64_intdigest(p)
    body = b"".join(payloads)
    blob = msgpack.packb(trailer, use_bin_type=True)
    return body + blob + FOOTER.pack(len(blob), xxhash.xxh3_64_intdigest(blob), data[-8:]), descs


def forge_store(store: Path, muts: list[tuple]) -> list[dict[str, Any]]:
    """Forge one file of the store at ``store`` (a copy) in place: an object or a manifest."""
    # the lock files are empty and read by nobody: a forger gains nothing there
    targets = sorted(p for p in store.rglob("*") if p.is_file() and p.parent.name != "tmp"
                     and p.name not in (LOCK, ADDING) and p.parent.name != "profiles")
    target = targets[muts[0][1] % len(targets)]
    rel = target.relative_to(store).as_posix()
    if target.suffix == ".json":
        doc = json.loads(target.read_text())
        descs = [mutate_tree(doc, sel, TREE_OPS[op % len(TREE_OPS)], a, json_only=True) for _, sel, op, a, _ in muts]
        target.write_text(json.dumps(doc))
    else:
        data, descs = forge_object(target.read_bytes(), muts)
        target.write_bytes(data)
    return [{"file": rel, **d} for d in descs]


# ------------------------------------------------------------------------- model files

def forge_safetensors(data: bytes, muts: list[tuple]) -> tuple[bytes, list[dict[str, Any]]]:
    (n,) = struct.unpack_from("<Q", data)
    head, body = json.loads(data[8:8 + n]), data[8 + n:]
    descs, prefix, nest = [], None, False
    for target, sel, op, a, b in muts:
        if target == "nest":
            nest = True
            descs.append({"target": "header", "op": "100k nested ["})
        elif target == "payload":
            body, desc = mutate_payload([body], 0, PAYLOAD_OPS[op % len(PAYLOAD_OPS)], a, b)
            descs.append({"target": "data", **desc})
        elif target == "header":
            prefix = [v for v in INTS if v >= 0][a % 20]
            descs.append({"target": "header length", "value": prefix})
        else:
            descs.append({"target": "header", **mutate_tree(head, sel, TREE_OPS[op % len(TREE_OPS)], a, True)})
    blob = b"[" * 100_000 if nest else json.dumps(head).encode()
    return struct.pack("<Q", len(blob) if prefix is None else prefix) + blob + body, descs


def forge_zip(path: Path, muts: list[tuple]) -> list[dict[str, Any]]:
    """Forge the members of a zip checkpoint; the zip is rewritten so that its CRCs hold."""
    with zipfile.ZipFile(path) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    descs = []
    for _, sel, op, a, b in muts:
        k = sel % len(members)
        info, data = members[k]
        data, desc = mutate_payload([data], 0, PAYLOAD_OPS[op % len(PAYLOAD_OPS)], a, b)
        members[k] = (info, data)
        descs.append({"target": "zip member", "member": info.filename, **desc})
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        for info, data in members:
            z.writestr(info, data)
    shutil.move(tmp, path)
    return descs


def forge(kind: str, path: Path, muts: list[tuple]) -> list[dict[str, Any]]:
    """Forge the input at ``path`` (a copy of a seed) in place; the resolved mutations."""
    if kind == "store":
        return forge_store(path, muts)
    if kind == "archive":
        data, descs = forge_archive(path.read_bytes(), muts)
    elif zipfile.is_zipfile(path):
        return forge_zip(path, muts)
    else:
        data, descs = forge_safetensors(path.read_bytes(), muts)
    path.write_bytes(data)
    return descs

