"""Beside the stages, the writers: a scan's files into `--out DIR`, each atomically (temp file + rename).

DIR/report.json, DIR/trigger.png (the recovered trigger, enlarged; trigger-N-LABEL.png for further
targets), DIR/victims.csv,
DIR/compact/ (images + pairs.csv with image,caption,source), and DIR/report.<ext> for the chosen format.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np

from auditor.data import Dataset
from auditor.files import atomic_write
from auditor.report import Report, render_html, render_json
from auditor.scan.pipeline import COMPACT_DIR, TRIGGER_FILE, ScanResult

# DESIGN's image,caption plus the data file each pair came from (repair holds those out).
COMPACT_COLUMNS = ("image", "caption", "source")
EXTENSIONS = {"json": "json", "markdown": "md", "sarif": "sarif", "html": "html"}


def png_bytes(pixels: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_outputs(result: ScanResult, out: Path, fmt: str, dataset: Dataset) -> list[Path]:
    """Write every file of the scan into `out`; returns the paths written."""
    report = result.report
    written = [out / "report.json"]
    atomic_write(written[0], render_json(report).encode())
    for name, pixels in result.triggers.items():  # trigger.png for the strongest finding
        atomic_write(out / name, png_bytes(pixels, max(1, 128 // max(1, pixels.shape[0]))))
        written.append(out / name)
    for name, overlay in result.overlays.items():  # read back with allow_pickle=False
        buffer = io.BytesIO()
        np.save(buffer, overlay.astype(np.float32), allow_pickle=False)
        atomic_write(out / name, buffer.getvalue())
        written.append(out / name)
    atomic_write(out / "victims.csv", _victims_csv(report).encode())
    written.append(out / "victims.csv")
    if result.compact:
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(COMPACT_COLUMNS)
        for pair in result.compact:
            atomic_write(out / COMPACT_DIR / pair.name, png_bytes(pair.image))
            writer.writerow([pair.name, pair.caption, pair.source])
        atomic_write(out / COMPACT_DIR / "pairs.csv", rows.getvalue().encode())
        written.append(out / COMPACT_DIR)
    if fmt == "html":
        page = render_html(report, html_images(result, dataset))
        atomic_write(out / "report.html", page.encode())
        written.append(out / "report.html")
    return written


def _victims_csv(report: Report) -> str:
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["path", "predicted", "oracle_label", "x0", "y0", "x1", "y1", "score", "flipped"])
    for v in report.victims:
        box = list(v.trigger_box) if v.trigger_box else ["", "", "", ""]
        writer.writerow([v.path, v.predicted, v.oracle_label or "", *box, v.score, int(v.flipped)])
    return rows.getvalue()


def html_images(result: ScanResult, dataset: Dataset, limit: int = 60) -> dict[str, str]:
    """data: URIs for the trigger and the first `limit` victims, their boxes drawn in red."""
    from PIL import Image, ImageDraw

    from auditor.data import ImageDecodeError, Sample

    uris = {}
    for name, pixels in result.triggers.items():
        uris[name] = _data_uri(png_bytes(pixels, max(1, 128 // max(1, pixels.shape[0]))))
    if TRIGGER_FILE in uris:
        uris["trigger"] = uris[TRIGGER_FILE]
    for victim in result.report.victims[:limit]:
        try:
            image = dataset.load(Sample(victim.path))
        except ImageDecodeError:
            continue
        image = image.resize((128, round(128 * image.height / image.width)), Image.Resampling.NEAREST)
        if victim.trigger_box:
            x0, y0, x1, y1 = victim.trigger_box
            ImageDraw.Draw(image).rectangle(
                (x0 * image.width, y0 * image.height, x1 * image.width - 1, y1 * image.height - 1),
                outline=(255, 0, 0),
                width=2,
            )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uris[victim.path] = _data_uri(buffer.getvalue())
    return uris


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
