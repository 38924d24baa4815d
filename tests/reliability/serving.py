"""Helpers for the reliability tests (and bench/load_serve.py) that run `distill serve`: a project with a tiny
student registered as its serving model, a server process started through the CLI (``ServeProcess``), and
the same app run in-process by uvicorn exactly as `distill serve` configures it (``InProcessServer``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
LABELS = ("positive", "negative", "neutral")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_student(project, base: str | Path, route_to: str = "student", run_id: str = "r1") -> Path:
    """Save an untrained classifier over ``base`` (an HF encoder folder) as run ``run_id``'s final model and
    register it as the serving (promoted) train run. ``route_to='teacher'`` writes a router.json whose confidence cut
    (1.01 > any probability) sends every text to the teacher; 'student' leaves the pass-through router."""
    import torch

    from distill.serve.router import Router, RouterConfig
    from distill.students.classifier import ClassifierStudent

    torch.manual_seed(0)
    student = ClassifierStudent.create(str(base), list(project.spec.label_names), device="cpu")
    model_dir = student.save(project.models_dir / run_id / "final")
    if route_to == "teacher":
        Router(RouterConfig(labels=list(project.spec.label_names), ood="none", conf_threshold=1.01)).save(model_dir)
    project.record_run(run_id, "train", "done", model_dir, {})
    project.promote(run_id, "test fixture")      # serve answers with the promoted model only
    return Path(model_dir)


def served_project(tmp: Path, route_to: str = "student") -> tuple[Path, str]:
    """``tmp/p``: a project whose teacher 'api' points at a closed loopback port, with a tiny untrained student
    promoted (``add_student``) and one API key. Returns (root, raw key)."""
    from fake_openai_server import make_project
    from tiny_models import tiny_bert_folder

    from distill.serve.keys import create_key

    project = make_project(tmp / "p", 0, "http://127.0.0.1:9/v1", labels=LABELS, extra_yaml="\nteacher: api\n")
    add_student(project, tiny_bert_folder(tmp / "bert"), route_to)
    _, key = create_key(project.store, "tests")
    project.close()
    return tmp / "p", key


class InProcessServer:
    """``app`` under uvicorn in a thread of this process, configured by ``distill.serve.app.uvicorn_config``
    (what `distill serve` runs: the header-deadline protocol, keep-alive, no access log)."""

    def __init__(self, app, timeout: float = 60.0, http: str = "auto"):
        import uvicorn

        from distill.serve.app import uvicorn_config

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, log_level="warning", http=http))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class ServeProcess:
    """`distill serve PROJECT` in a subprocess on a free loopback port; stderr goes to a file."""

    def __init__(self, root: Path, *, args: tuple = (), env: dict | None = None, log: Path | None = None,
                 port: int | None = None, timeout: float = 90.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(root).parent / f"serve-{self.port}.log"
        self._err = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "serve", str(root), "--port", str(self.port), *map(str, args)],
            env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})},
            stdout=self._err, stderr=self._err)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"distill serve exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"distill serve did not answer /healthz within {timeout}s")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._err.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
        self._err.close()
