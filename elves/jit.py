"""Lazily compiled numba kernels: ``@kernel("(uint8[::1], int64)")`` in place of ``@njit``.

Importing numba costs a quarter of a second and compiling a kernel up to seconds, so neither may
happen before a kernel is called: ``elves --help`` or ``elves ls`` never import numba, and a
compress compiles only the kernels its data reaches. A signature is the tuple of argument types
(numba's type names; ``ro(t)`` is the read-only array ``t``, which takes writable arrays too; the
return type is inferred). Each kernel compiles for its declared signatures only, once (``cache=True``
keeps the machine code on disk): arguments are converted to a declared signature, as a C call's
are, instead of compiling a specialisation per argument type. A kernel whose arguments come in
several word types lists one signature per type, and compiles each the first time it meets it.

Kernels that call each other refer to each other by module global, as numba requires: when a
kernel is first built, the kernels it names are built first and its module's globals are pointed
at their numba dispatchers, so the compiled caller links them with their own signatures.
``inline="always"`` kernels are never compiled alone; numba inlines them into their callers (at
the cost of typing their body again in each: a plain kernel, which LLVM inlines, compiles faster).
A kernel that numba cannot compile from Python, an LLVM-IR intrinsic say, is declared with
:func:`intrinsic`, and is linked into its callers in the same way.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

# numba's compiler is single-threaded anyway (it holds a global lock); one re-entrant lock makes
# building a kernel and its callees atomic for the pipeline's worker threads (see _building).
_LOCK = threading.RLock()
_OPTIONS = {"cache": True, "nogil": True}
# A kernel that only kernels call needs no wrappers for Python or C callers: without them a small
# kernel compiles in half the time.
_INTERNAL = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}


class Kernel:
    """A numba kernel not yet compiled; calling it compiles it (or loads it from the cache)."""

    def __init__(self, py_func: Callable[..., Any], sigs: tuple[str, ...], options: dict[str, Any]):
        self.py_func = py_func
        self.sigs = sigs
        self.internal = bool(options.pop("internal", False))
        self.options = {**_OPTIONS, **options, **(_INTERNAL if self.internal else {})}
        self.inline = options.get("inline") == "always"
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func
        self._dispatcher: Any = None
        self._parsed: list[tuple[Any, ...]] = []
        # _key() of an argument tuple -> the compiled entry point of the signature it converts to
        self._entries: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"<kernel {self.py_func.__module__}.{self.__qualname__}>"

    def __call__(self, *args: Any) -> Any:
        if self.internal:
            raise TypeError(f"{self!r} is internal: only compiled kernels call it")
        d = self.dispatcher()
        if len(self._parsed) > 1:
            # The signature's own entry point, not the dispatcher: while another thread compiles
            # a further signature, the dispatcher accepts only exact argument types, and a call
            # that needs a conversion (a writable array for a read-only one) tries to compile.
            key = tuple(_key(a) for a in args)
            entry = self._entries.get(key) or self._compile_for(args, key)
            return entry(*args)
        return d(*args)

    def linked(self) -> Any:
        """What a compiled kernel that names this one is linked against: the dispatcher, with
        every signature compiled unless numba inlines it."""
        return self.dispatcher() if self.inline else self.compiled()

    def dispatcher(self) -> Any:
        """The numba dispatcher, built on first use with the single signature compiled (every
        signature for a kernel called from compiled code, which cannot pick one at run time)."""
        if self._dispatcher is None:
            with _building(), _claimed(self):
                if self._dispatcher is None:
                    self._dispatcher = self._build()
        return self._dispatcher

    def compiled(self) -> Any:
        """The dispatcher with every declared signature compiled."""
        with _building():
            d = self.dispatcher()
            missing = [sig for sig in self._parsed if sig not in d.overloads]
            if missing:
                with _claimed(self):  # the other signatures too: another process may build them
                    for sig in missing:
                        _compile(d, sig)
        return d

    def _build(self) -> Any:
        from numba import njit

        _listen()
        glb = self.py_func.__globals__
        for name in self.py_func.__code__.co_names:
            callee = glb.get(name)
            if isinstance(callee, Kernel):
                glb[name] = callee.linked()
        d = njit(**self.options)(self.py_func)
        if self.inline:
            return d
        self._parsed = [_parse(sig) for sig in self.sigs]
        if len(self._parsed) == 1:
            _compile(d, self._parsed[0])
            if not self.internal:
                glb[self.__name__] = d  # from here on callers reach numba directly
        return d

    def _compile_for(self, args: tuple[Any, ...], key: tuple[Any, ...]) -> Callable[..., Any]:
        """The entry point of the declared signature that ``args`` convert to (compiled now, or
        loaded from the cache, if it is not yet), remembered under ``key``: numba.typeof takes
        microseconds an array, 15 us a call of four, and the kernels run per chunk."""
        import numba

        typeof: Callable[[Any], Any] = numba.typeof  # untyped in numba
        types = tuple(typeof(a) for a in args)
        d = self._dispatcher
        convert = d.typingctx.can_convert
        for sig in self._parsed:
            if len(sig) == len(types) and all(convert(t, p) is not None for t, p in zip(types, sig)):
                if sig not in d.overloads:
                    with _building(), _claimed(self):
                        _compile(d, sig)
                entry: Callable[..., Any] = d.overloads[sig].entry_point
                self._entries[key] = entry
                return entry
        raise TypeError(f"{self!r} has no signature for the argument types {types}")


class _Intrinsic(Kernel):
    """See :func:`intrinsic`."""

    def __init__(self, build: Callable[[], Any]):
        super().__init__(build, (), {})

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"{self!r} is an intrinsic: only compiled kernels call it")

    def dispatcher(self) -> Any:
        with _building():
            if self._dispatcher is None:
                self._dispatcher = self.py_func()
        return self._dispatcher

    def compiled(self) -> Any:
        return self.dispatcher()


def intrinsic(build: Callable[[], Any]) -> Any:
    """Decorate ``build()``, which returns a callable that compiled kernels call but numba does
    not compile from Python (a ``numba.extending.intrinsic`` written in LLVM IR, a ``numba.njit``
    function made by a factory): the result stands for it under ``build``'s name. ``build`` runs
    once, when the first kernel that names it is built, so it may import numba and llvmlite; a
    caller is linked against what it returns. Python cannot call it."""
    return _Intrinsic(build)


def _key(a: Any) -> Any:
    """What numba's type of the argument ``a`` depends on, found cheaply: an array's dtype, rank,
    layout, and whether it is writable and aligned; another value's Python type."""
    flags = getattr(a, "flags", None)
    if flags is None:
        return type(a)
    return (type(a), a.dtype.str, a.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable, flags.aligned)


