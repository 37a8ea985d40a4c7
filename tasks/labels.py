"""What is known of a downloaded file from an earlier run (its validators: the URL's digest, size, SHA-256, ETag,
Last-Modified, inode and mtime), kept on the file itself as an extended attribute or, where the file system has
none, in a sidecar `.fleetfetch/NAME.json`; and whether a file at a name is ours, and for which URL.

Only a file the worker's user owns with no other link is trusted by its label (storage.py: the download directory
may be shared).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass

from .errors import PermanentError
from .storage import META_DIR, READ_CHUNK, TargetDir, describe_os_error, url_key


@dataclass
class Validators:
    """What we know about a file from an earlier run: enough for a conditional GET, and the file's size,
    inode and mtime when we wrote it (unchanged: trusted without reading it again). `url` is `url_key(url)`."""

    url: str
    bytes: int
    sha256: str
    etag: str | None = None
    last_modified: str | None = None
    inode: int | None = None
    mtime_ns: int | None = None

    def stamp(self, st: os.stat_result) -> Validators:
        self.inode, self.mtime_ns = st.st_ino, st.st_mtime_ns
        return self

    def matches(self, st: os.stat_result) -> bool:
        """The file is exactly the one we wrote: same inode, size and modification time."""
        return (st.st_ino, st.st_size, st.st_mtime_ns) == (self.inode, self.bytes, self.mtime_ns)


XATTR = "user.fleetfetch"  # the validators, on the file itself (as curl --xattr and wget2 keep the URL)
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSPC, errno.E2BIG}


def label(fd: int, v: Validators) -> bool:
    """Write the validators onto the file (its temp file, before the rename: they land together), stamped with
    its inode and mtime now (an extended attribute changes neither). False where the file system has no user
    extended attributes: the caller keeps a sidecar instead. The writer attribute is left (`writer_of` reads it
    from `.part` names only): removing it was a system call per URL."""
    v.stamp(os.fstat(fd))
    try:
        os.setxattr(fd, XATTR, json.dumps(vars(v), separators=(",", ":")).encode())
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return False
        raise PermanentError(f"cannot label the file: {exc.strerror}") from None
    return True


def _open_ours(where: TargetDir, name: str) -> int | None:
    """A read descriptor of `name` if it is a regular file the worker's user owns with no other link, else None.
    On a shared volume anyone may plant a file with a label of their own (a label is no signature): only a file
    another user cannot have written or linked is ever trusted by its label. Checked on the descriptor that is
    then read, so the file cannot be swapped between the check and the read."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=where.fd)
    except OSError:
        return None
    return _ours(fd)


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _ours(fd: int) -> int | None:
    """`fd` if it is a regular file the worker's user owns with no other link; else None (and `fd` closed)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
        return fd
    os.close(fd)
    return None


def _read_label(fd: int) -> Validators | None:
    try:
        return Validators(**json.loads(os.getxattr(fd, XATTR)))
    except (OSError, ValueError, TypeError):
        return None


def _read_validators(where: TargetDir, name: str, fd: int) -> Validators | None:
    """The file's own label, else the sidecar of a file system without extended attributes (or an older run)."""
    return _read_label(fd) or _read_sidecar(where, name)


def _read_sidecar(where: TargetDir, name: str) -> Validators | None:
    try:
        meta = where.meta(create=False)
    except FileNotFoundError:
        return None
    try:
        fd = os.open(f"{name}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=meta)
        with open(fd, "rb") as fh:
            return Validators(**json.loads(fh.read(1 << 16)))
    except (OSError, ValueError, TypeError):
        return None
    finally:
        os.close(meta)


def load_validators(where: TargetDir, name: str, url: str, expected: str | None = None) -> Validators | None:
    """Validators for a present file of ours, of the same URL, whose content still matches; None otherwise.
    A file whose inode, size and mtime are those recorded is trusted unread; else it is hashed again.
    `expected`: the SHA-256 the list asks for now; a label recording another digest is not used (the file is
    downloaded again and checked against the new one, never kept as unchanged)."""
    fd = _open_ours(where, name)
    if fd is None:  # nothing there (a new download), or a file we cannot vouch for: no label is read
        return None
    with open(fd, "rb") as fh:
        st = os.fstat(fd)
        found = _read_validators(where, name, fd)
        if found is None or found.url != url_key(url) or st.st_size != found.bytes:
            return None
        if expected and found.sha256 != expected.lower():
            return None
        if found.matches(st):
            return found
        return found if sha256_of_file(fh) == found.sha256 else None  # edited on disk: download again


def owns(where: TargetDir, name: str, url: str) -> bool:
    """True if `name` is this URL's own file (of ours) from an earlier download, untouched since."""
    fd = _open_ours(where, name)
    if fd is None:
        return False
    try:
        found = _read_validators(where, name, fd)
        return found is not None and found.url == url_key(url) and found.matches(os.fstat(fd))
    finally:
        os.close(fd)


def held_by_other_url(where: TargetDir, name: str, url: str) -> bool | None:
    """True if `name` is a finished file of ours labelled for another URL (another job's, in a shared directory):
    it is the bytes another record describes, so this URL takes another name instead of replacing it. A
    directory (an earlier run's, with -x) holds its name too: no file can be renamed over it. None (false too)
    when nothing is there at all: the caller then has no validators to load either (one system call for both)."""
    try:
        fd: int | None = os.open(name, _READ_FLAGS, dir_fd=where.fd)
    except FileNotFoundError:
        return None
    except OSError:
        fd = None
    fd = None if fd is None else _ours(fd)
    if fd is None:
        with contextlib.suppress(OSError):
            return stat.S_ISDIR(os.stat(name, dir_fd=where.fd, follow_symlinks=False).st_mode)
        return False
    try:
        found = _read_validators(where, name, fd)
        return found is not None and found.url != url_key(url)
    finally:
        os.close(fd)


def save_validators(where: TargetDir, name: str, v: Validators) -> None:
    """The sidecar `.fleetfetch/NAME.json`: where the file system takes no extended attributes (`label`)."""
    meta = where.meta(create=True)
    tmp = f".{name}.json.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=meta)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(vars(v), fh)
        os.replace(tmp, f"{name}.json", src_dir_fd=meta, dst_dir_fd=meta)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=meta)
        raise PermanentError(describe_os_error(exc, where.path / META_DIR / name)) from None
    finally:
        os.close(meta)


def sha256_of_file(fh: object) -> str:
    digest = hashlib.sha256()
    while chunk := fh.read(READ_CHUNK):  # type: ignore[attr-defined]
        digest.update(chunk)
    return digest.hexdigest()
