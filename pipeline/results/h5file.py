"""An HDF5 file as nps opens it: checked before HDF5 reads it, with waits that end, and one writer at a time.

Why each piece exists:

- **A truncated file must not hang a reader.** HDF5's SWMR reader re-reads a metadata block whose checksum fails,
  sleeping 1, 2, 4 … ns in between, up to 100 times (so that a reader racing its writer sees the block once the
  writer has finished it); on a file cut short the checksum never matches, and the doubling sleeps add up to
  centuries, inside C code that Ctrl-C cannot interrupt. So :func:`check_file` compares the file's size with the
  end-of-file address its superblock records (HDF5 extends the file to that address on every flush, so a complete
  file is never shorter) before HDF5 opens it, and every read-only open caps the attempts at
  :data:`READ_ATTEMPTS` (HDF5's ``H5Pset_metadata_read_attempts``: at most about a second of retries per block).
- **A crashed writer's mark.** HDF5 marks a file "open for write" in its superblock while a writer has it; after a
  crash the mark stays and HDF5 refuses a normal open ("may use h5clear"). The writer, holding the writer lock,
  clears it (:func:`clear_consistency_flags`, what ``h5clear -s`` does); a reader opens such a file through a
  read-only view that shows the superblock without the mark (:class:`_UnmarkedView`), changing nothing on disk.
- **One writer per file**: an exclusive ``flock`` on the side file ``<path>.lock`` (:func:`writer_lock`), held by
  every command that writes or replaces a results file. The operating system drops it when its process dies (even
  by ``kill -9``), so a held lock always means a live writer.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import io
import logging
import os
import struct
import time
from dataclasses import dataclass

from nps.pipeline.errors import NpsError

log = logging.getLogger(__name__)

SIGNATURE = b"\x89HDF\r\n\x1a\n"
READ_ATTEMPTS = 30  # HDF5 sleeps 2^k ns after failed attempt k: 30 attempts wait at most ~1.1 s per metadata block
UNDEFINED = 0xFFFFFFFFFFFFFFFF


# --------------------------------------------------------------------------------------------------------------------
# The superblock.


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum HDF5 puts on version-2/3 superblocks."""
    m = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    i = 0
    while length > 12:
        x, y, z = struct.unpack_from("<III", data, i)
        a, b, c = (a + x) & m, (b + y) & m, (c + z) & m
        a = (a - c) & m; a ^= _rot(c, 4); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 6); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 8); b = (b + a) & m  # noqa: E702
        a = (a - c) & m; a ^= _rot(c, 16); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 19); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 4); b = (b + a) & m  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    x, y, z = struct.unpack("<III", data[i:] + bytes(12 - length))
    a, b, c = (a + x) & m, (b + y) & m, (c + z) & m
    c ^= b; c = (c - _rot(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & m  # noqa: E702
    return c


@dataclass(frozen=True)
class Superblock:
    """What nps reads of an HDF5 superblock at offset 0 (versions 0–3)."""

    version: int
    flags: int  # file consistency flags: non-zero while a writer has (or a crashed writer had) the file open
    end: int  # base address + end-of-file address: a complete file is at least this long
    checksum_at: int = -1  # versions 2/3: offset of the superblock checksum (the bytes before it are covered)


def read_superblock(head: bytes) -> Superblock | None:
    """The superblock in the first bytes of a file, or None when they are not an HDF5 superblock nps can read."""
    if len(head) < 16 or head[:8] != SIGNATURE:
        return None
    version = head[8]
    if version in (2, 3):
        size = head[9]
        fmt = {4: "<I", 8: "<Q"}.get(size)
        if fmt is None or len(head) < 12 + 4 * size + 4:
            return None
        base, eoa = struct.unpack_from(fmt, head, 12)[0], struct.unpack_from(fmt, head, 12 + 2 * size)[0]
        return Superblock(version, head[11], base + eoa, 12 + 4 * size)
    if version in (0, 1):
        size = head[13]
        fmt = {4: "<I", 8: "<Q"}.get(size)
        at = 24 + (4 if version == 1 else 0)
        if fmt is None or len(head) < at + 3 * size:
            return None
        flags = struct.unpack_from("<I", head, 20)[0]
        base, eoa = struct.unpack_from(fmt, head, at)[0], struct.unpack_from(fmt, head, at + 2 * size)[0]
        return Superblock(version, flags, base + eoa)
    return None


def _head(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(96)


def check_file(path: str, *, what: str = "results file", writer_alive=None) -> Superblock:
    """Check that ``path`` is a complete HDF5 file before HDF5 reads it; one NpsError line naming it if not.

    A file shorter than its superblock's end-of-file address is truncated (a partial copy, a full disk); while a
    live writer is extending it (``writer_alive()`` true) the check waits up to a second for the writer's flush to
    catch up before it says so.
    """
    if os.path.isdir(path):
        raise NpsError(f"{path} is a directory, not a {what}")
    deadline = time.monotonic() + 1.0
    while True:
        try:
            head, size = _head(path), os.path.getsize(path)
        except FileNotFoundError:
            raise NpsError(f"{path}: no such {what}") from None
        except PermissionError:
            raise NpsError(f"{path}: permission denied; nps needs to read the {what}") from None
        sb = read_superblock(head)
        if sb is None:
            kind = "empty" if size == 0 else "not an HDF5 file"
            raise NpsError(f"{path} is {kind}, not a {what} (nps run and nps sample write them)")
        if size >= sb.end:
            return sb
        if writer_alive is None or not writer_alive() or time.monotonic() >= deadline:
            raise NpsError(f"{path} is truncated: {size:,} bytes of the {sb.end:,} its header records (an "
                           "interrupted copy or a full disk?); restore a complete copy, or start again with "
                           "another --out")
        time.sleep(0.05)


def clear_consistency_flags(path: str) -> bool:
    """Zero the superblock's "open for write" flags left by a crashed writer; True if anything changed.

    Only call this when no process can be writing the file (the caller holds the writer lock).
    """
    sb = read_superblock(_head(path))
    if sb is None or sb.flags == 0 or sb.checksum_at < 0:
        return False
    with open(path, "r+b") as fh:
        head = bytearray(fh.read(sb.checksum_at + 4))
        if lookup3(bytes(head[:sb.checksum_at])) != struct.unpack_from("<I", head, sb.checksum_at)[0]:
            raise NpsError(f"{path}: superblock checksum does not match; the file is damaged, not just unclosed")
        head[11] = 0
        struct.pack_into("<I", head, sb.checksum_at, lookup3(bytes(head[:sb.checksum_at])))
        fh.seek(0)
        fh.write(bytes(head))
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("%s: cleared the write flags left by a writer that did not close the file", path)
    return True


class _UnmarkedView(io.RawIOBase):
    """A read-only view of a file whose superblock shows no "open for write" mark (checksum recomputed): how a
    reader opens a file a crashed writer left marked, without writing to it."""

    def __init__(self, path: str, sb: Superblock):
        self._fh = open(path, "rb")
        head = bytearray(self._fh.read(sb.checksum_at + 4))
        head[11] = 0
        struct.pack_into("<I", head, sb.checksum_at, lookup3(bytes(head[:sb.checksum_at])))
        self._head = bytes(head)
        self._fh.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer) -> int:
        at = self._fh.tell()
        n = self._fh.readinto(buffer)
        if n and at < len(self._head):
            view = memoryview(buffer).cast("B")
            stop = min(len(self._head), at + n)
            view[: stop - at] = self._head[at:stop]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


# --------------------------------------------------------------------------------------------------------------------
# Reading.


@functools.lru_cache(maxsize=1)
def _set_read_attempts():
    """HDF5's ``H5Pset_metadata_read_attempts`` from the library h5py loaded (h5py does not wrap it), or None."""
    import h5py  # noqa: F401 - loads the library

    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
            paths = {line.split()[-1] for line in fh if "libhdf5" in line and ".so" in line and "_hl" not in line}
        for path in sorted(paths):
            fn = getattr(ctypes.CDLL(path), "H5Pset_metadata_read_attempts", None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
                return fn
    except OSError:
        pass
    log.debug("H5Pset_metadata_read_attempts not found: SWMR reads keep HDF5's default attempts")
    return None


def _read_access():
    """File access properties of every read-only open: latest format, no file locks, bounded metadata retries."""
    from h5py import h5f, h5p

    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    fn = _set_read_attempts()
    if fn is not None:
        fn(fapl.id, READ_ATTEMPTS)
    return fapl


def open_readonly(path: str, *, what: str = "results file", retry_s: float = 5.0, writer_alive=None):
    """``(h5py.File, swmr)``: ``path`` opened read-only, also while its writer runs (SWMR) or after it crashed.

    Retries for ``retry_s`` while the file is open for a structural change (the writer is between SWMR sessions);
    every error is one NpsError line naming the file.
    """
    import h5py
    from h5py import h5f

    deadline = time.monotonic() + retry_s
    while True:
        sb = check_file(path, what=what, writer_alive=writer_alive)
        name = os.fsencode(path)
        error = None
        for flags in (h5f.ACC_RDONLY | h5f.ACC_SWMR_READ, h5f.ACC_RDONLY):
            try:
                return h5py.File(h5f.open(name, flags, fapl=_read_access())), flags != h5f.ACC_RDONLY
            except OSError as exc:
                error = exc
        alive = writer_alive() if writer_alive is not None else False
        if sb.flags and not alive and sb.checksum_at >= 0:
            # a crashed writer's mark: read through a view without it
            try:
                return h5py.File(_UnmarkedView(path, sb), "r"), False
            except OSError as exc:
                error = exc
        if time.monotonic() >= deadline or not (sb.flags and alive):
            first = str(error).splitlines()[0] if error is not None else "?"
            raise NpsError(f"{path}: cannot open the {what} for reading ({first}); "
                           + ("its writer keeps it busy, retry" if alive else "the file is damaged"))
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------------------------
# The writer lock.


def _lock_path(path: str) -> str:
    return f"{path}.lock"


def acquire_writer_lock(path: str, *, what: str = "results file") -> int:
    """The writer lock of ``path`` (an fd to release with :func:`release_writer_lock`); one NpsError line naming the
    process that holds it, or why the lock file cannot be made."""
    lock = _lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise NpsError(f"cannot write {path}: {os.strerror(exc.errno or errno.EIO)} ({lock}); choose a "
                           "writable place for it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NpsError(f"{path} is being written by another process (pid {holder}); one writer per {what}: "
                           "wait for it to finish, or choose another output") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the lock file is still the one at the path (a holder removes it only while holding it)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass  # the pid is only a courtesy for the error message above
    return fd


def release_writer_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def writer_lock(path: str, *, what: str = "results file"):
    """Hold the writer lock of ``path`` for the ``with`` block; a lock file this call created is removed again
    (while still held, so no other process can hold a lock on a file that is gone)."""
    created = not os.path.exists(_lock_path(path))
    fd = acquire_writer_lock(path, what=what)
    try:
        yield fd
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.unlink(_lock_path(path))
        release_writer_lock(fd)


def writer_pid(path: str) -> int | None:
    """The pid of the process holding the writer lock of ``path``, else None.

    Read from /proc/locks, so nothing is locked, not even briefly (a writer starting meanwhile is never refused).
    """
    try:
        st = os.stat(_lock_path(path))
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            table = fh.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (blocked waiters carry a "->" field first)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5].lower() == want:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None
