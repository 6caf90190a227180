"""One writer at a time for the files a run makes once beside its data (denylist, webdataset index
files, the embedded demo dataset): every rank of a torchrun job, on every node, may find them
missing at the same moment."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from typing import Iterator, Optional

# errnos of a filesystem that has no working flock (some NFS mounts): run unlocked there; the
# writers write under unique temporary names and rename, so a collision costs duplicate work only
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


@contextlib.contextmanager
def exclusive(path: str, waiting: Optional[str] = None) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created, with its folder) for the block. Processes
    on one machine take turns; across machines only where the shared filesystem's locks work.
    `waiting`: printed to stderr when another process holds the lock, before waiting for it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:  # released when closed, also when the process dies
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
