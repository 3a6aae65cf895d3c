"""The parameters every flow takes: which config, which overrides, which data root.

Flows take a config *reference* (a preset name or a YAML path) plus dotted overrides rather
than a config object, so a deployment's parameters stay short and readable in the Prefect UI
and `prefect deployment run ... --param overrides='["train.steps=50"]'` works.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, model_validator
from soraflow.configs.schema import SoraFlowConfig, load_config
from soraflow.storage.layout import DataRoot


class RunParams(BaseModel):
    config: str = Field("local", description="A preset name in configs/ or a YAML path.")
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides, e.g. train.steps=200.")
    data_root: str | None = Field(None, description="Data root; default $SORAFLOW_HOME, then the config's data.root.")

    @model_validator(mode="after")
    def _config_loads(self) -> "RunParams":
        self.load_config()  # a bad preset or key fails here, before any work starts
        return self

    def load_config(self) -> SoraFlowConfig:
        return load_config(self.config, self.overrides)

    def load(self) -> tuple[SoraFlowConfig, DataRoot]:
        cfg = self.load_config()
        return cfg, DataRoot(self.data_root or os.environ.get("SORAFLOW_HOME") or cfg.data.root)

    def with_overrides(self, *extra: str) -> "RunParams":
        return self.model_copy(update={"overrides": [*self.overrides, *extra]})
