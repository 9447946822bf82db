"""Importing uploads: audio is copied, and path traversal or symlinks leaving the import root are refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dataflux_ui.importer import ImportRefused, import_path

ROOT = Path(__file__).resolve().parent.parent
WAV = b"RIFF....WAVEfmt "  # content does not matter to the importer


def _zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_zip_import_keeps_layout_and_skips_non_audio(tmp_path):
    archive = _zip(tmp_path / "ok.zip", {"a.wav": WAV, "sub/b.flac": WAV, "notes.txt": b"x", "sub/": b""})
    written = import_path(archive, tmp_path / "dest")
    assert sorted(p.relative_to(tmp_path / "dest").as_posix() for p in written) == ["a.wav", "sub/b.flac"]
    assert (tmp_path / "dest" / "sub" / "b.flac").read_bytes() == WAV


@pytest.mark.parametrize("name", ["../evil.wav", "sub/../../evil.wav", "/tmp/evil.wav", "..\\evil.wav",
                                  "C:/evil.wav"])
def test_zip_traversal_is_refused(tmp_path, name):
    archive = _zip(tmp_path / "bad.zip", {"fine.wav": WAV, name: WAV})
    with pytest.raises(ImportRefused, match="refused"):
        import_path(archive, tmp_path / "dest")
    assert not (tmp_path / "evil.wav").exists() and not list((tmp_path).glob("dest/**/*.wav"))


def test_zip_symlink_leaving_root_is_refused(tmp_path):
    archive = _zip(tmp_path / "link.zip", {"a.wav": WAV}, links={"passwd.wav": "../../etc/passwd"})
    with pytest.raises(ImportRefused, match="symlink"):
        import_path(archive, tmp_path / "dest")
    inside = _zip(tmp_path / "inside.zip", {"a.wav": WAV}, links={"b.wav": "a.wav"})
    assert [p.name for p in import_path(inside, tmp_path / "dest2")] == ["a.wav"]


def test_folder_symlinks(tmp_path):
    source = tmp_path / "upload"
    (source / "sub").mkdir(parents=True)
    (source / "a.wav").write_bytes(WAV)
    os.symlink(source / "a.wav", source / "sub" / "alias.wav")  # stays inside: allowed, copied as a file
    written = import_path(source, tmp_path / "dest")
    assert sorted(p.name for p in written) == ["a.wav", "alias.wav"]
    assert not (tmp_path / "dest" / "sub" / "alias.wav").is_symlink()
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"secret")
    os.symlink(secret, source / "escape.wav")
    with pytest.raises(ImportRefused, match="outside the import root"):
        import_path(source, tmp_path / "dest2")
    (source / "escape.wav").unlink()
    os.symlink(tmp_path, source / "parent")  # a directory link out of the root
    with pytest.raises(ImportRefused, match="outside the import root"):
        import_path(source, tmp_path / "dest3")


def test_size_limits(tmp_path):
    archive = _zip(tmp_path / "big.zip", {"a.wav": b"x" * 1000, "b.wav": b"x" * 1000})
    with pytest.raises(ImportRefused, match="bytes"):
        import_path(archive, tmp_path / "dest", max_bytes=1500)
    with pytest.raises(ImportRefused, match="files"):
        import_path(archive, tmp_path / "dest", max_files=1)


def test_cli_import_refusal_exit_code(tmp_path):
    archive = _zip(tmp_path / "bad.zip", {"../evil.wav": WAV})
    result = subprocess.run([sys.executable, "-m", "dataflux_ui", "import", str(archive), "--dest",
                             str(tmp_path / "dest")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "import refused" in result.stderr
