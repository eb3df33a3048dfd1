"""Small file-system helpers for commit points: fsync, leftovers of killed processes, and
checking that an output path can be written before any work is done."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from icrt.errors import UserError

log = logging.getLogger(__name__)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a directory entry to disk (a no-op for a path that does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write to the yielded temporary path; on success it replaces ``path`` in one rename
    (fsynced), so readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished directory ``tmp`` at ``path``, replacing what is there: the old one is
    renamed aside first and removed only after the new one is in place (fsynced)."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder: str | os.PathLike, pattern: str, what: str) -> list[Path]:
    """Delete entries of ``folder`` matching ``pattern`` (a regex with a ``pid`` group) whose
    process is gone: the temporary directories of interrupted writers."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    regex = re.compile(pattern)
    removed = []
    for p in folder.iterdir():
        m = regex.match(p.name)
        if m and not pid_alive(int(m.group("pid"))):
            log.warning("removing '%s', left by an interrupted %s", p, what)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail now, in one sentence, if a results file could not be written at ``path`` later."""
    path = Path(path)
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} '{path}' cannot be written: '{parent}' is a file.")
            break
    if path.is_dir():
        raise UserError(f"{flag} '{path}' is a directory; give a file name.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} '{path}' cannot be written: {e.strerror}.") from None
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Fail now if ``path`` cannot be used as an output directory (creating it)."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{flag} '{path}' cannot be used: '{p}' is a file.")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} '{path}' cannot be written: {e.strerror}.") from None
    return path
