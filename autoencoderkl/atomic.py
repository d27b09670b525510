"""Atomic, durable file and folder writes: the one way every file others read is written.

A reader (a resumed run, stage 2 reading a latent cache, a user's ``from_pretrained``)
must never see a half-written file, and a finished file must survive a power loss. The
recipe (as SQLite, git and LMDB do it on POSIX file systems):

1. write to a temporary name in the *same* folder (a rename is atomic only within one
   file system), hidden by a leading dot so folder scans (``list_images``, shard globs)
   never pick it up;
2. flush and ``fsync`` the file (its bytes reach the disk before its name does);
3. ``os.replace`` it onto the final name (atomic: readers see the old or the new file);
4. ``fsync`` the folder (the rename itself reaches the disk).

On an error before the rename the temporary file is removed and the final name keeps
its old content (or stays absent). Folders (checkpoints, ``save_pretrained`` exports)
follow the same steps with every file inside fsynced.

No torch import here: the module is cheap to import from any entry point.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def fsync_dir(path: PathLike) -> None:
    """``fsync`` a folder, so that renames and new names inside it are durable.

    A no-op where folders cannot be opened for fsync (Windows).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (tmpfs on old kernels) refuse; nothing to do
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """``fsync`` one file's content and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: PathLike) -> Path:
    """The hidden temporary sibling ``path`` is written as: ``.NAME.tmp-PID.SUFFIX``.

    The suffix is kept so that writers which pick a format by extension (PIL's PNG,
    ``torchvision.utils.save_image``) still do; the process id keeps two writers of the
    same name (two ranks, a test and a run) from trampling each other's temporary file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``path``, durably.

    Usage::

        with atomic_path(out / "grid.png") as tmp:
            save_image(grid, tmp)

    Args:
        path: the final file; its folder is created if missing.
    Yields:
        The temporary file path (same folder, same suffix) the caller must create.
    Raises:
        FileNotFoundError: if the caller did not create the temporary file.
        Whatever the body raises; the temporary file is then removed and ``path`` keeps
        its previous content.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_atomic(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically and durably.

    Returns:
        ``path`` as a Path.
    Raises:
        OSError: if the folder cannot be created or written (``path`` is then unchanged).
    """
    final = Path(path)
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
    return final


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def publish_dir(tmp: PathLike, path: PathLike) -> Path:
    """Make a filled temporary folder ``tmp`` the folder ``path``, durably.

    Every file under ``tmp`` is fsynced, ``tmp`` is renamed to ``path`` (an existing
    ``path`` is moved aside first and deleted afterwards, so one complete version is on
    disk at every moment), and the parent folder is fsynced.

    Args:
        tmp: a complete folder beside ``path`` (same file system).
        path: the final name.
    Returns:
        ``path`` as a Path.
    """
    work, final = Path(tmp), Path(path)
    _fsync_tree(work)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, final)
    fsync_dir(final.parent)
    return final


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it replaces ``path``, durably.

    Usage::

        with atomic_dir(out / "vae") as tmp:
            vae.save_pretrained(tmp)

    Args:
        path: the final folder (its parent is created if missing).
    Yields:
        The temporary folder ``.NAME.tmp-PID`` beside ``path`` (created, empty); on
        success it is published with ``publish_dir``.
    Raises:
        Whatever the body raises; the temporary folder is then removed and ``path`` is
        left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish_dir(work, final)
