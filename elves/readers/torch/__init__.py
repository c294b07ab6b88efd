"""Read PyTorch checkpoints (``torch.save`` zips, TorchScript zips, the legacy pre-zip format)
without ever executing their pickles.

A checkpoint's pickle is a program: unpickling calls whatever globals it names, so ``torch.load``
on an untrusted file can run arbitrary code. elves has to read whatever model it is handed, so its
unpickler (:class:`_SafeUnpickler`) imports nothing and answers every global with something of
ours: tensor "rebuilders" that only record where a tensor's elements lie, plain containers, or an
inert :class:`_Stub` for anything else. That is enough to learn each storage's dtype and to cut the
file into segments: storage bytes become tensor segments (coded by the float codecs), everything
else (zip records, the pickles, code) stays opaque bytes. Restore writes the segments back, so the
file comes back byte for byte whatever its pickle references.
"""
from __future__ import annotations

from .reader import parse, read_state_dict

__all__ = ["parse", "read_state_dict"]
