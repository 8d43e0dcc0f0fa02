"""Build-once directories in a cache shared by processes (ranks, DataLoader workers, jobs).

`build_once` makes `final` exist exactly as `build` writes it: the first process to take the
lock file builds into a private temporary folder and renames it into place (atomic on one file
system), the others wait on the lock and then find the finished folder. The rename alone is what
makes it correct: where the lock does nothing (a file system without flock, ranks on different
machines), each process builds the same bytes and the first rename wins.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def build_once(final: Path, build: Callable[[Path], None], *, what: str) -> Path:
    """Return `final`, calling `build(tmp_dir)` to create it if it does not exist yet."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+") as lock:
        start = time.monotonic()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to build %s (%s)", what, final)
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("%s ready after %.1f s", what, time.monotonic() - start)
        except OSError:
            pass  # no flock on this file system: the atomic rename below still makes it correct
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp made it private; the cache is shared
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
