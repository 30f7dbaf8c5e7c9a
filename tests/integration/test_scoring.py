"""Batch scoring with Ray Data against the same predictor the endpoint uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lensmill.config import load_config
from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.scoring import score_dataset
from lensmill.shards import dataset_uri_for, load_split, write_shards


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("scoring")
    cfg = load_config(
        None,
        [f"storage.root={root}", "sim.n_train=8", "sim.n_val=8", "sim.n_test=40", "sim.image_size_px=32",
         "sim.rows_per_shard=16"],
    )  # fmt: skip
    write_shards(cfg)
    members = [
        Member(f"tiny-{i}", LensClassifier("tiny", 1, mean=[0.0], std=[1.0], scale=[0.3]), w)
        for i, w in enumerate((0.7, 0.3))
    ]
    predictor = EnsemblePredictor(members, (1, 32, 32), 0.5, {"dataset_id": "test"})
    predictor.save(root / "ensemble")
    return cfg, root


def test_scores_every_row_like_the_predictor(tiny):
    cfg, root = tiny
    out = score_dataset(cfg, "test", model_dir=root / "ensemble")
    assert out["rows"] == 40
    table = pq.read_table(out["out_uri"]).sort_by("row_id")
    images, labels, params = load_split(out["dataset_uri"], "test", cfg.storage)
    order = np.argsort(params.column("row_id").to_numpy())
    expected = EnsemblePredictor.load(root / "ensemble").predict(images[order])
    np.testing.assert_allclose(table.column("p_lens").to_numpy(), expected["p_lens"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[order])
    assert {"predicted_label", "spread", "p_member_0", "p_member_1"} <= set(table.column_names)
    assert "image" not in table.column_names


def test_rerun_overwrites_instead_of_appending(tiny):
    cfg, root = tiny
    first = score_dataset(cfg, "test", model_dir=root / "ensemble")
    second = score_dataset(cfg, "test", model_dir=root / "ensemble")
    assert second["rows"] == first["rows"] == 40


def test_model_that_does_not_fit_the_data_is_refused(tiny, tmp_path):
    cfg, _ = tiny
    wrong = EnsemblePredictor(
        [Member("m", LensClassifier("tiny", 3, [0.0] * 3, [1.0] * 3), 1.0)], (3, 32, 32)
    )
    wrong.save(tmp_path / "wrong")
    with pytest.raises(Exception, match=r"model takes images \(3, 32, 32\), dataset has \(1, 32, 32\)"):
        score_dataset(cfg, "test", model_dir=tmp_path / "wrong")


# -- catalog scoring: unlabelled cutouts --------------------------------------------------------------


def _write_cutouts(folder, images) -> dict[str, np.ndarray]:
    """NPY, FITS and 8-bit PNG files of (1, 32, 32) images, one corrupt PNG and one of the wrong
    shape; returns what each readable file decodes to, by its name."""
    from astropy.io import fits
    from PIL import Image

    folder.mkdir(parents=True)
    decoded = {}
    for i, img in enumerate(images):
        if i % 3 == 0:
            name = f"a/cut-{i:02d}.npy"
            (folder / "a").mkdir(exist_ok=True)
            np.save(folder / name, img)
            decoded[name] = img
        elif i % 3 == 1:
            name = f"cut-{i:02d}.fits"
            fits.PrimaryHDU(img[0]).writeto(folder / name)
            decoded[name] = img
        else:
            name = f"cut-{i:02d}.png"
            counts = np.clip(img[0] * 40 + 128, 0, 255).astype(np.uint8)
            Image.fromarray(counts, mode="L").save(folder / name)
            decoded[name] = counts[None].astype(np.float32)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    np.save(folder / "small.npy", np.zeros((1, 16, 16), np.float32))
    return decoded


def test_a_folder_of_unlabelled_cutouts_with_a_corrupt_file_is_scored_and_resumed(tiny, tmp_path):
    from lensmill.catalog import CatalogError, score_catalog

    cfg, root = tiny
    images = load_split(dataset_uri_for(cfg), "test", cfg.storage)[0][:19]
    decoded = _write_cutouts(tmp_path / "cutouts", images)
    out = tmp_path / "scores"
    drill = load_config(
        None, [f"storage.root={root}", "scoring.rows_per_part=6", "scoring.fail_after_parts=2"]
    )
    with pytest.raises(RuntimeError, match="drill interruption"):
        score_catalog(drill, str(tmp_path / "cutouts"), str(out), root / "ensemble")
    assert len(list(out.glob("part-*.parquet"))) == 2

    again = load_config(None, [f"storage.root={root}", "scoring.rows_per_part=6"])
    result = score_catalog(again, str(tmp_path / "cutouts"), str(out), root / "ensemble")
    # 21 files in 4 parts: the 2 written before the interruption are kept, 2 are scored now.
    assert (result["parts_reused"], result["parts_scored_now"], result["rows"]) == (2, 2, 21)
    assert result["complete"] and result["unreadable"] == 2

    table = pq.read_table(out).sort_by("object_id")
    ids = table.column("object_id").to_pylist()
    assert ids == sorted([*decoded, "broken.png", "small.npy"])
    errors = dict(zip(ids, table.column("error").to_pylist(), strict=True))
    assert "not a PNG image" in errors["broken.png"] and "broken.png" in errors["broken.png"]
    assert "image shape [1, 16, 16] differs from the model's [1, 32, 32]" in errors["small.npy"]
    p_lens = dict(zip(ids, table.column("p_lens").to_pylist(), strict=True))
    assert p_lens["broken.png"] is None and p_lens["small.npy"] is None
    names = sorted(decoded)
    expected = EnsemblePredictor.load(root / "ensemble").predict(np.stack([decoded[n] for n in names]))
    np.testing.assert_allclose([p_lens[n] for n in names], expected["p_lens"], rtol=1e-5, atol=1e-6)
    labels = dict(zip(ids, table.column("label").to_pylist(), strict=True))
    assert [labels[n] for n in names] == expected["label"].tolist()
    assert all(errors[n] == "" for n in names)

    # The best-ranked readable cutouts, drawn from their files, for inspection by eye (and MLflow).
    from lensmill.candidates import candidates

    shown = candidates(again, str(out), 5, tmp_path / "cands")
    best = sorted(names, key=lambda n: -p_lens[n])[:5]
    page = Path(shown["html"]).read_text()
    assert shown["shown"] == 5 and shown["mlflow_run_id"]
    assert [page.index(f"<td>{n}</td>") for n in best] == sorted(page.index(f"<td>{n}</td>") for n in best)
    assert "broken.png" not in page and page.count("data:image/png;base64,") == 5
    assert Path(shown["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CatalogError, match="not the output of a catalog scoring run"):
        candidates(again, str(tmp_path / "cutouts"), 5)

    # Complete: a rerun scores nothing; another input into the same output is refused.
    assert (
        score_catalog(again, str(tmp_path / "cutouts"), str(out), root / "ensemble")["parts_scored_now"] == 0
    )
    (tmp_path / "cutouts" / "extra.npy").write_bytes((tmp_path / "cutouts" / "small.npy").read_bytes())
    with pytest.raises(CatalogError, match="holds scores of another input"):
        score_catalog(again, str(tmp_path / "cutouts"), str(out), root / "ensemble")


def test_a_catalog_stacks_per_band_fits_files_and_keeps_ids_and_coordinates(tiny, tmp_path):
    from astropy.io import fits

    from lensmill.catalog import score_catalog

    cfg, root = tiny
    two_band = EnsemblePredictor(
        [Member("m", LensClassifier("tiny", 2, [0.0, 0.0], [1.0, 1.0], [0.3, 0.3]), 1.0)], (2, 32, 32), 0.5
    )
    two_band.save(tmp_path / "model")
    rng = np.random.default_rng(0)
    rows, stacked = [], []
    (tmp_path / "bands").mkdir()
    for i in range(5):
        g, r = rng.normal(0, 1, (2, 32, 32)).astype(np.float32)
        fits.PrimaryHDU(g).writeto(tmp_path / "bands" / f"{i}_g.fits")
        if i != 3:  # object 3's r-band file is missing
            fits.PrimaryHDU(r).writeto(tmp_path / "bands" / f"{i}_r.fits")
            stacked.append(np.stack([g, r]))
        rows.append(f"EUC-{i:04d},{150.1 + i / 100},{2.2 - i / 100},bands/{i}_g.fits,bands/{i}_r.fits")
    csv = tmp_path / "catalog.csv"
    csv.write_text("object_id,ra,dec,path_g,path_r\n" + "\n".join(rows) + "\n")
    result = score_catalog(cfg, str(csv), str(tmp_path / "out"), tmp_path / "model")
    assert (result["rows"], result["unreadable"]) == (5, 1)
    table = pq.read_table(tmp_path / "out").sort_by("object_id")
    assert table.column("object_id").to_pylist() == [f"EUC-{i:04d}" for i in range(5)]
    np.testing.assert_allclose(table.column("ra").to_numpy(), [150.1 + i / 100 for i in range(5)])
    assert table.column("path_r").to_pylist()[3].endswith("bands/3_r.fits")
    assert "not found" in table.column("error").to_pylist()[3]
    ok = [i for i in range(5) if i != 3]
    expected = two_band.predict(np.stack(stacked))["p_lens"]
    got = table.column("p_lens").to_numpy(zero_copy_only=False)[ok]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
