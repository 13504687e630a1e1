"""Where the local stack lives and how to reach it. Environment variables override every default."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    home: Path  # all local state: databases, artifacts, runs, logs, pids (git-ignored)
    host: str
    prefect_port: int
    mlflow_port: int
    work_pool: str

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            home=Path(env.get("TRAINYARD_HOME", ROOT / ".trainyard")).resolve(),
            host=env.get("TRAINYARD_HOST", "127.0.0.1"),
            prefect_port=int(env.get("TRAINYARD_PREFECT_PORT", "4200")),
            mlflow_port=int(env.get("TRAINYARD_MLFLOW_PORT", "5000")),
            work_pool=env.get("TRAINYARD_WORK_POOL", "trainyard-local"),
        )

    @property
    def prefect_ui(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_ui}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def warm_socket(self) -> Path:
        """The warm-start server's socket (infra/warm_start.py); a Unix socket path must stay under 108 bytes."""
        path = self.home / "warm-start.sock"
        if len(str(path)) < 100:
            return path
        return Path(tempfile.gettempdir()) / f"trainyard-{hashlib.sha1(str(self.home).encode()).hexdigest()[:12]}.sock"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to this stack (the worker, the CLI, the demo)."""
        return {
            "TRAINYARD_HOME": str(self.home),
            "TRAINYARD_ROOT": str(ROOT),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_UI_URL": self.prefect_ui,
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", self.mlflow_uri),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # Trainers log through these loggers; Prefect forwards them into the flow run's logs.
            "PREFECT_LOGGING_EXTRA_LOGGERS": "trainers,ultralytics,transformers",
            # ...and stays quiet about them when a trainer runs outside any flow (a script, a notebook).
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }
