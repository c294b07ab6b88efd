"""The model store: many models in one place, each unique tensor and file stored once, by
content, and fine-tunes coded as BitX deltas against their base (docs/FORMAT.md, "The model store").

    >>> from elves.store import Store
    >>> s = Store.init("hub.store")
    >>> s.add("llama-3-8b/")                       # standalone
    >>> s.add("my-finetune/")                      # base found by elves.families: stored as its delta
    >>> s.restore("my-finetune", "out/")          # bit-exact, checked against each file's sha256

The package, one concept a module: ``layout`` (where things lie, by key), ``storage`` (the I/O
interface and the local folder), ``objects`` (the object container), ``manifests`` (manifests
and profiles), ``planner`` (which base, which direction; BitX over store objects), ``ingest``
(coding segments into objects), ``reading`` (decoding them), ``maintenance`` (gc, stats,
repack), ``verify``, ``store`` (the :class:`Store` that ties them together) and ``batch``
(:func:`add_many`: many models at once, on a process pool or a Ray cluster).

Crash safety: objects and manifests are written under ``tmp/``, made durable and moved into
place, the manifest last; a writer killed at any point leaves only orphans, which :meth:`Store.gc`
deletes. Readers take no lock: every file they read is either absent or complete.
"""
from .layout import STORE_VERSION
from .reports import (
           AddResult,
           GcReport,
           ModelEntry,
           RepackReport,
           StoreProblem,
           StoreStats,
           StoreVerifyReport,
)
from .batch import add_many
from .store import Store, default_name

__all__ = ["STORE_VERSION", "AddResult", "GcReport", "ModelEntry", "RepackReport", "Store", "StoreProblem",
           "StoreStats", "StoreVerifyReport", "add_many", "default_name"]
