"""Files on disk: a locked temp file beside the target, atomic rename when verified (what is known of a file from
an earlier run, on the file or in a sidecar: labels.py).

The download directory may be shared with other users. Every file and directory below it is reached from a
directory descriptor, one component at a time, with O_NOFOLLOW: a planted symlink (a sub-directory, the
`.fleetfetch` metadata directory, a temp or sidecar file) is refused instead of followed, so nothing is ever
created or written outside the download directory. Directories below it must belong to the worker's user (or
root), and a temp file is written only if we own it and it has no other link (a planted hard link is dropped,
not written into).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from pathlib import Path

from .digest import Sha256
from .errors import Busy, PermanentError
from .naming import check_component

META_DIR = ".fleetfetch"
PART_SUFFIX = ".part"
READ_CHUNK = 1 << 20
FLUSH_EVERY = 16 << 20  # a durable temp file's written bytes go to the disk in steps of this size (PartFile)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path.name}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path.parent} ({exc.strerror})"
    if exc.errno == errno.ELOOP:
        return f"refused: {path.name} is a symlink"
    return f"cannot write {path.name}: {exc.strerror or exc}"


def _descend(fd: int, parts: list[str], create: bool, shown: str) -> int:
    """The descriptor of directory `parts` below the directory `fd` (which is closed), never following a
    symlink and never creating anything before the components above it are checked."""
    for part in parts:
        try:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                # Created only when missing (a present one costs no failed mkdir per task), then opened the same
                # way; a directory someone else makes meanwhile is checked like any other.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and _is_file(fd, part):
                raise PermanentError(f"cannot write into {shown!r}: {part!r} is a file there, not a directory (an "
                                     "earlier download?); move it, or use another -d") from None
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PermanentError(f"refused: {shown!r} leads outside the download directory (symlink?)") from None
            if exc.errno == errno.ENOENT and not create:
                raise
            raise PermanentError(describe_os_error(exc, Path(shown))) from None
        finally:
            os.close(fd)
        fd = child
        if os.fstat(fd).st_uid not in (os.geteuid(), 0):  # another user could swap what is inside
            os.close(fd)
            raise PermanentError(f"refused: {shown!r} in the download directory belongs to another user")
    return fd


def _is_file(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


_META_CHECKED: set[tuple[str, tuple[str, ...]]] = set()  # (root, subdir parts) whose metadata directory was checked


class TargetDir:
    """`with TargetDir(root, subdir) as d:` the directory one task writes into, opened once as `d.fd`."""

    def __init__(self, root: Path, subdir: str) -> None:
        self.root = root
        self.parts = [check_component(p) for p in Path(subdir).parts] if subdir else []
        self.path = root.joinpath(*self.parts)
        self.fd = _descend(self._open_root(create=True), self.parts, True, subdir)

    def _open_root(self, create: bool = False) -> int:
        try:
            try:
                return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                if not create:
                    raise
                self.root.mkdir(parents=True, exist_ok=True)  # the root itself is the operator's choice (may be a link)
                return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.root / "x")) from None

    def check_meta(self) -> None:
        """Refuse (before any request) a metadata directory that is a planted link or not ours. Once per
        directory per process: this is the early refusal; what keeps a link planted later from being followed is
        that every use of the directory (`meta`) descends to it checking again (and on a file system with
        extended attributes nothing is written there at all). Per URL, the check cost 8 system calls."""
        key = (str(self.root), tuple(self.parts))
        if key not in _META_CHECKED:
            os.close(self.meta(create=True))
            if len(_META_CHECKED) >= 10_000:
                _META_CHECKED.clear()
            _META_CHECKED.add(key)

    def meta(self, create: bool) -> int:
        """A descriptor of `.fleetfetch/<subdir>` (the caller closes it); FileNotFoundError if absent."""
        return _descend(self._open_root(), [META_DIR, *self.parts], create, "/".join([META_DIR, *self.parts]))

    def __enter__(self) -> TargetDir:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _open_own_file(dir_fd: int, name: str, shown: str) -> tuple[int, int]:
    """Open (or create) `name` for writing, only if it is a regular file of ours with no other link, and lock
    it; returns its descriptor and its length once locked (what an attempt that held the lock left in it).
    Busy if another attempt holds the lock.

    A planted file (a hard link to a file elsewhere, a file of another user, a FIFO) is unlinked, which
    removes only its name here, and a fresh file is created in its place with O_EXCL.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            if not locked:
                os.close(fd)
                raise Busy(f"another attempt is writing {shown} right now")
            if _named(dir_fd, name, st):
                return fd, st.st_size
            os.close(fd)  # renamed into place (or removed) by its writer between our open and our lock: open anew
            continue
        os.close(fd)  # a planted file is replaced, locked or not
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == st.st_ino:
                os.unlink(name, dir_fd=dir_fd)
        flags |= os.O_EXCL
    raise PermanentError(f"refused: {name} keeps being replaced by someone else")


