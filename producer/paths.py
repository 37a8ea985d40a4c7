"""Paths the user gives (the download directory, a manifest) and local mode's state directory, checked before a
job runs: a bad one is one `error:` line (exit 2), never a traceback after the work is done.

The state directory DIR/.fleetfetch/.server holds the embedded server's data (its AOF keeps request headers with
their tokens), and DIR may be shared with other users: it is reached from directory descriptors, one component
at a time, with O_NOFOLLOW and an owner check on each step, and created 0700, so a planted symlink cannot send
the data elsewhere and no other user can look inside.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from .errors import UsageError

STATE_PARTS = (".fleetfetch", ".server")  # under the download dir; a leading dot: no download is named so
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_download_dir(path: Path, create: bool) -> int:
    """A descriptor of the download directory (created when missing, with `create`). The directory itself is the
    user's choice and may be a symlink; FileNotFoundError if absent and not created."""
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return os.open(path, _DIR_FLAGS)
    except (NotADirectoryError, FileExistsError):
        raise UsageError(f"-d {path}: not a directory (give a directory to download into)") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UsageError(f"-d {path}: {exc.strerror} (give a directory you can write to)") from None


def open_state_dir(download_dir: Path, create: bool) -> int:
    """A descriptor of DIR/.fleetfetch/.server, mode 0700, every step a real directory of this user; created
    when missing with `create`, else FileNotFoundError when absent."""
    fd = open_download_dir(download_dir, create)
    shown = download_dir
    for part in STATE_PARTS:
        shown = shown / part
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UsageError(f"{shown} is a symlink or not a directory: remove it (local mode keeps its "
                                 "server's data there)") from None
            if exc.errno == errno.ENOENT:
                raise
            raise UsageError(f"{shown}: {exc.strerror}") from None
        finally:
            os.close(fd)
        fd = child
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            raise UsageError(f"{shown} belongs to another user: remove it, or use another --dir")
    os.fchmod(fd, 0o700)
    return fd


def check_manifest(path: Path | None) -> None:
    """Refuse, before the job runs, a --manifest that could not be written at its end: a missing directory, or
    something other than a regular file in its place (a symlink, a device such as /dev/null, a directory)."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise UsageError(f"--manifest {path}: directory {path.parent} does not exist")
    place = manifest_place(path)
    if place is not None:
        raise UsageError(f"--manifest {path}: {place}; give a regular file's path")


def manifest_place(path: Path) -> str | None:
    """What is wrong with writing a manifest in `path`'s place (None: nothing, or a regular file, is there)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return "is a device, a directory or a pipe, not a regular file"
    return None
