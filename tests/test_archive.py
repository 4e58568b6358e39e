"""qbench.archive.safe_extract: the same refusals with and without Python's tar filters
(Debian 12's python3, 3.11.2, has no `filter=`), so unpacking a GPU return works on both."""
import io
import tarfile

import pytest

from qbench import archive


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = b"weights"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
    return path


@pytest.fixture(params=["library filter", "fallback"])
def extract(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return archive.safe_extract


def test_plain_folder_is_extracted(tmp_path, extract):
    path = _tar(tmp_path / "a.tar", [("ckpt", "dir"), ("ckpt/model.safetensors", "file")])
    with tarfile.open(path) as tar:
        extract(tar, tmp_path / "out")
    assert (tmp_path / "out" / "ckpt" / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("members", [[("../escape.txt", "file")], [("ckpt/link", "symlink")]])
def test_unsafe_members_are_refused(tmp_path, extract, members):
    path = _tar(tmp_path / "bad.tar", members)
    with tarfile.open(path) as tar, pytest.raises((archive.UnsafeArchiveError, tarfile.TarError)):
        extract(tar, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_an_absolute_name_never_lands_outside(tmp_path, extract):
    """The library filter strips the leading '/', the fallback refuses: neither writes at the root."""
    name = f"/{tmp_path.name}-abs.txt"
    path = _tar(tmp_path / "abs.tar", [(name, "file")])
    with tarfile.open(path) as tar:
        try:
            extract(tar, tmp_path / "out")
        except (archive.UnsafeArchiveError, tarfile.TarError):
            pass
    from pathlib import Path

    assert not Path(name).exists()
