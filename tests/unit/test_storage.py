import os

import pytest

from lensmill.config import StorageConfig
from lensmill.storage import (
    StorageError,
    ensure_writable,
    exists,
    join_uri,
    list_files,
    read_bytes,
    read_json,
    write_bytes,
    write_json,
)

S = StorageConfig()


def test_join_uri_keeps_schemes_and_single_slashes():
    assert join_uri("s3://b/p/", "/runs/", "x.json") == "s3://b/p/runs/x.json"
    assert join_uri("/data", "a", "b") == "/data/a/b"


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "f.json")
    write_json(uri, {"a": 1}, S)
    write_json(uri, {"a": 2}, S)  # replaced whole
    assert read_json(uri, S) == {"a": 2}
    assert list_files(str(tmp_path), S) == [uri]
    assert exists(uri, S) and not exists(uri + ".nope", S)


def test_missing_file_names_the_uri(tmp_path):
    with pytest.raises(StorageError, match="not found: .*nope.bin"):
        read_bytes(str(tmp_path / "nope.bin"), S)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_unwritable_root_fails_early_naming_it(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(StorageError, match=str(ro)):
        ensure_writable(str(ro), S)


def test_root_under_a_file_fails_early_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write .*file/sub"):
        ensure_writable(str(blocker / "sub"), S)
    with pytest.raises(StorageError):
        write_bytes(str(blocker / "sub" / "a.bin"), b"1", S)
