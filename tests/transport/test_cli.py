"""`kvtier serve` validates its configuration at start and says what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _serve(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_bad_environment_variable_is_named() -> None:
    res = _serve({"KVTIER_GRPC_PORT": "70000"})
    assert res.returncode == 2
    assert "invalid configuration" in res.stderr and "grpc_port" in res.stderr


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "kvtier.json"
    cfg.write_text(json.dumps({"tiers": [{"name": "hot", "medium": "device", "codec": "none",
                                          "capacity_bytes": 1024, "high_watermark": 0.5,
                                          "low_watermark": 0.6}]}))
    res = _serve({}, "--config", str(cfg))
    assert res.returncode == 2
    assert "low_watermark (0.6) must be below high_watermark (0.5)" in res.stderr
    res = _serve({}, "--config", str(tmp_path / "missing.json"))
    assert res.returncode == 2 and "cannot read config file" in res.stderr


def test_the_example_config_loads_and_shows_every_setting() -> None:
    """deploy/kvtier.example.json: a config file a user can start from, naming every setting."""
    from pydantic import BaseModel

    from kvtier.config import Settings, load_settings

    path = Path(__file__).resolve().parents[2] / "deploy" / "kvtier.example.json"
    settings = load_settings(path)
    assert settings.redis.url and settings.policy.name == "learned"

    def names(model: type[BaseModel]) -> set[str]:
        return set(model.model_fields)

    data = json.loads(path.read_text())
    assert set(data) == names(Settings)
    for key in ("codec", "redis", "policy", "auth", "data"):
        field = Settings.model_fields[key].annotation
        assert isinstance(field, type) and set(data[key]) == names(field), key
