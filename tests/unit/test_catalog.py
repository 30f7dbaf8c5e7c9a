"""lensmill.catalog's inputs: folders, list files and catalogs into one table of objects, and the
errors that name what is wrong (no Ray: the scoring itself is in tests/integration/test_scoring.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lensmill.catalog import CatalogError, read_catalog
from lensmill.config import StorageConfig

STORAGE = StorageConfig()


def test_a_folder_lists_its_image_files_by_relative_path(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.npy", "sub/a.fits", "c.PNG"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    cat = read_catalog(str(tmp_path), STORAGE)
    assert cat.table.column("object_id").to_pylist() == ["b.npy", "c.PNG", "sub/a.fits"]
    assert cat.table.column("path").to_pylist()[2] == str(tmp_path / "sub" / "a.fits")
    assert cat.path_columns == ("path",) and cat.table.column("ra").null_count == 3


def test_a_list_file_resolves_paths_against_its_folder(tmp_path) -> None:
    (tmp_path / "list.txt").write_text("# cutouts\nx/one.npy\n\n/abs/two.fits\n")
    cat = read_catalog(str(tmp_path / "list.txt"), STORAGE)
    assert cat.table.column("path").to_pylist() == [str(tmp_path / "x" / "one.npy"), "/abs/two.fits"]


def test_a_csv_catalog_keeps_ids_as_text_and_coordinates_as_numbers(tmp_path) -> None:
    (tmp_path / "cat.csv").write_text("id,ra,dec,path_g,path_r\n007,10.5,-3.25,g.fits,r.fits\n")
    cat = read_catalog(str(tmp_path / "cat.csv"), STORAGE)
    assert cat.table.column("object_id").to_pylist() == ["007"]
    assert cat.table.column("ra").to_pylist() == [10.5] and cat.path_columns == ("path_g", "path_r")
    same = read_catalog(str(tmp_path / "cat.csv"), STORAGE)
    assert same.sha256 == cat.sha256


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name,path\na,x.npy\n", "no object_id \\(or id\\) column"),
        ("object_id,ra\na,1.0\n", "no image column"),
        ("object_id,path,path_g\na,x.npy,y.fits\n", "both a path column and per-band"),
        ("object_id,path\na,x.npy\na,y.npy\n", "object ids repeat"),
        ("object_id,ra,path\na,north,x.npy\n", "column ra is not numeric"),
        ("object_id,path\na,\n", "row 0 has no path"),
    ],
)
def test_catalog_mistakes_are_named(tmp_path, text: str, match: str) -> None:
    (tmp_path / "cat.csv").write_text(text)
    with pytest.raises(CatalogError, match=match) as err:
        read_catalog(str(tmp_path / "cat.csv"), STORAGE)
    assert "cat.csv" in str(err.value)


def test_missing_and_empty_inputs_are_named(tmp_path) -> None:
    with pytest.raises(CatalogError, match="input not found"):
        read_catalog(str(tmp_path / "nowhere"), STORAGE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no image files"):
        read_catalog(str(tmp_path / "empty"), STORAGE)
    with pytest.raises(CatalogError, match="catalog not found"):
        read_catalog(str(tmp_path / "missing.parquet"), STORAGE)
    (tmp_path / "bad.parquet").write_bytes(np.zeros(10, np.uint8).tobytes())
    with pytest.raises(CatalogError, match="not a readable catalog"):
        read_catalog(str(tmp_path / "bad.parquet"), STORAGE)
