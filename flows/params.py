"""The parameters every flow takes: which config, which overrides, which data root.

Flows take a config *reference* (a preset name or a YAML path) plus dotted overrides rather
than a config object, so a deployment's parameters stay short and readable in the Prefect UI
and `prefect deployment run ... --param overrides='["train.steps=50"]'` works.

The config is read and validated once per process: Prefect re-creates a flow's parameters from
their JSON for every (sub)flow call, so the validated config is kept by (reference, overrides,
the YAML file's size and mtime) and every flow and stage of a run shares that one object.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator
from soraflow.configs.loader import ConfigError, load_config, resolve_config_path
from soraflow.configs.schema import SoraFlowConfig
from soraflow.storage.layout import DataRoot

_LOADED: dict[tuple, SoraFlowConfig] = {}  # one validated config per (reference, overrides, file state)


def loaded_config(config: str, overrides: list[str]) -> SoraFlowConfig:
    """The validated config of a reference and its overrides, read once while its file is unchanged.

    Shared, so callers never change it in place (those that adapt it take a model_copy)."""
    st = resolve_config_path(config).stat()
    key = (config, tuple(overrides), st.st_size, st.st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = load_config(config, overrides)
    return _LOADED[key]


class RunParams(BaseModel):
    config: str = Field("local", description="A preset name in configs/ or a YAML path.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. train.steps=200.")
    data_root: str | None = Field(None, description="Data root; default $SORAFLOW_HOME, then the config's data.root.")
    _cfg: SoraFlowConfig | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _config_loads(self) -> "RunParams":
        self._cfg = loaded_config(self.config, self.overrides)  # a bad preset or key fails here, before any work starts
        return self

    @classmethod
    def checked(cls, config: str, overrides: list[str] | None = None, data_root: str | None = None) -> "RunParams":
        """The parameters, or the config's own ConfigError (one line for the user) instead of
        pydantic's wrapper of it."""
        try:
            return cls(config=config, overrides=overrides or [], data_root=data_root)
        except ValidationError as e:
            for err in e.errors():
                if isinstance(err.get("ctx", {}).get("error"), ConfigError):
                    raise err["ctx"]["error"] from None
            raise

    def load_config(self) -> SoraFlowConfig:
        """The validated config (loaded once, when these parameters were made)."""
        if self._cfg is None:  # made with model_construct, which skips validation
            self._cfg = loaded_config(self.config, self.overrides)
        return self._cfg

    def load(self) -> tuple[SoraFlowConfig, DataRoot]:
        cfg = self.load_config()
        return cfg, DataRoot(self.data_root or os.environ.get("SORAFLOW_HOME") or cfg.data.root)

    def with_overrides(self, *extra: str) -> "RunParams":
        """New parameters with `extra` overrides after these ones (their config is loaded anew)."""
        return RunParams(config=self.config, overrides=[*self.overrides, *extra], data_root=self.data_root)
