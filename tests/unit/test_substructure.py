"""The substructure task: classes, shared nuisances, subhalo records, config errors, manifests, validate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

import lensmill
from lensmill.audit import validate_dataset
from lensmill.config import SUBSTRUCTURE_FIELDS, ConfigError, SimConfig, StorageConfig, load_config
from lensmill.layout import MANIFEST_FILE
from lensmill.metrics import roc_auc as class_auc
from lensmill.records import DatasetManifest, SplitCounts
from lensmill.shards import (
    SUBHALOS_TYPE,
    ShardWriter,
    _build_manifest,
    columns_for,
    dataset_id_for,
    load_split,
    read_manifest,
    render_shard,
    shard_specs,
    write_manifest,
)
from lensmill.simulate import (
    PARAM_KEYS,
    SUBHALO_FIELDS,
    SUBSTRUCTURE_KEYS,
    SUBSTRUCTURE_UNITS,
    Simulator,
    class_counts,
    label_for,
    row_label,
    row_rng,
)

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "jobs" / "configs" / "substructure.yaml"
# The preset, small: 32x32 Euclid VIS pixels (3.2") and Einstein radii that fit in them.
SUB = load_config(
    PRESET,
    ["sim.image_size_px=32", "sim.theta_e_arcsec={min: 0.6, max: 0.9}", "sim.n_train=60", "sim.n_val=7",
     "sim.n_test=6", "sim.rows_per_shard=25"],
).sim  # fmt: skip
# Parameters measured on the lensed source, which the substructure changes.
ARC_KEYS = ("magnification", "arc_snr", "source_flux_e_per_s")


@pytest.fixture(scope="module")
def simulator() -> Simulator:
    return Simulator(SUB)


def _lens_twin(sim: SimConfig) -> SimConfig:
    """The lens-task config with the same lens, source, instrument and nuisance settings."""
    return SimConfig.model_validate(
        {k: v for k, v in sim.identity().items() if k not in {"task", *SUBSTRUCTURE_FIELDS}}
    )


def _write_dataset(sim: SimConfig, root: Path) -> tuple[str, StorageConfig]:
    """A dataset written in-process with the real shard writer and manifest (no Ray)."""
    storage = StorageConfig(root=str(root))
    dataset_id = dataset_id_for(sim)
    uri = str(root / dataset_id)
    writer = ShardWriter(sim.model_dump(mode="json"), uri, storage.model_dump(mode="json"), dataset_id)
    entries = [writer.write(spec) for spec in shard_specs(sim)]
    write_manifest(uri, _build_manifest(sim, dataset_id, entries), storage)
    return uri, storage


# -- classes and labels --------------------------------------------------------------------------


def test_classes_interleave_and_counts_per_split_are_exact() -> None:
    assert SUB.classes == ("no_sub", "cdm", "vortex") and SimConfig().classes == ("non-lens", "lens")
    labels = np.array([row_label(SUB, r) for r in range(300)])
    assert labels[:6].tolist() == [0, 1, 2, 0, 1, 2]
    for n in (1, 2, 3, 7, 100, 299):
        assert class_counts(SUB, n) == tuple(np.bincount(labels[:n], minlength=3))
    # The lens task's labels and counts are those of before.
    lens = SimConfig(positive_fraction=0.3)
    assert [row_label(lens, r) for r in range(50)] == [label_for(r, 0.3) for r in range(50)]
    assert class_counts(lens, 50) == (35, 15)


def test_manifest_records_classes_and_class_counts(tmp_path: Path) -> None:
    uri, storage = _write_dataset(SUB, tmp_path)
    manifest = read_manifest(uri, storage)
    assert manifest.classes == SUB.classes
    assert {s: c.class_counts for s, c in manifest.splits.items()} == {
        "train": (20, 20, 20), "val": (3, 2, 2), "test": (2, 2, 2),
    }  # fmt: skip
    # positives: rows whose label is not 0, for readers that predate classes.
    assert (manifest.splits["val"].positives, manifest.splits["val"].negatives) == (4, 3)
    assert [f.class_counts for f in manifest.split_files("train")] == [(9, 8, 8), (8, 9, 8), (3, 3, 4)]
    assert manifest.columns == columns_for(SUB) and manifest.columns[-1] == "subhalos"
    # The in-process reader hands the list column over with the other parameters.
    images, labels, table = load_split(uri, "val", storage)
    assert images.shape == (7, 1, 32, 32) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert table.schema.field("subhalos").type == SUBHALOS_TYPE


def test_old_manifest_without_classes_still_loads(tmp_path: Path) -> None:
    old = {
        "dataset_id": "old", "image_shape": [1, 8, 8],
        "splits": {"train": {"rows": 4, "positives": 1}},
        "files": [{"path": "train/part-00000.parquet", "split": "train", "rows": 4, "positives": 1}],
    }  # fmt: skip
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(old))
    manifest = read_manifest(str(tmp_path), StorageConfig(root=str(tmp_path)))
    assert manifest.classes is None and manifest.class_names == ("non-lens", "lens")
    assert manifest.splits["train"] == SplitCounts(rows=4, positives=1, negatives=3)
    assert manifest.splits["train"].class_counts is None and manifest.files[0].class_counts is None
    assert DatasetManifest.model_validate_json(manifest.model_dump_json()) == manifest


# -- physics: shared nuisances, substructure only where its class shows it ---------------------------


def test_the_three_classes_share_every_draw_but_the_substructure(simulator: Simulator) -> None:
    shared = [k for k in PARAM_KEYS if k not in ARC_KEYS]
    for row in (3, 4):
        systems = [simulator.sample(row_rng(1, "train", row), c) for c in range(3)]
        models = [simulator.render(row_rng(1, "train", row), c, noise=False) for c in range(3)]
        noisy = [simulator.render(row_rng(1, "train", row), c)[0] for c in range(3)]
        params = [p for _, p in models]
        assert all({k: p[k] for k in shared} == pytest.approx({k: params[0][k] for k in shared}, nan_ok=True)
                   for p in params)  # fmt: skip
        # Lens light, companions and seeing are bit-identical; only the lensed source changes.
        lens = [simulator.render_components(s)[0] for s in systems]
        assert lens[0].tobytes() == lens[1].tobytes() == lens[2].tobytes()
        # The same noise draws: each image's residual over its own sigma is the same normal sample.
        pulls = [
            (n - m).astype(np.float64) / np.sqrt(simulator.variance(m.astype(np.float64)))
            for n, (m, _) in zip(noisy, models, strict=True)
        ]
        np.testing.assert_allclose(pulls[1], pulls[0], atol=1e-2)
        np.testing.assert_allclose(pulls[2], pulls[0], atol=1e-2)
        # The substructure moves the arcs, near the Einstein ring, and nowhere else.
        theta_e = params[0]["theta_e_arcsec"]
        yy, xx = np.indices(lens[0].shape[1:]) - (lens[0].shape[1] - 1) / 2
        r_arcsec = np.hypot(xx, yy) * SUB.pixel_scale_arcsec
        for c in (1, 2):
            diff = np.abs(models[c][0] - models[0][0])[0]
            assert diff.max() > 5 * simulator._bkg_sigma[0]
            assert 0.4 * theta_e < (diff * r_arcsec).sum() / diff.sum() < 1.6 * theta_e


def test_no_sub_is_the_lens_task_positive(simulator: Simulator) -> None:
    lens = Simulator(_lens_twin(SUB))
    for row in range(3):
        a, pa_ = simulator.render(row_rng(2, "val", row), 0, noise=False)
        b, pb = lens.render(row_rng(2, "val", row), 1, noise=False)
        # Zero-mass point-mass slots deflect by exactly 0: the very same pixels.
        assert a.tobytes() == b.tobytes()
        assert {k: pa_[k] for k in PARAM_KEYS} == pytest.approx(pb, nan_ok=True)


# -- records ------------------------------------------------------------------------------------------


def test_substructure_units_follow_the_naming_rules() -> None:
    assert tuple(SUBSTRUCTURE_UNITS) == SUBSTRUCTURE_KEYS and not set(SUBSTRUCTURE_KEYS) & set(PARAM_KEYS)
    for key, unit in SUBSTRUCTURE_UNITS.items():
        assert key.endswith("_arcsec") == (unit == "arcsec"), key
        assert key.endswith("_rad") == (unit == "rad"), key
        assert key.startswith("n_") == (unit == "count"), key


def test_subhalo_parameters_agree_with_the_list_column(simulator: Simulator) -> None:
    table = render_shard(simulator, "train", 0, 15)
    assert table.schema.names == list(columns_for(SUB))
    assert table.schema.field("subhalos").type == SUBHALOS_TYPE
    rows = table.drop_columns(["image"]).to_pylist()
    for row in rows:
        subs, theta_e = row["subhalos"], row["theta_e_arcsec"]
        assert all(set(s) == set(SUBHALO_FIELDS) for s in subs)
        mass = sum(s["theta_e_arcsec"] ** 2 for s in subs) / theta_e**2
        cls = SUB.classes[row["label"]]
        if cls == "no_sub":
            assert subs == [] and row["n_subhalos"] == 0 and row["subhalo_mass_fraction"] == 0
        if cls != "vortex":
            assert all(math.isnan(row[k]) for k in SUBSTRUCTURE_KEYS if k.startswith("vortex_"))
        if cls == "cdm":
            assert row["n_subhalos"] == len(subs) > 0
            assert row["subhalo_mass_fraction"] == pytest.approx(mass, rel=1e-9)
            assert row["subhalo_theta_e_max_arcsec"] == pytest.approx(max(s["theta_e_arcsec"] for s in subs))
            for s in subs:
                m = (s["theta_e_arcsec"] / theta_e) ** 2
                assert SUB.subhalo_mass_min_frac * (1 - 1e-9) <= m <= SUB.subhalo_mass_max_frac * (1 + 1e-9)
                r = math.hypot(s["x_arcsec"] - row["lens_x_arcsec"], s["y_arcsec"] - row["lens_y_arcsec"])
                assert SUB.subhalo_radius_min_frac - 1e-9 <= r / theta_e <= SUB.subhalo_radius_max_frac + 1e-9
        if cls == "vortex":
            assert row["n_subhalos"] == 0 and math.isnan(row["subhalo_theta_e_max_arcsec"])
            assert row["n_vortex_masses"] == len(subs) == SUB.n_vortex_masses
            assert row["vortex_mass_fraction"] == pytest.approx(mass, rel=1e-9)
            xy = np.array([(s["x_arcsec"], s["y_arcsec"]) for s in subs])
            # Equal masses on a straight segment of the recorded length, angle and centre.
            assert np.ptp([s["theta_e_arcsec"] for s in subs]) < 1e-12
            assert np.hypot(*(xy[-1] - xy[0])) == pytest.approx(row["vortex_length_arcsec"])
            direction = (xy[-1] - xy[0]) / row["vortex_length_arcsec"]
            angle = row["vortex_angle_rad"]
            assert direction == pytest.approx([math.cos(angle), math.sin(angle)])
            assert xy.mean(axis=0) == pytest.approx([row["vortex_x_arcsec"], row["vortex_y_arcsec"]])


# -- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["sim.task=substructures"], ["sim.task", "substructure"]),
        (["sim.task=substructure", "sim.n_subhalo_mean=3"], ["sim.n_subhalo_mean", "unknown key"]),
        (
            ["sim.task=substructure", "sim.subhalo_mass_min_frac=0.05", "sim.subhalo_mass_max_frac=0.01"],
            ["sim.subhalo_mass_min_frac", "must be below"],
        ),
        (["sim.task=substructure", "sim.subhalo_mass_max_frac=2"], ["sim.subhalo_mass_max_frac", "1"]),
        (
            ["sim.task=substructure", "sim.vortex_mass_fraction={min: 0.5, max: 1.5}"],
            ["sim.vortex_mass_fraction", "must lie in"],
        ),
        (
            ["sim.task=substructure", "sim.n_subhalos_mean=60", "sim.n_subhalos_max=64"],
            ["sim.n_subhalos_max", "clip"],
        ),
        (["sim.task=substructure", "sim.positive_fraction=0.3"], ["sim.positive_fraction", "task lens only"]),
        (["sim.task=substructure", "sim.hard_negatives=true"], ["sim.hard_negatives", "task lens only"]),
        (["sim.n_subhalos_mean=5"], ["sim.n_subhalos_mean", "task substructure only"]),
    ],
)
def test_bad_substructure_settings_name_the_field(overrides: list[str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for name in names:
        assert name in str(err.value)


# The dataset id of the default SimConfig and its identity's keys before the substructure task.
LENS_ID_BEFORE = {"0.1.0": "3e92b143e5ea"}
LENS_IDENTITY_KEYS = {
    "bands", "ccd_gain", "companion_ellipticity", "companion_mag", "companion_n_sersic",
    "companion_r_sersic_arcsec", "companion_red_fraction", "exposure_time_s", "hard_negatives",
    "image_size_px", "instrument", "instrument_coadd_years", "interloper_offset_frac", "lens2_flux_frac",
    "lens2_n_sersic", "lens2_r_sersic_arcsec", "lens_center_max_arcsec", "lens_colors_mag",
    "lens_ellipticity", "lens_gamma", "lens_light_components", "lens_mag", "lens_mass_model",
    "lens_n_sersic", "lens_r_sersic_arcsec", "magnitude_zero_point", "n_companions_max", "n_test",
    "n_train", "n_val", "num_exposures", "observing", "pixel_scale_arcsec", "positive_fraction",
    "psf_fwhm_arcsec", "psf_fwhm_scale", "read_noise_e", "rows_per_shard", "seed", "shear_strength",
    "sky_brightness_mag_arcsec2", "source_clump_flux_frac", "source_clump_sigma_arcsec",
    "source_clump_spread", "source_clumps_max", "source_colors_mag", "source_ellipticity", "source_mag",
    "source_n_sersic", "source_offset_max_frac", "source_r_sersic_arcsec", "supersampling",
    "theta_e_arcsec",
}  # fmt: skip


def test_lens_task_identity_pixels_and_columns_are_unchanged() -> None:
    sim = SimConfig()
    assert set(sim.identity()) == LENS_IDENTITY_KEYS
    assert set(SUB.identity()) == LENS_IDENTITY_KEYS | {"task", *SUBSTRUCTURE_FIELDS}
    if lensmill.__version__ in LENS_ID_BEFORE:  # the id hashes lensmill's version too
        assert dataset_id_for(sim) == LENS_ID_BEFORE[lensmill.__version__]
    assert columns_for(sim) == ("image", "label", "split", "row_id", "seed", *PARAM_KEYS)
    small = SimConfig(image_size_px=32)
    table = render_shard(Simulator(small), "train", 0, 6)
    assert table.schema.names == list(columns_for(small))
    # Images and parameters of rows 0-5 as the code before the substructure task (bf27ac9^) rendered
    # them: per row the image's sum, peak and peak pixel, the parameters' sum of magnitudes and NaN
    # count. Figures to a tolerance, not a hash of the bytes: the last bits of lenstronomy's floats
    # differ between CPUs (the old hash held on an Intel Xeon, not on an AMD EPYC, old code or new).
    before = [
        (2779.196, 32.6841, 495, 3823.577595, 7),
        (1676.102, 30.7504, 527, 2140.021456, 14),
        (2233.184, 32.9624, 527, 3063.730213, 7),
        (1023.111, 11.4705, 495, 1429.864801, 14),
        (1898.665, 18.471, 371, 2721.980972, 7),
        (1482.133, 20.7135, 527, 1992.353026, 14),
    ]
    simulator = Simulator(small)
    for r, (total, peak, at, params_abs, params_nan) in enumerate(before):
        image, p = simulator.render(row_rng(0, "train", r), label_for(r, 0.5))
        values = np.array(list(p.values()), dtype=np.float64)
        assert float(image.astype(np.float64).sum()) == pytest.approx(total, rel=1e-5), r
        assert float(image.max()) == pytest.approx(peak, rel=1e-5) and int(image.argmax()) == at, r
        assert float(np.nansum(np.abs(values))) == pytest.approx(params_abs, rel=1e-6), r
        assert int(np.isnan(values).sum()) == params_nan, r


# -- validate -------------------------------------------------------------------------------------------


def test_class_auc_is_the_binary_auc_for_two_classes_and_macro_ovr_above() -> None:
    rng = np.random.default_rng(0)
    y2 = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.3 * (y2 - 0.5) + rng.normal(0, 0.3, 200), 0, 1)
    assert class_auc(y2, np.column_stack([1 - p1, p1])) == pytest.approx(roc_auc_score(y2, p1))
    y3 = np.arange(300) % 3
    logits = rng.normal(0, 1, (300, 3)) + np.eye(3)[y3]
    p3 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ovr = np.mean([roc_auc_score(y3 == c, p3[:, c]) for c in range(3)])
    assert class_auc(y3, p3) == pytest.approx(ovr)


def test_validate_a_tiny_substructure_dataset(tmp_path: Path) -> None:
    uri, storage = _write_dataset(SUB, tmp_path)
    report = validate_dataset(uri, storage, max_shortcut_auc=0.8)  # 60 rows: a noisy AUC
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"], report["checks"]
    assert report["classes"] == ["no_sub", "cdm", "vortex"]
    assert report["class_counts"]["train"] == {
        "positives": 40, "negatives": 20, "per_class": {"no_sub": 20, "cdm": 20, "vortex": 20}, "ratio": 1.0,
    }  # fmt: skip
    assert checks["value_ranges"]["detail"].startswith("labels in {0, 1, 2}")
    assert report["shortcut_rows"] == 60 and 0.0 <= report["shortcut_auc"] <= 1.0

    # A label out of range and a subhalo list that disagrees with its summary are reported.
    shard = Path(uri) / "train/part-00000.parquet"
    import pyarrow.parquet as pq

    table = pq.read_table(shard)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 3
    subs = table.column("subhalos").to_pylist()
    subs[1] = subs[1][:-1]  # row 1 is cdm: one subhalo fewer than n_subhalos says
    table = table.set_column(1, "label", pa.array(labels)).set_column(
        table.schema.get_field_index("subhalos"), "subhalos", pa.array(subs, SUBHALOS_TYPE)
    )
    pq.write_table(table, shard)
    detail = {c["name"]: c for c in validate_dataset(uri, storage)["checks"]}["value_ranges"]["detail"]
    assert "labels [3] (expected 0..2)" in detail and "subhalos lists do not hold" in detail
