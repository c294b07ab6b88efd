"""The Hugging Face Hub mirror: Hub repos pulled into a store, exported as plain folders or as
the Hub's own cache, and served through the Hub's download API.

    >>> from elves.store import Store
    >>> from elves import mirror
    >>> store = Store("hub.store")
    >>> mirror.pull(store, "sentence-transformers/all-MiniLM-L6-v2")     # HF_ENDPOINT, HF_TOKEN honoured
    >>> mirror.update(store)                                            # follow every tracked revision

Modules, one concept each: ``records`` (what the mirror keeps of each repo, in the store),
``hub`` (the upstream Hub, through huggingface_hub), ``pull`` (pull, update, remove),
``inventory`` (what it holds and what that costs), ``export`` (a folder, or the huggingface_hub
cache) and ``server`` (the Hub's download API; needs the ``hub`` extra's starlette and uvicorn).
"""
from .export import ExportResult, export
from .pull import PullProgress, PullResult, UpdateResult, pull, pull_many, remove, update
from .records import RemoteFile, RepoRecord, Snapshot, repos, snapshot

__all__ = ["ExportResult", "PullProgress", "PullResult", "RemoteFile", "RepoRecord", "Snapshot", "UpdateResult", "export", "pull",
           "pull_many", "remove", "repos", "snapshot", "update"]


def __getattr__(name: str) -> object:
    # the server needs starlette (the ``hub`` extra): imported when asked for, not with the package
    if name in ("app", "serve"):
        from . import server
        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
