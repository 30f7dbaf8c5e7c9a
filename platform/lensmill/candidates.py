"""``lensmill candidates``: the best-ranked cutouts of a catalog scoring run, for inspection by eye.

Reads the parts ``lensmill predict --input ... --output URI`` wrote, ranks the readable cutouts by
``p_lens`` (or, for a C-class model, the ``p_<class>`` column given) and draws the top N from their
files (decoded again by ``lensmill.images``) in the asinh stretch of ``lensmill preview``: a PNG
grid with rank, object id, RA/Dec and score on each tile, and an HTML page (one inline tile per
candidate, with its path and per-member spread) that a team can open and annotate. Both are logged
to MLflow when tracking is on.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from lensmill.catalog import CATALOG_RECORD, CatalogError, decode_cutout
from lensmill.config import Config
from lensmill.preview import asinh_gray, asinh_rgb, rgb_channels
from lensmill.storage import absolute_uri, is_s3, join_uri, locate, read_json


def top_candidates(
    output_uri: str, cfg: Config, n: int, by: str | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """The ``n`` readable rows with the highest score ``by`` (best first; default ``p_lens``, the
    lens finder's; a C-class run names one of its ``p_<class>`` columns), and the run's record with
    ``ranked_by`` set."""
    uri = absolute_uri(output_uri)
    try:
        record = read_json(join_uri(uri, CATALOG_RECORD), cfg.storage)
    except Exception as exc:
        raise CatalogError(f"{uri}: not the output of a catalog scoring run ({exc})") from None
    scores = record.get("score_columns", ["p_lens"])
    by = by or ("p_lens" if scores == ["p_lens"] else None)
    if by not in scores:
        raise CatalogError(f"{uri}: rank by one of its score columns {scores} (--by), not {by!r}")
    record = {**record, "ranked_by": by}
    loc = locate(uri, cfg.storage)
    dataset = pads.dataset(loc.path, filesystem=loc.filesystem, format="parquet")
    columns = ["object_id", "ra", "dec", *record["path_columns"], by, "spread"]
    keys = [(by, "descending"), ("object_id", "ascending")]
    best: pa.Table | None = None
    # A running top n over the parts' batches: memory stays at n rows plus one batch at survey scale.
    for batch in dataset.to_batches(columns=columns, filter=pc.field(by).is_valid()):
        table = (
            pa.Table.from_batches([batch])
            if best is None
            else pa.concat_tables([best, pa.Table.from_batches([batch])])
        )
        best = table.take(pc.sort_indices(table, sort_keys=keys)[:n])
    if best is None or best.num_rows == 0:
        raise CatalogError(f"{uri}: no scored cutouts")
    return best, record


def _tile(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) or (H, W, 3) in [0, 1]: preview's RGB composite from 3+ bands (bands in
    the file's order, bluest first), else band 0."""
    channels = rgb_channels([f"band{c}" for c in range(image.shape[0])])
    return asinh_rgb(image[channels]) if channels else asinh_gray(image[0])


def _caption(rank: int, row: dict[str, Any], by: str) -> str:
    where = ""
    if row["ra"] is not None and row["dec"] is not None:
        where = f"\nRA {row['ra']:.5f} Dec {row['dec']:+.5f}"
    return f"#{rank} {row['object_id']}{where}\n{by.removeprefix('p_')}: {row[by]:.4f}"


def render_candidates(table: pa.Table, record: dict[str, Any], out_dir: Path, cfg: Config) -> list[Path]:
    """``candidates.png`` (the grid) and ``candidates.html`` in ``out_dir``; returns both paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.image import imsave

    rows = table.to_pylist()
    images = [decode_cutout([r[c] for c in record["path_columns"]], cfg.storage) for r in rows]
    cols = min(8, max(1, math.ceil(math.sqrt(len(rows)))))
    grid_rows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(cols * 1.6 + 0.3, grid_rows * 1.85 + 0.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    by = record["ranked_by"]
    fig.suptitle(f"Top {len(rows)} candidates by {by} — {record['model']}, asinh stretch", fontsize=9)
    axes = fig.subplots(grid_rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    tiles = []
    for k, (row, image) in enumerate(zip(rows, images, strict=True)):
        tile = _tile(image)
        ax = axes.flat[k]
        ax.imshow(tile, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(_caption(k + 1, row, by), fontsize=5.5, loc="left", pad=2)
        buf = io.BytesIO()
        imsave(buf, tile, cmap="gray", vmin=0, vmax=1, origin="lower", format="png")
        tiles.append(base64.b64encode(buf.getvalue()).decode())
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "candidates.png"
    fig.savefig(png, format="png")
    page = out_dir / "candidates.html"
    page.write_text(_html(rows, tiles, record))
    return [png, page]


def _html(rows: list[dict[str, Any]], tiles: list[str], record: dict[str, Any]) -> str:
    def coord(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    body = "\n".join(
        f"<tr><td>{k + 1}</td><td><img src='data:image/png;base64,{tile}' width='128'></td>"
        f"<td>{html.escape(str(r['object_id']))}</td><td>{coord(r['ra'], '.6f')}</td>"
        f"<td>{coord(r['dec'], '+.6f')}</td><td>{r[record['ranked_by']]:.5f}</td><td>{r['spread']:.4f}</td>"
        f"<td>{'<br>'.join(html.escape(str(r[c])) for c in record['path_columns'])}</td></tr>"
        for k, (r, tile) in enumerate(zip(rows, tiles, strict=True))
    )
    title = f"Lens candidates: top {len(rows)} of {html.escape(record['input_uri'])}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif}td{padding:4px 8px;vertical-align:middle}"
        "img{image-rendering:pixelated}</style></head><body>"
        f"<h1>{title}</h1><p>Model {html.escape(record['model'])}; threshold "
        f"{record['threshold']:.4f}; asinh stretch as in <code>lensmill preview</code>.</p>"
        "<table><tr><th>rank</th><th>cutout</th><th>object id</th><th>RA [deg]</th><th>Dec [deg]</th>"
        f"<th>{record['ranked_by']}</th><th>spread</th><th>files</th></tr>\n{body}\n</table></body></html>\n"
    )


def candidates(
    cfg: Config, output_uri: str, n: int = 64, out_dir: Path | None = None, by: str | None = None
) -> dict[str, Any]:
    """The ``lensmill candidates`` stage: grid and page of the top ``n`` by ``by``, then an MLflow run."""
    from lensmill import tracking

    table, record = top_candidates(output_uri, cfg, n, by)
    by = record["ranked_by"]
    uri = absolute_uri(output_uri)
    # In the scores folder under a leading underscore, which Parquet dataset readers skip.
    out = Path(out_dir) if out_dir else (Path(uri) if not is_s3(uri) else Path.cwd()) / "_candidates"
    paths = render_candidates(table, record, out, cfg)
    summary: dict[str, Any] = {
        "output_uri": uri,
        "model": record["model"],
        "shown": table.num_rows,
        "ranked_by": by,
        f"{by}_range": [table.column(by)[-1].as_py(), table.column(by)[0].as_py()],
        "png": str(paths[0]),
        "html": str(paths[1]),
        "mlflow_run_id": None,
    }
    if cfg.tracking.tracking_uri or not is_s3(cfg.storage.root):
        with tracking.run(
            cfg, f"candidates-{record['input_sha256'][:12]}", "candidates", None,
            params={"output_uri": uri, "top_n": n, "model": record["model"]},
        ) as run_id:  # fmt: skip
            tracking.log_artifacts(cfg, run_id, paths, "candidates")
        summary["mlflow_run_id"] = run_id
    return summary
