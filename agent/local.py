"""Start and stop a whole pipeline of `edgepipe-agent serve` processes on this machine.

Used by the tests, tools/demo.py and the benchmarks; on real devices each agent is started by
systemd instead (docs/operations.md). Agents bind 127.0.0.1 on ports the OS picks and report them
in ready files, so pipelines started in parallel never collide.

    with LocalPipeline(["out/stage-0", "out/stage-1"]) as pipe, pipe.client() as client:
        print(client.run(x))

Agents are started last stage first (each needs the next one's address), run in their own session
(a Ctrl-C in the terminal reaches only this process, which then stops them in order) and exit by
themselves if this process dies. ``stop`` sends SIGTERM from the first stage to the last, waiting for
each to drain into the next, and SIGKILLs whatever is left after the timeout. Each agent's log is
kept in ``log_dir`` (a new temporary directory unless given) after the pipeline stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgepipe.agent.client.client import Client


class LocalPipelineError(RuntimeError):
    """An agent failed to start. The message carries the end of its log."""


@dataclass(frozen=True)
class AgentProcess:
    index: int
    bundle_dir: Path
    process: subprocess.Popen
    listen: str
    results: str | None
    log_path: Path


def agent_command(bundle_dir: Path, listen: str, next_: str | None, results: str | None, ready_file: Path,
                  threads: int, cpus: str | None, log_level: str, max_batch: int,
                  extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "edgepipe.agent.cli", "serve", str(bundle_dir), "--listen", listen,
           "--ready-file", str(ready_file), "--threads", str(threads), "--log-level", log_level,
           "--max-batch", str(max_batch), "--parent-pid", str(os.getpid())]
    if next_:
        cmd += ["--next", next_]
    if results:
        cmd += ["--results", results]
    if cpus:
        cmd += ["--cpus", cpus]
    return cmd + list(extra)


class LocalPipeline:
    """One agent process per bundle directory, wired in order. Context manager; see module doc."""

    def __init__(self, bundle_dirs: Sequence[Path | str], *, threads: int | Sequence[int] = 1,
                 cpus: Sequence[str | None] | None = None, log_level: str = "info", max_batch: int = 256,
                 host: str = "127.0.0.1", startup_timeout_s: float = 120.0, stop_timeout_s: float = 30.0,
                 log_dir: Path | str | None = None, env: Mapping[str, str] | None = None,
                 agent_args: Sequence[str] = ()) -> None:
        if not bundle_dirs:
            raise ValueError("a pipeline needs at least one bundle directory")
        n = len(bundle_dirs)
        self.bundle_dirs = [Path(d) for d in bundle_dirs]
        self.threads = [threads] * n if isinstance(threads, int) else list(threads)
        self.cpus = list(cpus) if cpus is not None else [None] * n
        if len(self.threads) != n or len(self.cpus) != n:
            raise ValueError(f"threads and cpus need one entry per stage ({n})")
        self.log_level, self.max_batch, self.host = log_level, max_batch, host
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = dict(env) if env is not None else None
        self.agent_args = list(agent_args)
        self.agents: list[AgentProcess] = []
        self._logs: list[IO[Any]] = []

    @property
    def entry(self) -> str:
        return self._started()[0].listen

    @property
    def exit(self) -> str:
        results = self._started()[-1].results
        assert results is not None
        return results

    def client(self, **kwargs: Any) -> Client:
        """A Client connected to this pipeline (keyword arguments go to Client)."""
        return Client(self.entry, self.exit, **kwargs)

    def log_text(self, index: int) -> str:
        return self.agents_by_index()[index].log_path.read_text(errors="replace")

    def agents_by_index(self) -> dict[int, AgentProcess]:
        return {a.index: a for a in self.agents}

    def start(self) -> LocalPipeline:
        if self.agents:
            raise RuntimeError("pipeline already started")
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="edgepipe-agents-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            next_listen: str | None = None
            for index in reversed(range(len(self.bundle_dirs))):
                next_listen = self._start_one(index, next_listen, log_dir).listen
        except BaseException:
            self.stop()  # also on KeyboardInterrupt: never leave a half-started pipeline behind
            raise
        return self

    def stop(self) -> list[int | None]:
        """SIGTERM each agent, first stage first, waiting for it to drain; SIGKILL stragglers.
        Returns the exit codes in stage order."""
        try:
            for agent in self.agents:
                _terminate(agent.process, self.stop_timeout_s)
        finally:
            for agent in self.agents:  # reached also on a second Ctrl-C during the polite phase
                if agent.process.poll() is None:
                    agent.process.kill()
                    agent.process.wait()
            for fh in self._logs:
                fh.close()
            self._logs.clear()
        return [a.process.returncode for a in self.agents]

    def __enter__(self) -> LocalPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _started(self) -> list[AgentProcess]:
        if not self.agents:
            raise RuntimeError("pipeline not started")
        return self.agents

    def _start_one(self, index: int, next_listen: str | None, log_dir: Path) -> AgentProcess:
        """Start agent ``index`` and put it at the front of self.agents (as soon as it exists, so
        that stop() reaches it even if start-up fails or is interrupted)."""
        bundle_dir = self.bundle_dirs[index]
        ready = log_dir / f"agent-{index}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = log_dir / f"agent-{index}.log"
        is_last = next_listen is None
        cmd = agent_command(bundle_dir, f"tcp://{self.host}:0", next_listen,
                            f"tcp://{self.host}:0" if is_last else None, ready, self.threads[index],
                            self.cpus[index], self.log_level, self.max_batch, self.agent_args)
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        env = {**os.environ, **self.env} if self.env is not None else None
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        self.agents.insert(0, AgentProcess(index, bundle_dir, process, "", None, log_path))
        info = _wait_ready(process, ready, log_path, self.startup_timeout_s, index, bundle_dir)
        self.agents[0] = AgentProcess(index, bundle_dir, process, info["listen"], info.get("results"),
                                      log_path)
        return self.agents[0]


def _wait_ready(process: subprocess.Popen, ready: Path, log_path: Path, timeout_s: float, index: int,
                bundle_dir: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())
        code = process.poll()
        if code is not None:
            raise LocalPipelineError(f"agent {index} ({bundle_dir}) exited with code {code} during start-up; "
                                     f"log tail: {_tail(log_path)}")
        time.sleep(0.02)
    raise LocalPipelineError(f"agent {index} ({bundle_dir}) not ready after {timeout_s:g} s; "
                             f"log tail: {_tail(log_path)}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def stop_processes(processes: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM every live process at once, wait up to ``timeout_s`` for each, SIGKILL the rest.

    For processes that need no order (control daemons, benchmark helpers); a pipeline stops in
    order with ``LocalPipeline.stop``."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _terminate(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