def warm(fn: Callable[..., Any]) -> None:
    """Compile every signature of the kernel ``fn`` now, or load them from numba's cache."""
    if not isinstance(fn, Kernel):
        raise TypeError(f"{fn!r} is not a kernel")
    fn.compiled()


@contextmanager
def _claimed(k: Kernel) -> Iterator[None]:
    """Build ``k`` holding a lock file shared by this user's processes that use the same numba
    cache: of two processes that need a kernel at once (a command and the background compile of
    cli/_common.py), one compiles it and the other waits, then loads it from the cache. Callers
    lock before their callees, so two processes cannot wait on each other."""
    import fcntl
    import hashlib
    import os
    import stat
    import tempfile

    key = f"{os.environ.get('NUMBA_CACHE_DIR', '')}|{k.py_func.__module__}.{k.__qualname__}"
    folder = os.path.join(tempfile.gettempdir(), f"elves-jit-{os.getuid()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        # the folder is in a shared /tmp: another user may have made it, or a link in its place
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError("not ours")
        fd = os.open(os.path.join(folder, hashlib.sha1(key.encode()).hexdigest()[:20]),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:  # no shared lock: at worst both processes compile
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compile(d: Any, sig: tuple[Any, ...]) -> None:
    if sig in d.overloads:
        return
    d.disable_compile(False)
    try:
        d.compile(sig)
    finally:
        if d.signatures:  # numba refuses to lock a dispatcher that has none (a failed first compile)
            d.disable_compile()


def _parse(sig: str) -> tuple[Any, ...]:
    from numba import types

    names: dict[str, Any] = dict(vars(types))
    names["ro"] = lambda t: t.copy(readonly=True)
    parsed = eval(sig, {"__builtins__": {}}, names)  # noqa: S307 - our own literal signatures
    return tuple(parsed)


def kernel(*sigs: str, words: tuple[str, ...] = (), **options: Any) -> Callable[[F], F]:
    """Decorate a numba kernel: ``sigs`` are its argument-type tuples (none for an
    ``inline="always"`` kernel); where ``words`` is given, ``W`` in them stands for each of those
    types in turn. ``internal=True`` says that only other kernels call it: it compiles faster, and
    calling it from Python raises TypeError. Other ``options`` go to ``numba.njit`` (``cache`` and
    ``nogil`` are on)."""
    if words:
        sigs = tuple(s.replace("W", w) for s in sigs for w in words)
    if not sigs and options.get("inline") != "always":
        raise TypeError("a kernel needs its signatures")

    def wrap(fn: F) -> F:
        return cast(F, Kernel(fn, sigs, options))
    return wrap


@contextmanager
def compiling(on_start: Callable[[], None], on_end: Callable[[], None]) -> Iterator[None]:
    """Within the block, ``on_start()`` when numba starts compiling kernels (a cache miss: the
    first run after an install or an upgrade) and ``on_end()`` when it is done with them all.
    Imports nothing: numba is loaded, and listened to, only once a kernel is built."""
    watcher = (on_start, on_end)
    _WATCHERS.append(watcher)
    try:
        yield
    finally:
        _WATCHERS.remove(watcher)


_WATCHERS: list[tuple[Callable[[], None], Callable[[], None]]] = []
_LISTENING: list[bool] = []
_DEPTH = [0]  # nested builds of kernels in progress (under _LOCK)
_COMPILING = [False]  # whether the watchers were told that numba compiles


@contextmanager
def _building() -> Iterator[None]:
    """Hold the lock while kernels are built; the watchers hear of a compile stage once per
    outermost build, which compiles a kernel's callees one by one before the kernel."""
    with _LOCK:
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                _stage(False)


def _stage(on: bool) -> None:
    if _COMPILING[0] != on:
        _COMPILING[0] = on
        for start, end in list(_WATCHERS):
            (start if on else end)()


def _listen() -> None:
    """Relay numba's compile events (cache misses) to the watchers."""
    if _LISTENING:
        return
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev: event.Event) -> None:
            _stage(True)

        def on_end(self, ev: event.Event) -> None:
            pass  # the stage ends with the outermost build

    register: Callable[[str, event.Listener], None] = event.register  # untyped in numba
    register("numba:compile", Listener())
    _LISTENING.append(True)
