"""The model registry: MLflow runs and registered model versions, pickle-free.

    <data root>/registry/mlflow.db        tracking + registry backend (sqlite), unless
                                          cfg.tracking_uri points at a shared server
    <data root>/registry/artifacts/       run artifacts (the experiment's artifact_location,
                                          so nothing lands in ./mlruns)

A registered version is an MLflow model (pyfunc, "models from code"): the python model is the
file storage/registry/mlflow_model.py, the weights are the model folder (safetensors + JSON config, see
storage/registry/model_folder.py) as its artifact `model_dir`, with a signature (prompts in, videos out).
It is logged as an MLflow 3 LoggedModel of the training run and registered from there, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` loads it and nothing is pickled. Each
version carries tags: dataset_version, config_hash, code_version and every evaluation metric
as `metric.<name>`. Versions registered before (a plain folder as the run artifact "model")
still load, download and compete for `champion`.

The `champion` alias marks the version that `generate` uses by default; the evaluate
step moves it with `promote_if_better`, a person with `promote`.

MLflow takes seconds to import, so it is imported inside the methods: importing this
module is cheap. Telemetry is switched off before MLflow is first imported.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from soraflow.configs.schema import RegistryConfig
from soraflow.storage.checkpoints import CheckpointError, refuse_pickles
from soraflow.storage.layout import DataRoot
from soraflow.storage.registry.mlflow_model import (
    load_pyfunc_pipeline,
    log_pyfunc_model,
    model_dir_in,
)
from soraflow.storage.registry.tracking import RunLog

# No network from MLflow: no usage telemetry, no artifact progress bars on stderr.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the logged model's name (and the run-artifact folder of older versions)
MODEL_ID_TAG = "soraflow.model_id"  # on a run: the LoggedModel registered from it
METRIC_TAG = "metric."
LINEAGE_TAGS = ("dataset_version", "config_hash")  # required in register(tags=...)
_READY_TIMEOUT_S = 120.0


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message names the model and the reference."""


@dataclass
class ModelVersionInfo:
    name: str
    version: int
    run_id: str | None
    metrics: dict[str, float]  # from the version's metric.<name> tags
    tags: dict[str, str]  # every other version tag (dataset_version, config_hash, code_version, ...)
    aliases: list[str] = field(default_factory=list)
    source: str = ""  # the artifact URI the version was registered from
    created: str = ""  # UTC, ISO 8601
    status: str = ""  # READY once MLflow has the files


def _mlflow():
    """Import MLflow (slow) with telemetry off, also when someone imported it before us."""
    import mlflow
    from mlflow.telemetry import get_telemetry_client, set_telemetry_client

    if get_telemetry_client() is not None:
        set_telemetry_client()  # re-reads MLFLOW_DISABLE_TELEMETRY and drops the client
    return mlflow


