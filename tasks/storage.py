"""Files on disk: a locked temp file beside the target, atomic rename when verified, validator sidecars."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import Busy, PermanentError
from .naming import check_component

META_DIR = ".fleetfetch"
PART_SUFFIX = ".part"
_READ_CHUNK = 1 << 20


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def target_dir(root: Path, subdir: str) -> Path:
    """The directory a job writes into, created if missing, refused if it resolves outside `root`."""
    root.mkdir(parents=True, exist_ok=True)
    real_root = Path(os.path.realpath(root))
    parts = [check_component(p) for p in Path(subdir).parts] if subdir else []
    directory = real_root.joinpath(*parts)
    directory.mkdir(parents=True, exist_ok=True)
    if not _inside(Path(os.path.realpath(directory)), real_root):
        raise PermanentError(f"refused: {subdir!r} leads outside the download directory (symlink?)")
    return directory


def describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path.name}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {path.parent} ({exc.strerror})"
    if exc.errno == errno.ELOOP:
        return f"refused: {path.name} is a symlink"
    return f"cannot write {path.name}: {exc.strerror or exc}"


class PartFile:
    """The temp file `.NAME.part` for one target: locked, appended to, hashed, then renamed into place."""

    def __init__(self, directory: Path, name: str) -> None:
        self.final = directory / name
        self.path = directory / f".{name}{PART_SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.path)) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise Busy(f"another attempt is writing {name} right now") from None
        self.hash = hashlib.sha256()
        self.size = 0

    def keep_prefix(self) -> int:
        """Resume: hash what an earlier attempt left and continue after it. Returns its length."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hash, self.size = hashlib.sha256(), 0
        while chunk := os.read(self.fd, _READ_CHUNK):
            self.hash.update(chunk)
            self.size += len(chunk)
        return self.size

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hash, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.final)) from None
        self.hash.update(chunk)
        self.size += len(chunk)

    def commit(self, fsync: bool, target: Path | None = None) -> None:
        """Make the verified bytes visible under the final name (or `target`, which must not exist yet:
        a server-chosen name never replaces another file), atomically."""
        try:
            if fsync:
                os.fsync(self.fd)
            if target is None:
                os.replace(self.path, self.final)  # replaces a planted symlink itself, never writes through it
            else:
                os.link(self.path, target)  # atomic create-if-absent; FileExistsError if taken
                os.unlink(self.path)
                self.final = target
            if fsync:
                dir_fd = os.open(self.final.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except FileExistsError:
            raise
        except OSError as exc:
            raise PermanentError(describe_os_error(exc, self.final)) from None
        self.close()

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1


@dataclass
class Validators:
    """What we know about a file from an earlier run: enough for a conditional GET."""

    url: str
    bytes: int
    sha256: str
    etag: str | None = None
    last_modified: str | None = None


def _sidecar(root: Path, directory: Path, name: str) -> Path:
    rel = directory.relative_to(Path(os.path.realpath(root)))
    return Path(os.path.realpath(root)) / META_DIR / rel / f"{name}.json"


def load_validators(root: Path, directory: Path, name: str, url: str) -> Validators | None:
    """Validators for a present file of the same URL whose size still matches; None otherwise."""
    try:
        data = json.loads(_sidecar(root, directory, name).read_text())
        found = Validators(**data)
        target = directory / name
        if found.url != url or target.is_symlink() or target.stat().st_size != found.bytes:
            return None
        return found if sha256_of(target) == found.sha256 else None  # edited on disk: download again
    except (OSError, ValueError, TypeError):
        return None


def save_validators(root: Path, directory: Path, name: str, v: Validators) -> None:
    path = _sidecar(root, directory, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(v.__dict__))
    os.replace(tmp, path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
