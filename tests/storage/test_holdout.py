"""The held-out split: deterministic, disjoint, stable under new clips; a manifest read and split once."""

from __future__ import annotations

import pytest
from soraflow.storage.data.holdout import DatasetSplit, holdout_split
from soraflow.storage.layout import DataRoot
from soraflow.storage.data.manifest import dataset_version, new_row, ok_rows, write_manifest


def test_split_is_deterministic_disjoint_and_never_empty():
    rows = [{"clip_id": f"clip-{i}", "path": f"{i}.mp4"} for i in range(200)]
    train, val = holdout_split(rows, 0.15)
    assert {r["clip_id"] for r in train}.isdisjoint({r["clip_id"] for r in val})
    assert len(train) + len(val) == 200
    assert 15 <= len(val) <= 45  # about 30
    # a clip's side depends only on its id: adding clips never moves old ones
    train2, val2 = holdout_split(rows + [{"clip_id": f"new-{i}", "path": "x"} for i in range(50)], 0.15)
    assert {r["clip_id"] for r in val} <= {r["clip_id"] for r in val2}
    assert holdout_split(list(reversed(rows)), 0.15)[1] == list(reversed(val))
    # small data: at least one held out and one training clip
    tr, va = holdout_split(rows[:3], 0.01)
    assert len(va) == 1 and len(tr) == 2
    assert holdout_split(rows[:3], 0.0)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_split(rows, 1.0)
    with pytest.raises(ValueError, match="clip_id"):
        holdout_split([{"path": "a.mp4"}], 0.1)


def test_dataset_split_reads_a_manifest_once(tmp_path):
    root = DataRoot(tmp_path)
    rows = [new_row(path=f"{i}.mp4", clip_id=f"c{i}", video_id=f"v{i}", source="pexels", status="ok") for i in range(6)]
    rows.append(new_row(path="x.mp4", clip_id="bad", video_id="bad", source="pexels", status="rejected", error="404"))
    manifest = write_manifest(rows, "score", root)
    data = DatasetSplit.read(manifest, 0.3)
    assert data.version == dataset_version(manifest) and data.manifest == str(manifest)
    assert [r["clip_id"] for r in data.rows] == [r["clip_id"] for r in ok_rows(manifest)]  # manifest order, ok only
    train, val = holdout_split(ok_rows(manifest), 0.3)
    assert data.train == train and data.val == val and data.held_out == [r["clip_id"] for r in val]
    # it survives Prefect's JSON round trip (task parameters, cache keys)
    assert DatasetSplit.model_validate_json(data.model_dump_json()) == data
