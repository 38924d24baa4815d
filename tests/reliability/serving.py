"""Helpers for the reliability tests (and bench/load_serve.py) that run `distill serve` as a subprocess:
a project with a tiny student registered as its latest model, and a server process started through the CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
    register it as the latest train run. ``route_to='teacher'`` writes a router.json whose confidence cut
    (1.01 > any probability) sends every text to the teacher; 'student' leaves the pass-through router."""
    import torch

    from distill.serve.router import Router, RouterConfig
    from distill.students.classifier import ClassifierStudent

    torch.manual_seed(0)
    student = ClassifierStudent.create(str(base), list(project.spec.label_names), device="cpu")
    model_dir = student.save(project.models_dir / run_id / "final")
    if route_to == "teacher":
        Router(RouterConfig(labels=list(project.spec.label_names), ood="none", conf_threshold=1.01)).save(model_dir)
    project.store.put_run(run_id, "train", "done", str(model_dir), {})
    return Path(model_dir)


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
