"""One `soraflow train` builds every part in one place and reads everything once.

A tiny run of the command (in this process, its own temporary Prefect server) with the loaders
counted: the config is read once, the manifest once, no clip is probed (the manifest holds the
frame counts), the VAE and the T5 are loaded once for the latent cache and once from the exported
model folder by evaluation (never only to learn the STDiT's shape), the model card is written
once, and the loss history travels in the training result. Trained with
`scheduler.logit_std != 1`, evaluation draws its timesteps from the training distribution.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from soraflow.storage.layout import DataRoot
from training_data import make_clip_manifest
from typer.testing import CliRunner

SETS = ["train.steps=4", "train.batch_size=2", "train.num_workers=0", "train.ckpt_every=4", "train.log_every=2",
        "vae.fit.steps=4", "vae.fit.batch_size=8", "eval.num_prompts=2", "eval.sampling_steps=3", "eval.scorers=[]",
        "eval.metric=val_loss", "eval.higher_is_better=false", "scheduler.logit_std=2.0", "train.run_name=once"]


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """(the command's JSON, counts of each load, the (logit_std, shift) each scheduler sampled timesteps with)."""
    import soraflow.flows.params as params
    import soraflow.storage.data.manifest as manifest
    import soraflow.storage.data.video_io as video_io
    import soraflow.storage.registry.model_card as model_card
    from soraflow.flows.cli import app
    from soraflow.models.diffusion.rflow import RFlow
    from soraflow.models.text_encoder import T5TextEncoder
    from soraflow.models.vae import VideoVAE

    base = tmp_path_factory.mktemp("reads-once")
    root = DataRoot(base / "data")
    clips = make_clip_manifest(base / "clips", root, n=10, frames=12)
    counts: Counter = Counter()
    sampled: dict[int, tuple[float, float]] = {}
    mp = pytest.MonkeyPatch()

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        mp.setattr(module, name, wrapper)

    mp.setattr(params, "_LOADED", {})  # earlier tests in this process may have loaded the same config
    counting(params, "load_config", "config")
    counting(manifest, "read_manifest", "manifest")
    counting(video_io, "probe_video", "probe")
    counting(model_card, "model_card_text", "model card")
    vae_load, t5_init, draw = VideoVAE.from_pretrained.__func__, T5TextEncoder.__init__, RFlow.sample_timesteps

    def vae_from(cls, path, *a, **k):
        counts["vae from the model folder" if Path(path).name == "vae" else "vae"] += 1
        return vae_load(cls, path, *a, **k)

    def t5_from(self, path, *a, **k):
        counts["t5 from the model folder" if Path(path).name == "text_encoder" else "t5"] += 1
        t5_init(self, path, *a, **k)

    def sample_timesteps(self, *a, **k):
        sampled[id(self)] = (self.logit_std, self.shift)
        return draw(self, *a, **k)

    mp.setattr(VideoVAE, "from_pretrained", classmethod(vae_from))
    mp.setattr(T5TextEncoder, "__init__", t5_from)
    mp.setattr(RFlow, "sample_timesteps", sample_timesteps)
    try:
        args = [
            "train",
            "--manifest",
            str(clips),
            "--root",
            str(root.root),
            "--json",
            *[x for s in SETS for x in ("--set", s)],
        ]
        out = CliRunner().invoke(app, args)
    finally:
        mp.undo()
    assert out.exit_code == 0, f"exit {out.exit_code}:\n{out.output}\n{out.exception!r}"
    return json.loads(out.stdout), counts, sampled


def test_every_part_is_read_once(counted):
    result, counts, _ = counted
    assert result["steps"] == 4 and result["registered_version"] == 1
    assert counts == {"config": 1, "manifest": 1, "vae": 1, "t5": 1, "vae from the model folder": 1,
                      "t5 from the model folder": 1, "model card": 1}, counts


def test_evaluation_samples_the_training_timestep_distribution(counted):
    _, _, sampled = counted
    assert len(sampled) >= 2, sampled  # the training loop's scheduler and the one evaluation loaded from the folder
    assert set(sampled.values()) == {(2.0, 3.0)}, sampled  # logit_std as configured, the preset's shift
