"""The one atomic write (nps.pipeline.files): the target is the old file or the whole new one, synced before and
after the rename; an error leaves the old file and no temporary one behind, and names the file meant."""
import errno
import os

import pytest

from nps.pipeline import files
from nps.pipeline.files import atomic_path, write_atomic


def test_write_atomic_replaces_and_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = files.fsync_path
    monkeypatch.setattr(files, "fsync_path", lambda p, directory=False: (synced.append((os.fspath(p), directory)),
                                                                        real(p, directory=directory)))
    target = tmp_path / "sub" / "base.pt"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(target.parent)) == ["base.pt"]
    tmp_synced = [p for p, d in synced if not d]
    assert len(tmp_synced) == 2 and all(os.path.basename(p).startswith(".base.pt.tmp-") for p in tmp_synced)
    assert (os.fspath(tmp_path / "sub"), True) in synced  # the rename itself is made durable


def test_an_error_while_writing_keeps_the_old_file_and_names_the_target(tmp_path):
    target = tmp_path / "rows.parquet"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["rows.parquet"]


def test_any_other_error_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "w.onnx"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise ValueError("exporter failed")
    assert os.listdir(tmp_path) == []
