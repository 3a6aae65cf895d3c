"""Export a manifest for Open-Sora: the CSV its dataset code reads.

Open-Sora v1.0's `DatasetFromCSV` (opensora/datasets/datasets.py) reads a CSV with no header
row: column 0 is the video path (joined with its `root` argument when one is given), column 1
the caption, column 2 the frame count (tools/datasets/README.md: `path, caption, num_frames`).
Only ok rows with a caption are written, in manifest order; paths are absolute, or relative to
`root` when one is given (a row outside `root` is an error naming it: Open-Sora would join the
two into a path that does not exist). SoraFlow's `csv` source reads such a file back.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from soraflow.storage.layout import atomic_write_text
from soraflow.storage.data.manifest import read_rows


def export_opensora_csv(manifest: str | Path, out: str | Path, root: str | Path | None = None) -> dict:
    """Write `out`; returns {"out", "rows", "skipped", "root"} (skipped: rejected or caption-less rows)."""
    rows = read_rows(manifest)
    base = Path(root).expanduser().resolve() if root is not None else None
    if base is not None and not base.is_dir():
        raise FileNotFoundError(f"--root {root}: no such folder")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    written = skipped = 0
    for i, row in enumerate(rows):
        text = " ".join((row.get("text") or "").split())
        if row["status"] != "ok" or not text:
            skipped += 1
            continue
        path = Path(row["path"]).expanduser().resolve()
        if base is not None:
            if base not in path.parents:
                raise ValueError(
                    f"{manifest}: row {i} ({row.get('clip_id') or row['video_id']}): {path} is not under --root {base}"
                )
            value = os.path.relpath(path, base)
        else:
            value = str(path)
        writer.writerow([value, text, row.get("num_frames") or 0])
        written += 1
    if not written:
        raise ValueError(f"{manifest}: no ok rows with a caption to export ({len(rows)} rows in all)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buf.getvalue())
    return {"out": str(out.resolve()), "rows": written, "skipped": skipped, "root": str(base) if base else None}
