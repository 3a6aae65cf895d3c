"""The validated shape of a SoraFlow config: one pydantic model per YAML section.

Unknown keys are errors (extra="forbid"), so a typo names the file and the key. Reading a preset or
a YAML file with overrides into one of these is configs/loader.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- data + ingest


class DataConfig(Section):
    root: str = "./data"  # overridden by SORAFLOW_HOME when that is set


class SampleSourceConfig(Section):
    """The synthetic source: coloured shapes moving in known directions, served on loopback."""

    enabled: bool = False
    seed: int = 0
    hdvg_videos: int = 6  # multi-scene videos listed in hdvg_0.json
    pexels_videos: int = 6  # single-scene videos behind the Pexels-compatible API
    inter4k_videos: int = 0  # multi-scene, caption-less videos in an Inter4k-style zip
    scenes_per_video: int = 3
    scene_seconds: float = 2.0
    width: int = 96
    height: int = 64
    fps: float = 24.0


class SourceConfig(Section):
    """One data source. `url` is the metadata file, the zip link or the API base (hdvg, inter4k,
    pexels) or a remote list (csv, parquet); `path` is a local folder (folder) or list (csv, parquet)."""

    kind: Literal["hdvg", "inter4k", "pexels", "folder", "csv", "parquet"]
    url: str | None = None
    path: str | None = None
    max_videos: int | None = None  # None = all the source lists
    # hdvg: which video fetcher to use for a video URL ("auto": yt-dlp for YouTube, HTTP otherwise)
    fetcher: Literal["auto", "http", "yt-dlp"] = "auto"
    # pexels
    query: str | None = None  # None = the `popular` listing
    per_page: int = Field(15, ge=1, le=80)
    min_width: int = 0
    max_file_bytes: int = 200_000_000  # choose the best file that is no larger than this
    quality: Literal["sd", "hd", "uhd"] = "hd"  # preferred quality; falls back to what exists
    # csv / parquet: column names. The defaults read Open-Sora's CSV (path, text, ...; v1.0's
    # headerless path, caption, num_frames too) and video2dataset's lists (url, caption) as they are.
    path_column: str = "path"
    url_column: str = "url"
    caption_column: str | None = None  # None = "text", else "caption", whichever the file has

    @model_validator(mode="after")
    def _location_fits_kind(self) -> "SourceConfig":
        if self.kind in ("hdvg", "inter4k", "pexels") and not self.url:
            raise ValueError(f"source kind {self.kind!r} needs url")
        if self.kind == "folder" and (not self.path or self.url):
            raise ValueError("source kind 'folder' needs path (a local folder of videos) and no url")
        if self.kind in ("csv", "parquet") and bool(self.path) == bool(self.url):
            raise ValueError(
                f"source kind {self.kind!r} needs exactly one of path (a local file) or url (a remote one)"
            )
        return self


class HttpConfig(Section):
    timeout_s: float = 30.0  # per connect / per read
    max_retries: int = 5
    backoff_base_s: float = 1.0  # delay = base * 2**attempt, times a jitter in [0.5, 1.5)
    backoff_max_s: float = 60.0
    max_bytes: int = 4_000_000_000  # refuse bodies larger than this
    max_json_bytes: int = 20_000_000  # JSON API answers (a Pexels page), after decompression
    max_metadata_bytes: int = 1_000_000_000  # a metadata file (HD-VG's hdvg_0.json is 234 MB), after decompression
    deadline_s: float = 3600.0  # total wall time of one download, all attempts and waits included
    listing_deadline_s: float = 300.0  # total wall time of one JSON/metadata call
    max_attempts: int = 30  # requests per file, however much each one progressed
    max_transfer_factor: float = 4.0  # bytes received per file, at most this times its size
    max_redirects: int = 5
    # Hosts (names, IPs or CIDR networks) that may resolve to loopback/private/link-local
    # addresses; everything else must resolve to public addresses only.
    allow_hosts: list[str] = []
    secret_headers: list[str] = []  # headers besides Authorization/Cookie/X-API-Key never sent to another origin
    user_agent: str = "SoraFlow/0.1"

    @field_validator("deadline_s", "listing_deadline_s", "timeout_s")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0")
        return v


class SplitConfig(Section):
    detector: Literal["content", "adaptive"] = "content"  # Open-Sora v1.0 uses ContentDetector
    threshold: float | None = None  # None = PySceneDetect's default for the detector
    min_seconds: float = 1.0
    max_seconds: float = 5.0  # longer scenes are truncated, as Open-Sora v1.0 does
    fps: float = 30.0  # clips are re-encoded to this frame rate
    short_side: int = 512  # and scaled so that their shorter side is this


class CaptionConfig(Section):
    captioners: list[Literal["source", "llava"]] = ["source"]  # tried in this order; add "llava" with llava_path
    llava_path: str | None = None  # local directory of a LLaVA checkpoint (transformers format)
    batch_size: int = 4
    max_new_tokens: int = 128
    prompt: Literal["three_frames", "naive"] = "three_frames"

    @model_validator(mode="after")
    def _llava_needs_path(self) -> "CaptionConfig":
        if "llava" in self.captioners and not self.llava_path:
            raise ValueError(
                "captioner 'llava' needs caption.llava_path (a local LLaVA directory in transformers format)"
            )
        return self


class ScoreConfig(Section):
    motion: bool = True  # Farneback optical flow magnitude -> `flow`
    aesthetic_clip_path: str | None = None  # open_clip weights (local file)
    aesthetic_clip_model: str = "ViT-L-14"
    aesthetic_head_path: str | None = None  # linear/MLP head weights (safetensors)
    min_flow: float | None = None  # rows below are rejected with the reason
    min_aes: float | None = None


class IngestConfig(Section):
    sources: list[SourceConfig] = []
    sample_source: SampleSourceConfig = SampleSourceConfig()
    http: HttpConfig = HttpConfig()
    split: SplitConfig = SplitConfig()
    caption: CaptionConfig = CaptionConfig()
    score: ScoreConfig = ScoreConfig()
    shard_size: int = 32  # rows per Prefect task
    task_runner: Literal["threads", "ray"] = "threads"
    max_workers: int = 2
    ray_address: str | None = None


# ---------------------------------------------------------------- models


class VideoConfig(Section):
    num_frames: int = 16
    frame_interval: int = 3
    image_size: tuple[int, int] = (256, 256)  # (H, W)
    fps: float = 8.0  # of generated videos (24 / frame_interval in Open-Sora v1.0)


class ModelConfig(Section):
    preset: str = "STDiT-XL/2"  # a key of models.stdit.STDIT_PRESETS
    # (t, h, w) latent voxels per token; None = the preset's (Open-Sora v1.0: 1 x 2 x 2)
    patch_size: list[PositiveInt] | None = Field(None, min_length=3, max_length=3)
    space_scale: float = 1.0
    time_scale: float = 1.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True  # IDDPM learns the variance; rectified flow sets this False
    drop_path: float = 0.0
    # where the temporal position embedding enters STDiT: attention (block 0's temporal attention
    # input, Open-Sora v1.0) | stream (the residual stream at the input, as the spatial one)
    temporal_pos: Literal["attention", "stream"] = "attention"
    grad_checkpoint: bool = False
    from_pretrained: str | None = None  # SoraFlow safetensors dir or Open-Sora .pth


class TinyT5Config(Section):
    """The random T5-v1.1-layout encoder built when text_encoder.path is empty (models/text_encoder.py)."""

    d_model: int = 64  # C_text, the caption channels STDiT's y_embedder takes in
    num_layers: int = 2
    num_heads: int = 2  # must divide d_model
    d_ff: int = 128  # gated-GELU hidden width
    vocab_size: int = 512  # of the unigram tokenizer trained on the built-in corpus


class TextEncoderConfig(Section):
    path: str | None = None  # local T5 directory; None = the tiny T5 built under the data root
    max_length: int = 120
    tiny: TinyT5Config = TinyT5Config()


class TinyVaeConfig(Section):
    block_out_channels: list[int] = [32, 64, 64]  # 2**(len-1) = 4x spatial downsampling
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16


class VaeFitConfig(Section):
    steps: int = 300
    batch_size: int = 32  # frames
    lr: float = 2e-3
    kl_weight: float = 1e-6
    # fp32 | bf16: the fit's forward and backward under torch.autocast(bfloat16) (oneDNN's bf16
    # convolutions on CPUs with AVX512-BF16/AMX); the weights, AdamW state and the saved VAE stay fp32.
    precision: Literal["fp32", "bf16"] = "fp32"


class VaeConfig(Section):
    path: str | None = None  # local AutoencoderKL directory (sd-vae-ft-ema); None = fit the tiny one
    micro_batch_size: int | None = None  # frames per VAE call
    scaling_factor: float = 0.18215
    tiny: TinyVaeConfig = TinyVaeConfig()
    fit: VaeFitConfig = VaeFitConfig()


class SchedulerConfig(Section):
    type: Literal["iddpm", "rflow"] = "iddpm"
    num_sampling_steps: int = 100
    cfg_scale: float = 7.0
    num_train_timesteps: int = 1000
    shift: float = Field(
        1.0, gt=0
    )  # rflow only: tau' = s tau / (1 + (s - 1) tau), s > 1 trains and samples nearer noise
    logit_std: float = Field(
        1.0, gt=0
    )  # rflow only: training times logit-normal(ln shift, logit_std); > 1 reaches mid and high noise more often
    # Sampling (and the VAE decode after it) under torch.autocast: bf16 matmuls where the CPU has them.
    sample_precision: Literal["fp32", "bf16"] = "fp32"


# ---------------------------------------------------------------- training + after


class TrainConfig(Section):
    run_name: str = "stdit"
    steps: int = 1000
    batch_size: int = 8  # per worker
    lr: float = 2e-5
    # constant (Open-Sora v1.0) | cosine: linear warm-up over warmup_steps, then cosine decay to
    # lr_min_ratio * lr at train.steps. Computed from the step alone, so a resumed run follows it.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    lr_min_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    seed: int = 42
    num_workers: int = 0  # Ray Train workers; 0 = in this process (Ray local mode)
    # In this process: split each batch over this many threads, one torch thread each, and sum
    # their gradients (tasks/train/thread_parallel.py). Ignored on more than one Ray worker.
    batch_threads: int = Field(1, ge=1)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fp32 | bf16 (a bf16 working copy of the model, fp32 master weights and AdamW state:
    # tasks/train/precision.py) | autocast (torch.autocast over forward and backward).
    precision: Literal["fp32", "bf16", "autocast"] = "fp32"
    ckpt_every: int = 250
    log_every: int = 10
    max_failures: int = 2  # worker restarts from the last checkpoint
    use_latent_cache: bool = True
    val_fraction: float = 0.1
    ray_address: str | None = None
    dataloader_workers: int = 0


# The metrics each evaluation scorer adds (tasks/eval_scorers.py); val_loss is always computed.
ALWAYS_METRICS = ("val_loss",)
SCORER_METRICS: dict[str, tuple[str, ...]] = {
    # the synthetic world's prompt adherence (captions from its colour/shape/direction vocabulary)
    "adherence": tuple(
        f"{p}_{a}" for p in ("adherence", "recon_adherence") for a in ("color", "shape", "direction", "all")
    )
    + ("adherence_shape_fixed", "adherence_all_fixed"),
    # open_clip text-video similarity (cosine x 100, CLIPScore's scale) of samples to their prompts
    "clip_similarity": ("clip_score", "recon_clip_score"),
}


class EvalConfig(Section):
    num_prompts: int = 8
    samples_per_prompt: int = Field(1, ge=1)  # seeds per prompt; adherence is averaged over all samples
    sampling_steps: int | None = None  # None = scheduler.num_sampling_steps
    scorers: list[Literal["adherence", "clip_similarity"]] = []  # beyond val loss and samples, which always run
    clip_path: str | None = None  # clip_similarity: local open_clip weights (.safetensors or .pt state dict)
    clip_model: str = "ViT-B-32"  # clip_similarity: the open_clip model name the weights are for
    metric: str = "val_loss"  # compared against the champion's
    higher_is_better: bool = False
    seed: int = 1234

    @model_validator(mode="after")
    def _scorers_produce_metric(self) -> "EvalConfig":
        if "clip_similarity" in self.scorers and not self.clip_path:
            raise ValueError("scorer 'clip_similarity' needs eval.clip_path (local open_clip weights)")
        produced = [*ALWAYS_METRICS, *(m for s in self.scorers for m in SCORER_METRICS[s])]
        if self.metric not in produced:
            owner = next((s for s, ms in SCORER_METRICS.items() if self.metric in ms), None)
            hint = f"add {owner!r} to eval.scorers" if owner else f"use one of {', '.join(produced)}"
            raise ValueError(
                f"champion metric {self.metric!r} is not produced by the configured scorers {self.scorers}: {hint}"
            )
        return self


class RegistryConfig(Section):
    tracking_uri: str | None = None  # None = sqlite under <data root>/registry
    model_name: str = "soraflow-stdit"
    experiment: str = "soraflow"


class GenerateConfig(Section):
    steps: int | None = None  # None = scheduler.num_sampling_steps
    cfg_scale: float | None = None
    seed: int = 42
    output_dir: str | None = None  # None = <data root>/outputs/samples


class SoraFlowConfig(Section):
    name: str = "soraflow"
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    video: VideoConfig = VideoConfig()
    model: ModelConfig = ModelConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    vae: VaeConfig = VaeConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    generate: GenerateConfig = GenerateConfig()

    @field_validator("video")
    @classmethod
    def _video_positive(cls, v: VideoConfig) -> VideoConfig:
        if v.num_frames < 1 or v.frame_interval < 1 or min(v.image_size) < 1:
            raise ValueError("num_frames, frame_interval and image_size must be positive")
        return v

    @model_validator(mode="after")
    def _adherence_needs_synthetic_captions(self) -> "SoraFlowConfig":
        own = [s.kind for s in self.ingest.sources if s.kind in ("folder", "csv", "parquet")]
        if (
            "adherence" in self.eval.scorers
            and own
            and len(own) == len(self.ingest.sources)
            and not self.ingest.sample_source.enabled
        ):
            raise ValueError(
                "eval.scorers 'adherence' scores only the synthetic sample's captions, "
                f"and every source here is your own footage ({', '.join(own)}): "
                "set eval.scorers to [] (or [clip_similarity]) and eval.metric to val_loss"
            )
        return self

    @model_validator(mode="after")
    def _sigma_matches_scheduler(self) -> "SoraFlowConfig":
        if self.scheduler.type == "rflow" and self.model.pred_sigma:
            raise ValueError("model.pred_sigma must be false with scheduler.type 'rflow' (it predicts a velocity only)")
        for key in ("shift", "logit_std"):
            value = getattr(self.scheduler, key)
            if self.scheduler.type != "rflow" and value != 1.0:
                raise ValueError(f"scheduler.{key}={value} applies to scheduler.type 'rflow' only; "
                                 f"set it to 1.0 for {self.scheduler.type!r}")
        return self