class ModelRegistry(RunLog):
    """Runs (tracking.RunLog) and versions of one registered model (cfg.model_name) in one MLflow backend."""

    def __init__(self, root: DataRoot, cfg: RegistryConfig | None = None):
        self.root = root
        self.cfg = cfg or RegistryConfig()
        self.name = self.cfg.model_name
        self.tracking_uri = self.cfg.tracking_uri or f"sqlite:///{root.registry / 'mlflow.db'}"
        self.artifact_dir = root.registry / "artifacts"
        self._client = None
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return f"ModelRegistry({self.name!r}, {self.tracking_uri!r})"

    # ------------------------------------------------------------ backend

    @property
    def _is_local(self) -> bool:
        """A backend whose artifacts we place under the data root (not a tracking server's)."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))

    @property
    def client(self):
        if self._client is None:
            _mlflow()
            from mlflow import MlflowClient

            if self.tracking_uri.startswith("sqlite:///"):
                Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The experiment cfg.experiment, created with its artifacts under <root>/registry/artifacts."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                location = None
                if self._is_local:
                    self.artifact_dir.mkdir(parents=True, exist_ok=True)
                    location = self.artifact_dir.as_uri()
                try:
                    self._experiment_id = self.client.create_experiment(self.cfg.experiment, artifact_location=location)
                except Exception:  # created meanwhile by another process
                    exp = self.client.get_experiment_by_name(self.cfg.experiment)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # ------------------------------------------------------------ versions

    def register(self, run_id: str, model_dir: str | Path, metrics: dict[str, float] | None = None,
                 tags: dict[str, Any] | None = None, step: int | None = None) -> ModelVersionInfo:
        """Log `model_dir` as the run's "model" artifacts and register it as a new version.

        `tags` must hold dataset_version and config_hash; code_version is added here. Every metric is logged
        on the run (at `step`, e.g. the last training step) and set as the version tag metric.<name>.
        """
        model_dir = Path(model_dir)
        self._check_model_dir(model_dir)
        metrics = dict(metrics or {})
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
        if bad:
            raise RegistryError(f"{self.name}: metrics must be numbers, got {bad}")
        tags = {k: str(v) for k, v in (tags or {}).items()}
        missing = [k for k in LINEAGE_TAGS if not tags.get(k)]
        if missing:
            raise RegistryError(f"{self.name}: register() needs the lineage tag(s) {missing} in tags")
        from soraflow.storage import code_version

        tags.setdefault("code_version", code_version())
        tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()})

        if (self.client.get_run(run_id).data.tags.get(MODEL_ID_TAG)
                or self.client.list_artifacts(run_id, MODEL_ARTIFACT)):  # a version's files never change
            raise RegistryError(f"{self.name}: run {run_id} already holds a registered model; register from a new run")
        model = log_pyfunc_model(self.client, self.experiment_id, run_id, model_dir, MODEL_ARTIFACT)
        self._check_model_dir(model_dir)  # unchanged while MLflow copied it
        self.client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
        if metrics:
            self.log_metrics(run_id, metrics, step=step)
        self._ensure_registered_model()
        mv = self.client.create_model_version(self.name, source=model.artifact_location, run_id=run_id, tags=tags,
                                              model_id=model.model_id)
        mv = self._wait_ready(mv.version)
        return self._info(mv, self._aliases())

    def _check_model_dir(self, model_dir: Path) -> None:
        if not model_dir.is_dir():
            raise RegistryError(f"{self.name}: model folder {model_dir} does not exist")
        self._refuse_pickles(model_dir, "register safetensors + JSON only")
        files = [p for p in model_dir.rglob("*") if p.is_file()]
        if not any(p.suffix == ".safetensors" for p in files) or not any(p.suffix == ".json" for p in files):
            raise RegistryError(f"{self.name}: {model_dir} must hold safetensors weights and a JSON config")

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, description="SoraFlow STDiT text-to-video model folders (safetensors + JSON)")
            except MlflowException:  # created meanwhile by another process
                self.client.get_registered_model(self.name)

    def _wait_ready(self, version: str | int, timeout_s: float = _READY_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            mv = self.client.get_model_version(self.name, str(version))
            if mv.status == "READY":
                return mv
            if mv.status == "FAILED_REGISTRATION":
                raise RegistryError(f"{self.name} v{version}: registration failed: {mv.status_message}")
            if time.monotonic() > deadline:
                raise RegistryError(f"{self.name} v{version}: still {mv.status} after {timeout_s:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _aliases(self) -> dict[int, list[str]]:
        """version -> its aliases (search results do not carry them)."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException:
            return {}
        out: dict[int, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            out.setdefault(int(version), []).append(alias)
        return {v: sorted(a) for v, a in out.items()}

    def _info(self, mv, aliases: dict[int, list[str]]) -> ModelVersionInfo:
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        for k, v in (mv.tags or {}).items():
            if k.startswith(METRIC_TAG):
                try:
                    metrics[k[len(METRIC_TAG) :]] = float(v)
                except ValueError:
                    tags[k] = v
            else:
                tags[k] = v
        created = ""
        if mv.creation_timestamp:
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000,
                                             tz=timezone.utc).isoformat(timespec="seconds")
        return ModelVersionInfo(
            name=mv.name,
            version=int(mv.version),
            run_id=mv.run_id,
            metrics=metrics,
            tags=tags,
            aliases=aliases.get(int(mv.version), []),
            source=mv.source or "",
            created=created,
            status=str(mv.status),
        )

    # ------------------------------------------------------------ look-up

    def list_versions(self) -> list[ModelVersionInfo]:
        """Every version of the model, oldest first, with aliases; [] before the first register."""
        aliases = self._aliases()
        escaped = self.name.replace("'", "\\'")
        found = []
        token = None
        while True:
            page = self.client.search_model_versions(f"name='{escaped}'", max_results=1000, page_token=token)
            found.extend(page)
            token = getattr(page, "token", None)
            if not token:
                break
        return sorted((self._info(mv, aliases) for mv in found), key=lambda i: i.version)

    def get(self, ref: str | int) -> ModelVersionInfo:
        """ref: "champion" or another alias, a version number ("3" or "v3"), or "latest"."""
        from mlflow.exceptions import MlflowException

        ref_s = str(ref).strip()
        aliases = self._aliases()
        if ref_s == "latest":
            versions = self.list_versions()
            if not versions:
                raise RegistryError(f"model {self.name!r} has no versions yet (ref 'latest')")
            return versions[-1]
        number = ref_s[1:] if ref_s[:1] in ("v", "V") and ref_s[1:].isdigit() else ref_s
        try:
            if number.isdigit():
                mv = self.client.get_model_version(self.name, number)
            else:
                mv = self.client.get_model_version_by_alias(self.name, ref_s)
        except MlflowException as e:
            kind = "version" if number.isdigit() else "alias"
            known = ", ".join(f"{a}=v{v}" for v, names in sorted(aliases.items()) for a in names) or "none"
            raise RegistryError(f"model {self.name!r} has no {kind} {ref_s!r} (aliases: {known}): {e.message}") from e
        return self._info(mv, aliases)

    def download(self, ref: str | int, dest_dir: str | Path) -> Path:
        """Copy a version's model folder to `dest_dir`; returns the folder with the safetensors + config
        (the MLflow model's artifact `model_dir`, or the whole folder of a version registered before)."""
        info = self.get(ref)
        local = self._download(info, Path(dest_dir))
        return model_dir_in(local) or local

    def _download(self, info: ModelVersionInfo, dest_dir: Path, reuse: bool = False) -> Path:
        """The version's files under `dest_dir`; with `reuse`, a pyfunc model already there (a
        folder kept for this one version) is not downloaded again.

        The URI is resolved here with our own client: MLflow's models:/ resolution (3.17)
        ignores the registry_uri argument and reads the process-wide registry URI, which
        would open ./mlflow.db in the current directory.
        """
        from mlflow.artifacts import download_artifacts

        local = (next((p.parent for p in sorted(dest_dir.rglob("MLmodel"))), None)
                 if reuse and dest_dir.is_dir() else None)
        if local is None:
            uri = self.client.get_model_version_download_uri(self.name, str(info.version))
            dest_dir.mkdir(parents=True, exist_ok=True)
            local = Path(download_artifacts(artifact_uri=uri, dst_path=str(dest_dir), tracking_uri=self.tracking_uri,
                                            registry_uri=self.tracking_uri))
        self._refuse_pickles(local, f"v{info.version} as downloaded is not loaded")
        return local

    def _refuse_pickles(self, folder: Path, consequence: str) -> None:
        """storage.checkpoints.refuse_pickles, as a RegistryError naming this model."""
        try:
            refuse_pickles(folder)
        except CheckpointError as e:
            raise RegistryError(f"{self.name}: {e}; {consequence}") from None

    def load_pipeline(self, ref: str | int = CHAMPION, base=None, num_frames: int | None = None):
        """(TextToVideo, where its weights came from) for a registered version, loaded through its
        MLflow pyfunc model as `mlflow.pyfunc.load_model` does (`soraflow generate --model` uses this).

        `base` (a SoraFlowConfig) keeps the caller's data and generate sections; `num_frames`
        rebuilds the pipeline for another clip length from the same folder.
        """
        from soraflow.storage.registry.model_folder import load_model_folder

        info = self.get(ref)
        local = self._download(info, self.root.tmp / "registry" / f"{self.name}-v{info.version}", reuse=True)
        where = f"registry {self.name} v{info.version} ({ref}; run {info.run_id})"
        if not (local / "MLmodel").is_file():  # registered before versions were MLflow models
            return load_model_folder(local, base, num_frames)[0], f"{where}, model folder {local}"
        return load_pyfunc_pipeline(local, base, num_frames), f"{where}, MLflow model {local}"

    # ------------------------------------------------------------ aliases

    def promote(self, version: str | int, alias: str = CHAMPION) -> ModelVersionInfo:
        """Point `alias` at `version` (by hand); returns the version's info."""
        from mlflow.exceptions import MlflowException

        info = self.get(str(version))
        if not alias or alias == "latest" or (alias[:1] in "vV" and alias[1:].isdigit()) or alias.isdigit():
            raise RegistryError(f"model {self.name!r}: {alias!r} cannot be an alias (it reads as a version reference)")
        try:
            self.client.set_registered_model_alias(self.name, alias, str(info.version))
        except MlflowException as e:
            raise RegistryError(f"model {self.name!r}: cannot set alias {alias!r} to v{info.version}: "
                                f"{e.message}") from e
        return self.get(alias)

    def promote_if_better(self, version: str | int, metric: str, higher_is_better: bool) -> tuple[bool, str]:
        """Move `champion` to `version` only if there is none or its `metric` is strictly better.

        A candidate without the metric (or with a non-finite value) is never promoted. The
        decision is also written on the candidate as the version tag `champion_decision`.
        """
        cand = self.get(str(version))
        c_val = cand.metrics.get(metric)
        sense = "higher" if higher_is_better else "lower"
        try:
            champ = self.get(CHAMPION)
        except RegistryError:
            champ = None

        if c_val is None or not math.isfinite(c_val):
            promoted, reason = False, (f"candidate v{cand.version} has no finite {metric!r} (got {c_val}); "
                                       "champion unchanged")
        elif champ is None:
            promoted, reason = True, f"no champion yet; candidate v{cand.version} {metric}={c_val:.6g}"
        elif champ.version == cand.version:
            promoted, reason = False, f"v{cand.version} is already the champion ({metric}={c_val:.6g})"
        else:
            h_val = champ.metrics.get(metric)
            if h_val is None or not math.isfinite(h_val):
                promoted = True
                reason = (f"champion v{champ.version} has no finite {metric!r} (got {h_val}); "
                          f"candidate v{cand.version} {metric}={c_val:.6g}")
            else:
                better = c_val > h_val if higher_is_better else c_val < h_val
                promoted = better
                verdict = "beats" if better else "does not beat"
                reason = (f"candidate v{cand.version} {metric}={c_val:.6g} {verdict} "
                          f"champion v{champ.version} {metric}={h_val:.6g} ({sense} is better)")
        if promoted:
            self.promote(cand.version, CHAMPION)
        self.client.set_model_version_tag(self.name, str(cand.version), "champion_decision", reason[:5000])
        return promoted, reason
