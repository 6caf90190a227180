"""One writer at a time for the files a run makes once beside its data (denylist, webdataset index
files, the embedded demo dataset): every rank of a torchrun job, on every node, may find them
missing at the same moment."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import threading
from typing import Iterator, Optional

# errnos of a filesystem that has no working flock (some NFS mounts): run unlocked there; the
# writers write under unique temporary names and rename (write_atomic), and the embedded dataset
# keeps a finished copy, so a collision costs duplicate work only
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


@contextlib.contextmanager
def exclusive(path: str, waiting: Optional[str] = None) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created, with its folder) for the block. Processes
    on one machine take turns; across machines only where the shared filesystem's locks work.
    `waiting`: printed to stderr when another process holds the lock, before waiting for it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:  # read-write (NFS's lock emulation needs it), created group/world-writable as umask allows
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared folder: a local flock needs no write
        fd = os.open(path, os.O_RDONLY)
    try:  # released when the fd is closed, also when the process dies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Write `text` to a temporary file of a name unique to this host, process and thread beside
    `path`, then rename it over `path`: readers see the old file or the new one, never part of one,
    and concurrent writers never share a temporary file (a fixed name shared by every rank writing
    the same webdataset index let one rank's rename take another's file mid-write:
    FileNotFoundError). Not mkstemp: its files are 0600, and a shared dataset's files must stay
    readable to its other users (the umask applies)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