def _named(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """`name` still refers to the file `st` describes."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == st.st_ino
    except FileNotFoundError:
        return False


class PartFile:
    """The temp file `.NAME.part` for one target: locked, appended to, hashed, then renamed into place.

    `durable`: the file will be fsynced before the rename. Its pages are then handed to the disk every
    FLUSH_EVERY bytes while the body still arrives (posix_fadvise DONTNEED starts their writeback without
    waiting for it, as PostgreSQL's flush_after does), so the final fsync waits for the last few MiB, not for the
    whole file: a 1 GiB download does not spend a second or more after its last byte (this VM's disk: 374 MB/s)."""

    def __init__(self, where: TargetDir, name: str, durable: bool = False, url: str | None = None) -> None:
        self.durable = durable
        self.dir_fd = where.fd
        self.name = name
        self.part = f".{name}{PART_SUFFIX}"
        self.shown = where.path / name
        try:
            self.fd, length = _open_own_file(self.dir_fd, self.part, name)
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, where.path / self.part)) from None
        self.hash, self.size, self._flushed = Sha256(), 0, 0
        self._left = length > 0  # bytes an earlier attempt left in the file, not (yet) kept
        self.found_empty = length == 0  # empty when locked: no bytes, so no note or range map worth reading
        if url is not None:  # who holds the name, for another URL that meets the lock (`writer_of`)
            with contextlib.suppress(OSError):
                os.setxattr(self.fd, WRITER_XATTR, url_key(url).encode())

    def identity(self) -> str:
        """`inode:size:mtime_ns` of the temp file, recorded when an attempt keeps it for the next one to resume
        (all three: a file planted under the same name may even get the freed inode number back)."""
        st = os.fstat(self.fd)
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def keep_prefix(self, identity: str | None) -> int:
        """Resume: hash what an earlier attempt left and continue after it. Returns its length (0 when the
        file is not the one that attempt recorded: nothing unknown is resumed from)."""
        if identity is None or self.identity() != identity:
            self.restart()
            return 0
        os.lseek(self.fd, 0, os.SEEK_SET)
        self._reset()
        while chunk := os.read(self.fd, READ_CHUNK):
            self.hash.update(chunk)
            self.size += len(chunk)
        return self.size

    def restart(self) -> None:
        if self._left or self.size:  # a new, empty file needs neither call
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            self._left = False
        self._reset()

    def fresh(self) -> None:
        """Start over in a new, empty file under the same name: a writer that still holds the old one (a helper on
        another worker sharing the volume) writes into the unlinked old file, never into this one."""
        tmp = f"{self.part}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self.dir_fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):
            os.setxattr(fd, WRITER_XATTR, os.getxattr(self.fd, WRITER_XATTR))
        os.rename(tmp, self.part, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.close(self.fd)
        self.fd, self._left = fd, False
        self._reset()

    def _reset(self) -> None:
        """Nothing written yet: a fresh hash (the old one's thread ended), no size, nothing handed to the disk."""
        self.hash.close()
        self.hash, self.size, self._flushed = Sha256(), 0, 0

    def write(self, chunk: bytes) -> None:
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.shown)) from None
        self.hash.update(chunk)
        self.size += len(chunk)
        if self.durable and self.size - self._flushed >= FLUSH_EVERY:
            os.posix_fadvise(self.fd, self._flushed, self.size - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self.size

    def preallocate(self, size: int) -> None:
        """Reserve the whole file before ranges are written at their offsets (a full disk fails now, not midway)."""
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
            os.ftruncate(self.fd, size)

    def pwrite(self, chunk: bytes, offset: int) -> None:
        """Write a range's bytes at their offset (segments: tasks/segments.py). Neither hashed nor counted here:
        the caller hashes the file in order and sets `size` when it is complete."""
        try:
            write_at(self.fd, chunk, offset)
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.shown)) from None

    def commit(self, fsync: bool, target: str | None = None, replace: bool = True,
               stat_after: bool = True) -> os.stat_result | None:
        """Make the verified bytes visible under the final name (or `target`), atomically. With
        `replace=False` the name must be free (FileExistsError otherwise): a server-chosen name never
        replaces another file. Returns the file's stat (recorded so a re-run can trust it unread), unless
        `stat_after` is false (`label` stamped it: a rename changes neither inode nor mtime)."""
        target = target or self.name
        try:
            if fsync:
                os.fsync(self.fd)
            if replace:  # replaces a planted symlink itself, never writes through it
                os.replace(self.part, target, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            else:  # atomic create-if-absent
                os.link(self.part, target, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=False)
                os.unlink(self.part, dir_fd=self.dir_fd)
            if fsync:
                os.fsync(self.dir_fd)
            st = os.fstat(self.fd) if stat_after else None
        except FileExistsError:
            raise
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.shown.with_name(target))) from None
        self.name = target
        self.close()
        return st

    def give_up(self) -> None:
        """Leave the name to another URL: a temp file we created is removed, one with bytes left in it is kept."""
        self.close() if self._left else self.discard()

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.part, dir_fd=self.dir_fd)
        self.close()

    def close(self) -> None:
        self.hash.close()
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1


def write_at(fd: int, data: bytes, offset: int) -> None:
    """All of `data` at `offset` (pwrite may write less than it is given)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def url_key(url: str) -> str:
    """What a sidecar keeps of the URL: a digest, never the URL (it may hold a password or a token, and the
    download directory may be readable by other users)."""
    return "sha256:" + hashlib.sha256(url.encode()).hexdigest()


WRITER_XATTR = "user.fleetfetch.writer"  # on a temp file: url_key of the URL writing it


def writer_of(where: TargetDir, name: str) -> str | None:
    """url_key of the URL whose attempt is writing `name` now (None: unknown, e.g. no extended attributes)."""
    try:
        fd = os.open(f".{name}{PART_SUFFIX}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=where.fd)
    except OSError:
        return None
    try:
        return os.getxattr(fd, WRITER_XATTR).decode() if os.fstat(fd).st_uid == os.geteuid() else None
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
