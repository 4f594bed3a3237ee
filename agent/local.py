"""Start and stop a whole pipeline of `edgepipe-agent serve` processes on this machine.

Used by the tests, tools/demo.py and the benchmarks; on real devices each agent is started by its
device daemon or systemd instead (docs/operations.md). Agents bind 127.0.0.1 on ports the OS picks
and report them in ready files, so pipelines started in parallel never collide.

    with LocalPipeline(["out/stage-0", "out/stage-1"]) as pipe, pipe.client() as client:
        print(client.run(x))

Secure by default, like a real deployment: every agent gets its own new keypair (secret key files
0600 in ``log_dir/keys``, deleted by nobody: they are throwaway keys), accepts data only from the
previous stage's keys (stage 0: the pipeline's client key), sends only to the next stage's keys, and
the last stage gives results only to the client key. ``insecure=True`` runs them with --insecure.

A stage may be replicated (``replicas={1: 2}``: two agents serve stage 1; stage 0 sends to both, and
stage 2 accepts both). Agents are started last stage first (each needs the next one's address and
key), run in their own session (a Ctrl-C in the terminal reaches only this process, which then stops
them in order) and exit by themselves if this process dies. ``stop`` sends SIGTERM from the first
stage to the last, waiting for each to drain into the next, and SIGKILLs whatever is left after the
timeout. ``kill``, ``restart``, ``pause`` and ``resume`` act on one agent, for fault tests: a
restarted agent binds the same ports with the same key, as a restarted device would. Each agent's
log is kept in ``log_dir`` (a new temporary directory unless given), appended to across restarts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from edgepipe.agent.client.client import Client
from edgepipe.agent.formats.bundle import read_manifest
from edgepipe.agent.formats.endpoints import Endpoints, Peer, save_endpoints
from edgepipe.agent.formats.keys import KeyPair, generate_keypair


class LocalPipelineError(RuntimeError):
    """An agent failed to start. The message carries the end of its log."""


@dataclass(frozen=True)
class AgentProcess:
    index: int  # stage index
    bundle_dir: Path
    process: subprocess.Popen
    listen: str
    results: str | None
    log_path: Path
    replica: int = 0
    command: tuple[str, ...] = ()
    public_key: str | None = None
    ready_file: Path | None = None
    control: str | None = None  # its --control endpoint, if started with one


@dataclass(frozen=True)
class PipelineKeys:
    """Throwaway keys for a pipeline started by hand (benchmarks on the testbed): one keypair per
    stage (one replica each) and one for the client, secret files 0600 in ``directory``. Gives each
    agent's security options and the client's keyword arguments, so the run is as secure as a real
    deployment."""

    stages: tuple[tuple[KeyPair, Path], ...]  # (keypair, secret file) per stage
    client: tuple[KeyPair, Path]

    @staticmethod
    def make(directory: Path | str, stages: int) -> PipelineKeys:
        directory = Path(directory)
        stage_keys = tuple(generate_keypair(directory, f"stage{i}", overwrite=True)[::2] for i in range(stages))
        return PipelineKeys(stage_keys, generate_keypair(directory, "client", overwrite=True)[::2])

    def serve_args(self, index: int) -> list[str]:
        """--key, --allow (previous stage, or the client for stage 0), --next-key (next stage), and
        --allow-client on the last stage. Add --next ENDPOINT (or --results) as usual."""
        upstream = self.client if index == 0 else self.stages[index - 1]
        args = ["--key", str(self.stages[index][1]), "--allow", upstream[0].public_text]
        if index + 1 < len(self.stages):
            args += ["--next-key", self.stages[index + 1][0].public_text]
        else:
            args += ["--allow-client", self.client[0].public_text]
        return args

    def client_kwargs(self) -> dict[str, Any]:
        """keypair, entry_key and exit_key for Client(entry, exit, **kwargs)."""
        return {"keypair": self.client[0], "entry_key": self.stages[0][0].public_text,
                "exit_key": self.stages[-1][0].public_text}

    def submit_args(self) -> list[str]:
        """--key, --entry-key and --exit-key for edgepipe-submit."""
        return ["--key", str(self.client[1]), "--entry-key", self.stages[0][0].public_text,
                "--exit-key", self.stages[-1][0].public_text]


def agent_command(bundle_dir: Path, listen: str, next_: Sequence[tuple[str, str | None]], results: str | None,
                  ready_file: Path, threads: int, cpus: str | None, log_level: str, max_batch: int,
                  extra: Sequence[str] = (), *, key_file: Path | None = None, allow: Sequence[str] = (),
                  allow_clients: Sequence[str] = (), heartbeat_s: float | None = None) -> list[str]:
    """The `edgepipe-agent serve` command line of one agent. ``next_``: (endpoint, public key) per
    replica of the next stage; no ``key_file`` means --insecure."""
    cmd = [sys.executable, "-m", "edgepipe.agent.cli", "serve", str(bundle_dir), "--listen", listen,
           "--ready-file", str(ready_file), "--threads", str(threads), "--log-level", log_level,
           "--max-batch", str(max_batch), "--parent-pid", str(os.getpid())]
    for endpoint, key in next_:
        cmd += ["--next", endpoint] + (["--next-key", key] if key else [])
    if results:
        cmd += ["--results", results]
    if key_file is None:
        cmd.append("--insecure")
    else:
        cmd += ["--key", str(key_file)]
        for key in allow:
            cmd += ["--allow", key]
        for key in allow_clients:
            cmd += ["--allow-client", key]
    if heartbeat_s is not None:
        cmd += ["--heartbeat-s", f"{heartbeat_s:g}"]
    if cpus:
        cmd += ["--cpus", cpus]
    return cmd + list(extra)


class LocalPipeline:
    """One agent process per bundle directory (and replica), wired in order. Context manager; see
    the module docstring."""

    def __init__(self, bundle_dirs: Sequence[Path | str], *, threads: int | Sequence[int] = 1,
                 cpus: Sequence[str | None] | None = None, log_level: str = "info", max_batch: int = 256,
                 host: str = "127.0.0.1", startup_timeout_s: float = 120.0, stop_timeout_s: float = 30.0,
                 log_dir: Path | str | None = None, env: Mapping[str, str] | None = None,
                 agent_args: Sequence[str] = (), stage_args: Mapping[int, Sequence[str]] | None = None,
                 replicas: Mapping[int, int] | None = None, insecure: bool = False,
                 heartbeat_s: float | None = None, clients: int = 1, control: bool = False,
                 extra_client_keys: Sequence[str] = ()) -> None:
        if not bundle_dirs:
            raise ValueError("a pipeline needs at least one bundle directory")
        n = len(bundle_dirs)
        self.bundle_dirs = [Path(d) for d in bundle_dirs]
        self.threads = [threads] * n if isinstance(threads, int) else list(threads)
        self.cpus = list(cpus) if cpus is not None else [None] * n
        if len(self.threads) != n or len(self.cpus) != n:
            raise ValueError(f"threads and cpus need one entry per stage ({n})")
        self.replicas = [int((replicas or {}).get(i, 1)) for i in range(n)]
        if min(self.replicas) < 1:
            raise ValueError("replicas: at least 1 per stage")
        self.log_level, self.max_batch, self.host = log_level, max_batch, host
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = dict(env) if env is not None else None
        self.agent_args = list(agent_args)
        self.stage_args = {int(k): list(v) for k, v in (stage_args or {}).items()}
        self.insecure, self.heartbeat_s, self.control = insecure, heartbeat_s, control
        if clients < 1:
            raise ValueError("clients: at least 1")
        self.clients = clients
        self.extra_client_keys = list(extra_client_keys)  # public keys of clients made elsewhere, also allowed
        self.agents: list[AgentProcess] = []
        self.client_keypair: KeyPair | None = None  # the first of client_keypairs
        self.client_key_file: Path | None = None
        self.client_keypairs: list[KeyPair] = []  # every client key the entry and the exit accept
        self.client_key_files: list[Path] = []
        self.deployment = f"local-{uuid.uuid4().hex[:8]}"
        self._keys: dict[tuple[int, int], tuple[KeyPair, Path]] = {}
        self._logs: list[IO[Any]] = []

    # -- addresses and keys

    @property
    def entry(self) -> str:
        return self.entries[0]

    @property
    def exit(self) -> str:
        return self.exits[0]

    @property
    def entries(self) -> list[str]:
        return [a.listen for a in self._started() if a.index == 0]

    @property
    def exits(self) -> list[str]:
        return [a.results for a in self._started() if a.results is not None]

    def stage_keys(self, index: int) -> list[str]:
        """Public keys of the agents serving stage ``index`` (empty when insecure)."""
        return [a.public_key for a in self._started() if a.index == index and a.public_key]

    def client(self, **kwargs: Any) -> Client:
        """A Client connected to this pipeline with its client key (keyword arguments go to Client)."""
        if self.insecure:
            return Client(self.entries, self.exits, insecure=True, **kwargs)
        kwargs.setdefault("keypair", self.client_keypair)
        return Client(self.entries, self.exits, entry_key=self.stage_keys(0),
                      exit_key=self.stage_keys(len(self.bundle_dirs) - 1), **kwargs)

    def submit_args(self) -> list[str]:
        """``edgepipe-submit`` arguments that reach this pipeline: ENTRY EXIT and the keys (or --insecure)."""
        if self.insecure:
            return [self.entry, self.exit, "--insecure"]
        return [self.entry, self.exit, "--entry-key", self.stage_keys(0)[0], "--exit-key",
                self.stage_keys(len(self.bundle_dirs) - 1)[0], "--key", str(self.client_key_file)]

    def endpoints(self) -> Endpoints:
        first, last = read_manifest(self.bundle_dirs[0]), read_manifest(self.bundle_dirs[-1])
        entry_keys = self.stage_keys(0) or [None] * len(self.entries)
        exit_keys = self.stage_keys(len(self.bundle_dirs) - 1) or [None] * len(self.exits)
        return Endpoints(self.deployment, 1, first.model_id,
                         tuple(Peer(e, k) for e, k in zip(self.entries, entry_keys, strict=True)),
                         tuple(Peer(e, k) for e, k in zip(self.exits, exit_keys, strict=True)),
                         first.inputs, last.outputs, insecure=self.insecure)

    def write_endpoints(self, path: Path | str) -> Path:
        return save_endpoints(Path(path), self.endpoints())

    def status(self, index: int, replica: int = 0, timeout_s: float = 10.0) -> dict[str, Any]:
        """The agent's counters (the ``stage`` field of its --control status; needs control=True)."""
        from edgepipe.agent.control_client import request_status
        from edgepipe.agent.transport import INSECURE

        agent = self.agent(index, replica)
        if agent.control is None:
            raise RuntimeError("start the pipeline with control=True to read agent status")
        # a stage's --control listens on loopback in plaintext (docs/security.md)
        return request_status(agent.control, auth=INSECURE, timeout_s=timeout_s)["stage"]

    # -- one agent

    def agent(self, index: int, replica: int = 0) -> AgentProcess:
        for a in self.agents:
            if a.index == index and a.replica == replica:
                return a
        raise KeyError(f"no agent for stage {index} replica {replica}")

    def log_text(self, index: int, replica: int = 0) -> str:
        return self.agent(index, replica).log_path.read_text(errors="replace")

    def agents_by_index(self) -> dict[int, AgentProcess]:
        return {a.index: a for a in self.agents if a.replica == 0}

    def kill(self, index: int, replica: int = 0) -> None:
        """SIGKILL one agent (no drain, no goodbye), as a crash or a power cut would."""
        process = self.agent(index, replica).process
        if process.poll() is None:
            process.kill()
        process.wait()

    def pause(self, index: int, replica: int = 0) -> None:
        os.kill(self.agent(index, replica).process.pid, signal.SIGSTOP)

    def resume(self, index: int, replica: int = 0) -> None:
        os.kill(self.agent(index, replica).process.pid, signal.SIGCONT)

    def restart(self, index: int, replica: int = 0, wait: bool = True) -> AgentProcess:
        """Start a killed (or exited) agent again with the same command: same ports, same key."""
        old = self.agent(index, replica)
        if old.process.poll() is None:
            raise RuntimeError(f"agent for stage {index} replica {replica} is still running")
        assert old.ready_file is not None
        old.ready_file.unlink(missing_ok=True)
        log = open(old.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        process = subprocess.Popen(list(old.command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=self._env(), start_new_session=True)
        new = replace(old, process=process)
        self.agents[self.agents.index(old)] = new
        if wait:
            _wait_ready(process, old.ready_file, old.log_path, self.startup_timeout_s, index, old.bundle_dir)
        return new

    # -- the whole pipeline

    def start(self) -> LocalPipeline:
        if self.agents:
            raise RuntimeError("pipeline already started")
        log_dir = self.log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="edgepipe-agents-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.insecure:
                self._make_keys(log_dir / "keys")
            next_hops: list[tuple[str, str | None]] = []
            for index in reversed(range(len(self.bundle_dirs))):
                started = [self._start_one(index, r, next_hops, log_dir) for r in range(self.replicas[index])]
                next_hops = [(a.listen, a.public_key) for a in started]
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

    def _env(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env is not None else None

    def _make_keys(self, keys_dir: Path) -> None:
        """Throwaway keys for this run: one per agent, and the clients'."""
        for k in range(self.clients):
            pair, _, secret = generate_keypair(keys_dir, "client" if k == 0 else f"client{k}", overwrite=True)
            self.client_keypairs.append(pair)
            self.client_key_files.append(secret)
        self.client_keypair, self.client_key_file = self.client_keypairs[0], self.client_key_files[0]
        for index, count in enumerate(self.replicas):
            for r in range(count):
                pair, _, secret = generate_keypair(keys_dir, f"stage{index}-{r}", overwrite=True)
                self._keys[(index, r)] = (pair, secret)

    def _allow(self, index: int) -> list[str]:
        if self.insecure:
            return []
        if index == 0:
            return [k.public_text for k in self.client_keypairs] + self.extra_client_keys
        return [self._keys[(index - 1, r)][0].public_text for r in range(self.replicas[index - 1])]

    def _start_one(self, index: int, replica: int, next_hops: list[tuple[str, str | None]],
                   log_dir: Path) -> AgentProcess:
        """Start one agent and put it at the front of self.agents (as soon as it exists, so that
        stop() reaches it even if start-up fails or is interrupted)."""
        bundle_dir = self.bundle_dirs[index]
        name = f"agent-{index}" + (f"-{replica}" if self.replicas[index] > 1 else "")
        ready = log_dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = log_dir / f"{name}.log"
        is_last = index == len(self.bundle_dirs) - 1
        pair, key_file = self._keys.get((index, replica), (None, None))
        cmd = agent_command(
            bundle_dir, f"tcp://{self.host}:0", next_hops, f"tcp://{self.host}:0" if is_last else None, ready,
            self.threads[index], self.cpus[index], self.log_level, self.max_batch,
            [*self.agent_args, *self.stage_args.get(index, [])], key_file=key_file, allow=self._allow(index),
            allow_clients=[k.public_text for k in self.client_keypairs] + self.extra_client_keys if is_last else [],
            heartbeat_s=self.heartbeat_s)
        control = _free_endpoint(self.host) if self.control else None
        if control is not None:
            cmd += ["--control", control]
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=self._env(), start_new_session=True)
        public = pair.public_text if pair else None
        self.agents.insert(0, AgentProcess(index, bundle_dir, process, "", None, log_path, replica, tuple(cmd),
                                           public, ready, control))
        info = _wait_ready(process, ready, log_path, self.startup_timeout_s, index, bundle_dir)
        # A restart must bind the very ports the other agents and clients know.
        fixed = _replace_arg(_replace_arg(cmd, "--listen", info["listen"]), "--results", info.get("results"))
        self.agents[0] = AgentProcess(index, bundle_dir, process, info["listen"], info.get("results"), log_path,
                                      replica, tuple(fixed), public, ready, control)
        self.agents.sort(key=lambda a: (a.index, a.replica))
        return next(a for a in self.agents if a.index == index and a.replica == replica)


def _free_endpoint(host: str) -> str:
    """A port nothing listens on right now (bound, then released for the agent to bind)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def _replace_arg(cmd: list[str], option: str, value: str | None) -> list[str]:
    if value is None or option not in cmd:
        return cmd
    out = list(cmd)
    out[out.index(option) + 1] = value
    return out


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
