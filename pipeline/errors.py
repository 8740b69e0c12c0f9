"""The one exception type the CLI turns into a one-line message (no traceback), what counts as bad input, and
which operating-system errors are the environment's fault (a full or read-only disk), also one line."""
import errno
import os
import re
import shutil


class NpsError(Exception):
    """Bad input or an unsatisfiable request: the message names the input and what to do.

    Never raise it for a broken internal invariant: that is a bug, and a bug shows its traceback.
    """


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input, not a bug: the CLI prints them as one line (exit status 2)."""
    from nps.datasets.errors import DatasetError
    from nps.kernels.errors import SamplerError

    return (NpsError, SamplerError, DatasetError)


# errno values that say the environment cannot hold what nps writes: the user's to fix, never an nps bug
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                                errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG})
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent), None if unknown."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or of an h5py error whose message carries HDF5's ``errno = N``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, (OSError, RuntimeError)):
        found = re.search(r"errno = (\d+)", str(exc))
        if found:
            return int(found.group(1))
    return None


def _h5_filename(exc: BaseException) -> str | None:
    found = re.search(r"(?:file)?name = '([^']+)'", str(exc))
    return found.group(1) if found else None


def environment_error(exc: BaseException, path: str | None = None) -> str | None:
    """One line for an error the environment caused (a full, read-only or forbidden filesystem), naming the path;
    None for any other error (a bug keeps its traceback)."""
    code = _errno_of(exc)
    if code not in ENVIRONMENT_ERRNOS:
        return None
    path = path or getattr(exc, "filename", None) or _h5_filename(exc)
    reason = os.strerror(code)
    where = f"cannot write {path}" if path else "cannot write a file"
    if code in DISK_FULL:
        free = free_bytes(path) if path else None
        room = f" ({free / 2**20:,.1f} MiB free there)" if free is not None else ""
        return f"{where}: {reason}{room}; free some space (or choose another --out), then run the same command"
    return f"{where}: {reason}; choose a writable place (--out)"
