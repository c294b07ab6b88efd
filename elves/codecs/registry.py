"""Every codec an archive may name, by id: elves' own, listed here, and those that other packages
declare in the ``elves.codecs`` entry point group (BitX's ``xor``, in pyproject.toml), as numcodecs
and zarr find the codecs of other packages. Nothing registers itself on import, and this layer
imports nothing of the packages above it."""
from __future__ import annotations

import functools
from importlib.metadata import entry_points

from ..errors import CodecError
from .base import Codec, Config
from .elf import Elf
from .planes import Planes
from .rans import Rans
from .zstd import Zstd

GROUP = "elves.codecs"
OWN: tuple[type[Codec], ...] = (Planes, Rans, Zstd, Elf)


@functools.cache
def codecs() -> dict[str, type[Codec]]:
    """The codec classes by ``codec_id``; the entry points are loaded on the first call."""
    table = {cls.codec_id: cls for cls in OWN}
    for point in entry_points(group=GROUP):
        cls = point.load()
        if not (isinstance(cls, type) and issubclass(cls, Codec)) or cls.codec_id != point.name or point.name in table:
            raise CodecError(f"entry point {point.name} = {point.value} ({GROUP}) is not a codec of that id, "
                             f"or one of that id is known already")
        table[point.name] = cls
    return table


def codec_from_config(config: Config) -> Codec:
    if not isinstance(config, dict):
        raise CodecError(f"a codec config must be an object, not {type(config).__name__}")
    codec_id = config.get("id")
    known = codecs()
    if not isinstance(codec_id, str) or codec_id not in known:
        raise CodecError(f"unknown codec {codec_id!r}; this elves knows {sorted(known)}")
    return known[codec_id].from_config(config)
