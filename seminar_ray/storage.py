"""Shared storage: every path flag takes a local or NFS directory, or a URI (s3://, gs://, file://) via pyarrow.fs.

Local paths go through the standard library and come back as `Path`; URIs go through
`pyarrow.fs.FileSystem.from_uri` and come back as `str`. Code that needs a real directory (torch.load, np.load with
mmap, pyarrow over many files) calls `local_dir`, which mirrors a URI into a node-local cache once per content.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from seminar_ray.errors import InputError

CACHE_ENV = "SEMINAR_RAY_CACHE"  # where URIs are mirrored; default: <tmp>/seminar_ray_cache


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def join(base: str | os.PathLike, *names: str) -> str | Path:
    """`base/names...`, keeping a URI's scheme intact (pathlib would fold `s3://` into `s3:/`)."""
    if not is_uri(base):
        return Path(base).joinpath(*names)
    return "/".join([str(base).rstrip("/"), *names])


def basename(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str | os.PathLike) -> str | Path:
    if not is_uri(path):
        return Path(path).parent
    return str(path).rstrip("/").rsplit("/", 1)[0]


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as exc:  # pyarrow.ArrowInvalid: an unknown scheme or a malformed URI
        raise InputError(f"{uri}: not a storage URI pyarrow can open ({exc})") from exc


def _info(uri: str) -> pafs.FileInfo:
    fs, p = _fs(uri)
    return fs.get_file_info(p)


def exists(path: str | os.PathLike) -> bool:
    return _info(str(path)).type != pafs.FileType.NotFound if is_uri(path) else Path(path).exists()


def is_file(path: str | os.PathLike) -> bool:
    return _info(str(path)).type == pafs.FileType.File if is_uri(path) else Path(path).is_file()


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, p = _fs(str(path))
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file; locally through a temp file + rename, so a reader never sees half of it."""
    if not is_uri(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, p = _fs(str(path))
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def open_input(path: str | os.PathLike):
    """A seekable binary file (e.g. for pyarrow.parquet.ParquetFile)."""
    if not is_uri(path):
        return open(path, "rb")
    fs, p = _fs(str(path))
    return fs.open_input_file(p)


def subdirs(path: str | os.PathLike) -> list[str | Path]:
    """Immediate subdirectories of `path` (hidden ones, e.g. half-written temp dirs, left out); [] if it is absent."""
    if not is_uri(path):
        return (
            sorted(d for d in Path(path).iterdir() if d.is_dir() and not d.name.startswith("."))
            if Path(path).is_dir()
            else []
        )
    fs, p = _fs(str(path))
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(
        join(path, i.base_name) for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
    )


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a directory tree between any two of local and URI. A local destination appears whole (tmp + rename)."""
    src_fs, src_p = _fs(str(src)) if is_uri(src) else (pafs.LocalFileSystem(), str(Path(src).resolve()))
    if is_uri(dst):
        dst_fs, dst_p = _fs(str(dst))
        dst_fs.create_dir(dst_p, recursive=True)
        pafs.copy_files(src_p, dst_p, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return
    with staged_dir(dst) as tmp:
        pafs.copy_files(src_p, str(tmp), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())


def delete_dir(path: str | os.PathLike) -> None:
    if not is_uri(path):
        shutil.rmtree(path)
        return
    fs, p = _fs(str(path))
    fs.delete_dir(p)


def _fingerprint(uri: str) -> str:
    """The URI plus every file's relative path, size and mtime: a changed directory gets a fresh cache entry."""
    fs, p = _fs(uri)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    h = hashlib.sha256(uri.encode())
    for i in sorted(infos, key=lambda i: i.path):
        h.update(f"{i.path[len(p) :]}|{i.size}|{i.mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "seminar_ray_cache")


def local_dir(path: str | os.PathLike) -> Path:
    """A local directory with `path`'s contents: a local/NFS path as is, a URI mirrored once into the cache.

    Every process on a node shares the cache; a concurrent download of the same content loses the rename race
    and uses the winner's copy.
    """
    if not is_uri(path):
        return Path(path)
    uri = str(path).rstrip("/")
    target = cache_root() / f"{basename(uri)}-{_fingerprint(uri)}"
    if target.is_dir():
        return target
    fs, p = _fs(uri)
    with staged_dir(target, replace=False) as tmp:  # a concurrent download of the same content may win the race
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


@contextmanager
def staged_dir(dst: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """The one way to write a local directory whole: fill the yielded temporary sibling, and on a clean exit it
    becomes `dst`.

    An earlier `dst` is replaced only once the new one is complete (`replace_dir`). On an exception the temporary
    directory is removed and `dst` is left as it was. replace=False: when `dst` exists by then (another process
    published the same content first), the staged copy is dropped and `dst` kept.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is shared like any directory
        yield tmp
        if replace:
            replace_dir(tmp, dst)
        elif not dst.is_dir():
            try:
                os.rename(tmp, dst)
            except OSError:
                if not dst.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished local directory `src` to `dst`. An earlier `dst` stays readable until `src` takes its
    place: one atomic exchange where the kernel has one (Linux renameat2), else a rename aside that is undone when
    the second rename fails. The earlier contents are deleted afterwards."""
    src, dst = Path(src), Path(dst)
    try:
        os.rename(src, dst)  # no dst, or an empty one
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(src, dst):
        shutil.rmtree(src)  # now holds the earlier dst
        return
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
