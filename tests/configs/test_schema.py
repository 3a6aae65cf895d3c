from pathlib import Path

import pytest
from soraflow.configs.loader import CONFIG_DIR, ConfigError, config_hash, load_config


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert cfg.name == preset


def test_opensora_preset_has_v1_values():
    cfg = load_config("opensora-v1-16x256x256")
    assert cfg.model.preset == "STDiT-XL/2"
    assert (cfg.video.num_frames, cfg.video.frame_interval, tuple(cfg.video.image_size)) == (16, 3, (256, 256))
    assert cfg.text_encoder.max_length == 120
    assert cfg.vae.path.endswith("sd-vae-ft-ema")
    assert (cfg.scheduler.type, cfg.scheduler.num_sampling_steps, cfg.scheduler.cfg_scale) == ("iddpm", 100, 7.0)
    assert (cfg.train.lr, cfg.train.ema_decay, cfg.train.grad_clip) == (2e-5, 0.9999, 1.0)


def test_unknown_key_names_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "train.stepz" in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_names_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(bad)


def test_malformed_yaml_names_file(tmp_path: Path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(bad)


def test_top_level_must_be_mapping(tmp_path: Path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_overrides_apply_and_validate():
    cfg = load_config("local", ["train.steps=7", "video.image_size=[16, 16]"])
    assert cfg.train.steps == 7 and tuple(cfg.video.image_size) == (16, 16)
    with pytest.raises(ConfigError, match="override"):
        load_config("local", ["train.steps"])
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_config("local", ["train.nope=1"])


def test_rflow_requires_no_sigma():
    with pytest.raises(ConfigError, match="pred_sigma"):
        load_config("local", ["scheduler.type=rflow", "model.pred_sigma=true"])
    assert load_config("local", ["scheduler.type=rflow", "model.pred_sigma=false"]).scheduler.type == "rflow"
    with pytest.raises(ConfigError, match="shift"):
        load_config("local", ["scheduler.type=iddpm", "model.pred_sigma=true", "scheduler.shift=3"])
    with pytest.raises(ConfigError, match="logit_std"):
        load_config(
            "local", ["scheduler.type=iddpm", "model.pred_sigma=true", "scheduler.shift=1", "scheduler.logit_std=2"]
        )


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match="local"):
        load_config("no-such-preset")


def test_config_hash_is_stable_and_sensitive():
    a, b = load_config("local"), load_config("local")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config("local", ["train.steps=3"]))


def test_llava_captioner_needs_a_path():
    with pytest.raises(ConfigError, match="llava_path"):
        load_config("local", ["ingest.caption.captioners=[source, llava]"])


def test_patch_size_overrides_the_preset_and_reaches_the_model():
    from soraflow.models.stdit import STDIT_PRESETS, build_stdit
    from soraflow.models.vae import VideoVAE, build_tiny_vae
    from soraflow.storage.model_parts import latent_size, stdit_kwargs

    cfg = load_config("local", {"model.patch_size": [2, 2, 2], "model.preset": "STDiT-Tiny"})
    vae = VideoVAE(build_tiny_vae(**cfg.vae.tiny.model_dump(), seed=0))
    model = build_stdit(cfg.model.preset, **stdit_kwargs(cfg, latent_size(cfg, vae), 64))
    assert model.patch_size == (2, 2, 2) and model.num_temporal == cfg.video.num_frames // 2
    # unset: the preset's own patch (Open-Sora v1.0's 1 x 2 x 2)
    plain = load_config("local", {"model.patch_size": None})
    assert "patch_size" not in stdit_kwargs(plain, latent_size(plain, vae), 64)
    assert STDIT_PRESETS["STDiT-Tiny"]["patch_size"] == [1, 2, 2]
    with pytest.raises(ConfigError, match="model.patch_size"):
        load_config("local", {"model.patch_size": [2, 2]})
