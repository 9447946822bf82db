"""Import audio from an uploaded folder or zip into the app's data folder — safely.

Uploads are untrusted. A zip entry named ``../../etc/x`` or ``/etc/x`` (path traversal, "zip slip"), a symlink that
points outside the import root, or a zip that inflates to gigabytes must not write outside the destination or fill
the disk. Anything like that refuses the whole import with ``ImportRefused`` (nothing is half-imported silently).
Only audio files are copied; the relative layout is kept.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .pipeline import AUDIO_EXTENSIONS

MAX_BYTES = 2 * 1024**3
MAX_FILES = 20000


class ImportRefused(ValueError):
    """The upload tries to escape the import root (or is too big); the message names the entry."""


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def safe_relative(name: str) -> PurePosixPath:
    """A zip entry name as a safe relative path, or ``ImportRefused``."""
    normal = name.replace("\\", "/")
    path = PurePosixPath(normal)
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":") or path.is_absolute():
        raise ImportRefused(f"refused {name!r}: absolute path in the archive")
    if any(part == ".." for part in path.parts):
        raise ImportRefused(f"refused {name!r}: path traversal ('..') in the archive")
    return path


def _target(destination: Path, relative: PurePosixPath | Path) -> Path:
    target = destination / Path(*relative.parts)
    if not _inside(target, destination):
        raise ImportRefused(f"refused {relative}: it would be written outside {destination}")
    return target


def import_folder(source: str | os.PathLike, destination: str | os.PathLike, max_bytes: int = MAX_BYTES,
                  max_files: int = MAX_FILES) -> list[Path]:
    """Copy the audio files of a folder; a symlink resolving outside ``source`` refuses the import."""
    root, destination = Path(source), Path(destination)
    if not root.is_dir():
        raise ImportRefused(f"{root} is not a folder")
    plan: list[tuple[Path, Path]] = []
    total = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            entry = Path(folder) / name
            if entry.is_symlink() and not _inside(entry, root):
                raise ImportRefused(f"refused {entry.relative_to(root)}: symlink leads outside the import root")
        for name in files:
            entry = Path(folder) / name
            if entry.suffix.lower() in AUDIO_EXTENSIONS and entry.is_file():
                total += entry.stat().st_size
                plan.append((entry, _target(destination, entry.relative_to(root))))
    _check_size(len(plan), total, max_files, max_bytes)
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.resolve(), dst)
    return [dst for _, dst in plan]


def _check_size(count: int, total: int, max_files: int, max_bytes: int) -> None:
    if count > max_files:
        raise ImportRefused(f"refused: {count} audio files (at most {max_files})")
    if total > max_bytes:
        raise ImportRefused(f"refused: {total} bytes of audio (at most {max_bytes})")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def import_zip(archive: str | os.PathLike, destination: str | os.PathLike, max_bytes: int = MAX_BYTES,
               max_files: int = MAX_FILES) -> list[Path]:
    """Extract the audio files of a zip; traversal, absolute names or escaping symlinks refuse the import."""
    destination = Path(destination)
    try:
        archive_file = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ImportRefused(f"refused {Path(archive).name}: not a readable zip archive ({exc})") from None
    with archive_file as zf:
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in zf.infolist():
            relative = safe_relative(info.filename)
            if _is_symlink(info):
                link = zf.read(info).decode("utf-8", "replace")
                joined = PurePosixPath(os.path.normpath(str(relative.parent / link)))
                if link.startswith("/") or joined.parts[:1] == ("..",):
                    raise ImportRefused(f"refused {info.filename!r}: symlink leads outside the import root")
                continue  # links inside the archive are not extracted (their targets are)
            if not info.is_dir() and relative.suffix.lower() in AUDIO_EXTENSIONS:
                plan.append((info, _target(destination, relative)))
        _check_size(len(plan), sum(i.file_size for i, _ in plan), max_files, max_bytes)
        written: list[Path] = []
        try:
            for info, dst in plan:
                dst.parent.mkdir(parents=True, exist_ok=True)
                written.append(dst)
                _extract_capped(zf, info, dst, max_bytes)
        except ImportRefused:
            for path in written:  # a refused archive leaves nothing half-imported behind
                path.unlink(missing_ok=True)
            raise
    return [dst for _, dst in plan]


def _extract_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst: Path, max_bytes: int) -> None:
    """Stream one entry, stopping if it inflates past its declared size (a lying header)."""
    written = 0
    try:
        with zf.open(info) as src, open(dst, "wb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > max(info.file_size, 0) or written > max_bytes:
                    raise ImportRefused(f"refused {info.filename!r}: inflates beyond its declared size")
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        dst.unlink(missing_ok=True)
        raise ImportRefused(f"refused {info.filename!r}: the archive is corrupt ({exc})") from None
    except ImportRefused:
        dst.unlink(missing_ok=True)
        raise


def import_path(source: str | os.PathLike, destination: str | os.PathLike, **limits: int) -> list[Path]:
    """Import a folder or a ``.zip`` into ``destination``; returns the written audio files."""
    source = Path(source)
    if source.is_dir():
        return import_folder(source, destination, **limits)
    if source.is_file() and zipfile.is_zipfile(source):
        return import_zip(source, destination, **limits)
    raise ImportRefused(f"{source} is neither a folder nor a zip archive")
