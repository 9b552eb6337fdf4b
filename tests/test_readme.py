"""The README's quickstart and engine example run verbatim against `kvtier up`; the
configuration page's table is complete."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydantic import BaseModel

from kvtier.procs.redis import free_port
from kvtier.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIG_DOC = README.parent / "docs" / "configuration.md"  # the settings table lives there


def _snippet(heading: str) -> str:
    """The first python block of the README section whose heading starts with ``heading``."""
    section = README.read_text().split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README has no python block in its {heading} section"
    return match.group(1)


def _up(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``kvtier up`` started with ``env``; returns it and its banner once it is ready."""
    up = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "up", "--grace", "2"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert up.stdout is not None
    banner = []
    for line in up.stdout:
        banner.append(line)
        if line.startswith("kvtier: ready"):
            break
    text = "".join(banner)
    assert up.poll() is None, text
    return up, text


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env.update(KVTIER_GRPC_PORT=str(free_port()), KVTIER_HTTP_PORT=str(free_port()))
    return env


def _env_names(model: type[BaseModel], prefix: str = "KVTIER_") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names += _env_names(ann, f"{prefix}{name.upper()}__")
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def test_config_table_lists_every_setting() -> None:
    table = CONFIG_DOC.read_text().split("## Configuration", 1)[1]
    missing = [n for n in _env_names(Settings) if f"`{n}`" not in table]
    assert not missing, f"add these settings to the config table of {CONFIG_DOC.name}: {missing}"


def _anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings, as GitHub makes them."""
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_the_readme_and_the_docs_point_at_pages_that_exist() -> None:
    """The README is the front page and docs/ the rest: every page and section they point at
    is there."""
    pages = [README, README.parent / "CHANGELOG.md", *sorted((README.parent / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            if link.startswith(("http://", "https://")):
                continue
            path, _, anchor = link.partition("#")
            target = page.parent / path if path else page
            if not target.exists() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{page.name}: {link}")
    assert not broken, broken


def test_quickstart_runs_verbatim_against_kvtier_up(tmp_path: Path) -> None:
    env = _env()
    up, text = _up(env)
    try:
        assert f"gRPC  127.0.0.1:{env['KVTIER_GRPC_PORT']}" in text
        redis_url = re.search(r"Redis (redis://[\d.]+:(\d+)/0) \(private", text)
        assert redis_url, text
        script = tmp_path / "quickstart.py"
        script.write_text(_snippet("## Quickstart"))
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == "['stored', 'stored', 'stored', 'stored']"
        assert "prefix_length=4" in lines[1]
        assert lines[2] == "hot 16"
        assert lines[3] == "[True, True] 1"
        up.send_signal(signal.SIGINT)  # Ctrl-C stops the daemon and its redis-server
        out, _ = up.communicate(timeout=30)
        assert up.returncode == 0, out
        assert "kvtier: stopped" in out
        redis_port = int(redis_url.group(2))
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", redis_port)) != 0, "redis-server left running"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_engine_example_runs_verbatim_against_kvtier_up(tmp_path: Path) -> None:
    """The transformers example: the second prompt restores the shared system prompt."""
    env = _env()
    up, _ = _up(env)
    try:
        script = tmp_path / "engine.py"
        script.write_text(_snippet("## Engine integration"))
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        first, second = run.stdout.splitlines()[-2:]
        assert re.fullmatch(r"0 of \d+ prompt tokens restored", first), first
        restored, total = map(int, re.findall(r"\d+", second))
        assert restored == 640 and restored < total, second
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()


def test_up_without_redis_server_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env["PATH"] = "/nonexistent"
    res = subprocess.run([sys.executable, "-m", "kvtier.cli", "up"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "redis-server not found on PATH" in res.stderr


def _sh_blocks(heading: str) -> list[str]:
    section = README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_shared_network_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's tokens + TLS example, verbatim but for ports and the host name: the token
    it prints opens its namespace over TLS, and nothing works without it."""
    import numpy as np

    from kvtier_client import KVTierClient, Page
    from kvtier_client.errors import UnauthenticatedError

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=cache.internal", "-addext",
                    "subjectAltName=DNS:cache.internal,DNS:localhost,IP:127.0.0.1",
                    "-keyout", "server.key", "-out", "server.crt"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    (tmp_path / "ca.crt").write_bytes((tmp_path / "server.crt").read_bytes())
    (block,) = _sh_blocks("## On a shared network")
    create, serve = block.split("\n", 1)
    env = _env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["KVTIER_DATA__PORT"] = "0"
    token = subprocess.run(create, shell=True, cwd=tmp_path, env=env, text=True,
                           capture_output=True, check=True, timeout=60).stdout.strip()
    daemon = subprocess.Popen(serve, shell=True, cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    port = int(env["KVTIER_GRPC_PORT"])
    try:
        for _ in range(600):  # up to 60 s on a loaded machine
            assert daemon.poll() is None, daemon.stdout.read() if daemon.stdout else ""
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        code = _snippet("## On a shared network").replace(
            "cache.internal:50051", f"localhost:{port}")
        scope: dict[str, object] = {"KVTierClient": KVTierClient, "token": token}
        monkeypatch.chdir(tmp_path)  # the example names its files relative to where it runs
        exec(compile(code, "README.md", "exec"), scope)
        client = scope["client"]
        assert isinstance(client, KVTierClient)
        with client:
            k = np.ones((2, 16, 4, 64), np.float16)
            client.put([b"readme"], [Page(k, k, 0)])
            assert client.lookup([b"readme"]).prefix_length == 1
        plain = KVTierClient(f"localhost:{port}", "tenant-a", tls_ca_file="ca.crt",
                             shared_memory=False)
        with plain, pytest.raises(UnauthenticatedError):
            plain.lookup([b"readme"])
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)
