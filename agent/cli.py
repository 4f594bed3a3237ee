"""`edgepipe-agent`: serve a pipeline stage (`serve`), check a bundle (`check`), profile this device
(`profile`), run the device daemon the workstation deploys to (`daemon`, alias `control`; its
systemd unit: `unit`) and make keys (`keygen`)."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer
from edgepipe.agent import clihelp
from edgepipe.agent.device.session import SessionError, create_session
from edgepipe.agent.device.stage import AgentConfig, check_config, serve
from edgepipe.agent.formats.bundle import BundleError, load_bundle
from edgepipe.agent.transport import TransportError

app = clihelp.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run EdgePipe pipeline stages with ONNX Runtime and ZeroMQ (no PyTorch needed).")

LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_cpus(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3), the taskset list syntax."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"--cpus {text!r}: expected a list like 0,2-3")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"edgepipe-agent: error: {message}", err=True)
    return typer.Exit(code)


@app.command("serve")
def serve_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE_DIR",
                                   help="Stage bundle directory (stage.json, stage.onnx, .data)."),
    listen: str = typer.Option(..., "--listen", metavar="ENDPOINT",
                               help="Bind address for incoming data, e.g. tcp://*:5550."),
    next_: list[str] | None = typer.Option(None, "--next", metavar="ENDPOINT",
                                           help="Next stage's --listen address; repeat it for "
                                           "each replica of the next stage. Omit on the last stage."),
    next_key: list[str] | None = typer.Option(None, "--next-key", metavar="KEY",
                                              help="Public key of each --next (Z85 text or "
                                              "a .key file), in the same order."),
    next_weight: list[float] | None = typer.Option(None, "--next-weight", metavar="W",
                                                   help="Share of work of each --next "
                                                   "replica (default 1 each), in the same order."),
    results: str | None = typer.Option(None, "--results", metavar="ENDPOINT",
                                       help="Last stage only: bind address clients read results from."),
    key: Path | None = typer.Option(None, "--key", metavar="FILE", help="This device's secret key file "
                                    "[$EDGEPIPE_KEYS/device.key_secret, else ~/.config/edgepipe/keys/...]."),
    allow: list[str] | None = typer.Option(None, "--allow", metavar="KEYLIST",
                                           help="Keys allowed to send data here: the previous "
                                           "stage's device key(s); for stage 0 the clients' keys. A Z85 key, a "
                                           ".key file, a key-list file or a directory; repeatable."),
    allow_client: list[str] | None = typer.Option(None, "--allow-client", metavar="KEYLIST",
                                                  help="Last stage: keys of the clients "
                                                  "allowed to read results; repeatable."),
    insecure: bool = typer.Option(False, "--insecure", help="No authentication, no encryption: anyone who can "
                                  "reach the ports can submit, inject or read data. For isolated test networks."),
    codec: str = typer.Option("raw", "--codec", metavar="CODEC", help="Codec of this stage's output: raw, fp16 or int8 "
                              "(float32 tensors only)."),
    credit: int = typer.Option(4, "--credit", min=1, help="Messages each upstream peer (stage 0: each client key) "
                               "may have in flight here."),
    credit_mb: float = typer.Option(64.0, "--credit-mb", help="Bytes (MiB) each upstream peer may have in flight."),
    heartbeat_s: float = typer.Option(0.5, "--heartbeat-s", help="Heartbeat interval; a neighbour silent for 3 "
                                      "intervals is declared down."),
    hold_s: float = typer.Option(30.0, "--hold-s", help="Last stage: how long to hold a result for an absent client."),
    device: str | None = typer.Option(None, "--device", metavar="NAME",
                                      help="This device's name in logs and status (default: the host name)."),
    deployment: str = typer.Option("", "--deployment", metavar="ID",
                                   help="Deployment id, shown in heartbeats and status."),
    generation: int = typer.Option(0, "--generation", min=0, help="Deployment generation, in heartbeats and status."),
    threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads."),
    max_batch: int = typer.Option(256, "--max-batch", min=1, help="Largest batch (axis 0) accepted."),
    max_frame_mb: float | None = typer.Option(None, "--max-frame-mb",
                                              help="Per-tensor size limit; default from the manifest."),
    drain_timeout_s: float = typer.Option(30.0, "--drain-timeout-s", help="Drain limit on SIGTERM."),
    ready_file: Path | None = typer.Option(None, "--ready-file", metavar="FILE",
                                           help="Write {pid, listen, results, public_key, "
                                           "incarnation, ...} JSON here once serving."),
    cpus: str | None = typer.Option(None, "--cpus", metavar="LIST",
                                    help="Pin to these CPUs (taskset list, e.g. 0,2-3)."),
    control: str | None = typer.Option(None, "--control", metavar="ENDPOINT",
                                       help="Also answer status (with this stage's counters) "
                                       "and link probes here, e.g. tcp://*:5560."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    parent_pid: int | None = typer.Option(None, "--parent-pid", hidden=True,
                                          help="Exit when this process stops being our parent."),
) -> None:
    """Serve one stage: receive, compute, send, until SIGTERM/SIGINT (which drains in-flight work).

    Secure by default: each device has a key (`edgepipe-agent keygen`); a stage accepts data only
    from the keys given with --allow and sends only to the --next whose key is --next-key.
    Example, a 3-stage pipeline on hosts dev0, dev1, dev2 (K0, K1, K2: their public keys; C: the client's):

      dev0$ edgepipe-agent serve s0 --listen tcp://*:5550 --allow C --next tcp://dev1:5550 --next-key K1

      dev1$ edgepipe-agent serve s1 --listen tcp://*:5550 --allow K0 --next tcp://dev2:5550 --next-key K2

      dev2$ edgepipe-agent serve s2 --listen tcp://*:5550 --allow K1 --results tcp://*:5551 --allow-client C

    then: edgepipe-submit tcp://dev0:5550 tcp://dev2:5551 --entry-key K0 --exit-key K2 --key client.key_secret
    """
    from edgepipe.agent.device.stage import NextHop, StageStatus
    from edgepipe.agent.formats.keys import KeyFileError, load_key_list, load_keypair, load_public_key
    from edgepipe.agent.formats.keys import key_dir as default_key_dir

    if log_level.lower() not in LOG_LEVELS:
        raise _fail(f"--log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s edgepipe-agent[%(process)d] %(message)s")
    nexts, keys, weights = list(next_ or []), list(next_key or []), list(next_weight or [])
    try:
        if keys and len(keys) != len(nexts):
            raise ValueError(f"{len(nexts)} --next but {len(keys)} --next-key: give one key per --next, in order")
        if weights and len(weights) != len(nexts):
            raise ValueError(f"{len(nexts)} --next but {len(weights)} --next-weight: give one per --next, or none")
        if insecure:
            keypair, allowed, clients = None, frozenset(), frozenset()
            hops = tuple(NextHop(e, None, w) for e, w in zip(nexts, weights or [1.0] * len(nexts), strict=True))
        else:
            keypair = load_keypair(key or default_key_dir() / "device.key_secret")
            allowed = load_key_list(allow or [])
            clients = load_key_list(allow_client or [])
            hops = tuple(NextHop(e, load_public_key(k) if k else None, w)
                         for e, k, w in zip(nexts, keys or [None] * len(nexts), weights or [1.0] * len(nexts),
                                            strict=True))
        if credit_mb <= 0:
            raise ValueError(f"--credit-mb {credit_mb:g}: must be more than 0")
        config = AgentConfig(
            bundle_dir=bundle_dir, listen=listen, next=hops, results=results, keypair=keypair, allow=allowed,
            allow_clients=clients, insecure=insecure, codec=codec, credit=credit,
            credit_bytes=int(credit_mb * 2**20), heartbeat_s=heartbeat_s, hold_s=hold_s,
            device=device or platform.node(), deployment=deployment, generation=generation, threads=threads,
            max_batch=max_batch, max_frame_bytes=None if max_frame_mb is None else int(max_frame_mb * 2**20),
            drain_timeout_s=drain_timeout_s, ready_file=ready_file, cpus=parse_cpus(cpus) if cpus else None,
            parent_pid=parent_pid)
        check_config(config)
    except (ValueError, KeyFileError, TransportError) as exc:
        raise _fail(str(exc)) from None
    stop, abort = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            abort.set()  # a second signal: stop waiting for the drain
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = StageStatus()
    try:
        if control is not None:
            from edgepipe.agent.device.daemon import ControlConfig, start_control_thread

            start_control_thread(ControlConfig(listen=control, device=config.device, threads=threads,
                                               commands=("status", "probe", "echo"), stage_status=status), stop)
        code = serve(config, stop, abort, status)
    except (BundleError, SessionError, TransportError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command("check")
def check_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE_DIR", help="Stage bundle directory to verify."),
    threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify a bundle as `serve` would (file hashes, ONNX Runtime load, graph vs manifest) and print it.

    Example: edgepipe-agent check /opt/edgepipe/stage-1
    """
    try:
        manifest = load_bundle(bundle_dir)
        create_session(bundle_dir, manifest, threads)
    except (BundleError, SessionError) as exc:
        raise _fail(str(exc)) from None
    info = {
        "bundle": str(bundle_dir), "model_id": manifest.model_id,
        "stage": f"{manifest.stage_index}/{manifest.stage_count}",
        "inputs": [[t.name, t.dtype, list(t.shape)] for t in manifest.inputs],
        "outputs": [[t.name, t.dtype, list(t.shape)] for t in manifest.outputs],
        "weight_bytes": manifest.weight_bytes,
        "weights": "float32" if manifest.quantization is None else manifest.quantization.describe(), "ok": True,
    }
    if as_json:
        typer.echo(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{bundle_dir}: OK", show_header=False)
    for key, value in info.items():
        if key != "ok":
            table.add_row(key, str(value))
    Console().print(table)


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8): microbatch sizes."""
    try:
        sizes = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected sizes like 1,8") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{option} {text!r}: sizes must be integers >= 1")
    return sizes


@app.command("profile")
def profile_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE_DIR",
                                   help="Profiling bundle (edgepipe-compile MODEL --profile-bundle DIR)."),
    device: str = typer.Option(..., "--device", help="This device's name in the cluster file."),
    microbatch: str = typer.Option("1,8", "--microbatch", help="Microbatch sizes to time, e.g. 1,8."),
    threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads (as when serving)."),
    repeats: int = typer.Option(10, "--repeats", min=1,
                                help="Rounds: timed runs per piece and size, taken round-robin over all of them."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed runs first."),
    comm: bool = typer.Option(True, "--comm/--no-comm",
                              help="Also measure the runtime's own costs: encode, send, receive, decode."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the device profile JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON instead of a table."),
) -> None:
    """Time every segment of a model on this device (and what moving tensors costs it).

    Identical segments (every transformer block) share one piece and are timed once. The timed runs
    go round-robin over pieces and sizes; outliers are rejected (median +- 3 robust deviations) and
    each segment's time is the mean of the rest. The table shows each time's spread; a warning says
    when the device was too busy for the numbers to be trusted.

    Example: edgepipe-agent profile build/vitb-profile --device pi-a --microbatch 1,8 -o pi-a.json
    """
    from edgepipe.agent.device.commcost import CommError
    from edgepipe.agent.device.profiler import profile_bundle, spread_warning
    from edgepipe.agent.formats.profiles import ProfileError, load_profile_bundle, profile_to_dict, save_profile
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        sizes = parse_sizes(microbatch, "--microbatch")
        load_profile_bundle(bundle_dir)
        with Progress(TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True, disable=as_json) as bar:
            task = bar.add_task("profile", total=None)
            profile = profile_bundle(bundle_dir, device, sizes, threads, repeats, warmup,
                                     on_piece=lambda done, total: bar.update(task, completed=done, total=total),
                                     comm=comm)
        if out is not None:
            save_profile(out, profile)
    except (ProfileError, BundleError, SessionError, CommError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    warning = spread_warning(profile)
    if warning:
        typer.echo(f"edgepipe-agent: warning: {warning}", err=True)
    if as_json:
        typer.echo(json.dumps(profile_to_dict(profile)))
        return
    _print_profile(profile, out)


def _print_profile(profile: Any, out: Path | None) -> None:
    """The profile as tables: per-segment times and spreads, then the runtime's own costs."""
    from rich.console import Console
    from rich.table import Table

    sizes = sorted(profile.seconds)
    table = Table(title=f"{profile.model_id} on {profile.device} ({profile.threads} thread(s), "
                        f"ONNX Runtime {profile.ort_version}, {profile.repeats} rounds)")
    table.add_column("segment", no_wrap=True)
    for mb in sizes:
        table.add_column(f"ms @ {mb}", justify="right")
        table.add_column("spread", justify="right")
    table.add_column("peak MiB", justify="right")
    for i, name in enumerate(profile.segment_names):
        cells = []
        for mb in sizes:
            spread = profile.spread.get(mb, ())
            cells += [f"{profile.seconds[mb][i] * 1000:.2f}", f"{spread[i]:.1%}" if spread else "-"]
        table.add_row(name, *cells, f"{profile.peak_memory_bytes[i] / 2**20:.1f}")
    console = Console()
    console.print(table)
    if profile.comm is not None:
        comm = Table(title=f"runtime costs (CPU of this process; share of compute {profile.comm.share:.2f})")
        for col in ("codec", "CURVE", "recv us/msg", "recv ns/B", "send us/msg", "send ns/B"):
            comm.add_column(col, justify="right")
        for c in profile.comm.costs:
            comm.add_row(c.codec, "yes" if c.secure else "no", f"{c.recv_per_message_s * 1e6:.0f}",
                         f"{c.recv_per_byte_s * 1e9:.3f}", f"{c.send_per_message_s * 1e6:.0f}",
                         f"{c.send_per_byte_s * 1e9:.3f}")
        console.print(comm)
    if out is not None:
        console.print(f"profile written to {out}")


def parse_port_range(text: str) -> tuple[int, int] | None:
    """'5550-5599' -> (5550, 5599); 'auto' -> None (ports the OS picks)."""
    if text == "auto":
        return None
    lo, _, hi = text.partition("-")
    if not lo.isdigit() or not (hi or lo).isdigit() or not 1 <= int(lo) <= int(hi or lo) <= 65535:
        raise ValueError(f"--data-ports {text!r}: expected a range like 5550-5599, or auto")
    return int(lo), int(hi or lo)


def default_state_dir() -> Path:
    """$EDGEPIPE_STATE, else /var/lib/edgepipe for root (the systemd unit), else ~/.local/state/edgepipe."""
    import os

    explicit = os.environ.get("EDGEPIPE_STATE")
    if explicit:
        return Path(explicit).expanduser()
    return Path("/var/lib/edgepipe") if os.geteuid() == 0 else Path("~/.local/state/edgepipe").expanduser()


def daemon_cmd(
    listen: str = typer.Option("tcp://*:5560", "--listen", help="Bind address of the control endpoint."),
    device: str | None = typer.Option(None, "--device",
                                      help="This device's name in the cluster file (default: the host name)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Bundle store, stage logs and deployment "
                                          "state [$EDGEPIPE_STATE, /var/lib/edgepipe as root, else "
                                          "~/.local/state/edgepipe]."),
    key: Path | None = typer.Option(None, "--key", help="This device's secret key [KEYS/device.key_secret, "
                                    "KEYS = $EDGEPIPE_KEYS or ~/.config/edgepipe/keys]."),
    authorized_keys: list[str] = typer.Option([], "--authorized-keys", help="Workstation keys allowed to operate "
                                              "this device: a key list file, a .key file, a directory or a Z85 "
                                              "key; repeatable [KEYS/authorized_keys]."),
    insecure: bool = typer.Option(False, "--insecure", metavar="",
                                  help="No CurveZMQ: anyone who can reach the port may deploy and run code here. "
                                  "Only on an isolated network, for testing."),
    threads: int = typer.Option(1, "--threads", min=1, help="Default ONNX Runtime threads for profiling."),
    max_request_mb: float = typer.Option(512.0, "--max-request-mb", help="Largest single request accepted "
                                         "(bundles travel in chunks of 4 MiB)."),
    data_bind: str = typer.Option("*", "--data-bind", help="Address the stages bind their data sockets to."),
    data_ports: str = typer.Option("5550-5599", "--data-ports", help="TCP ports the stages may bind "
                                   "(open them between devices), or auto for any free port."),
    hang_s: float = typer.Option(10.0, "--hang-s", help="Restart a stage whose control endpoint is silent "
                                 "this long."),
    drain_timeout_s: float = typer.Option(10.0, "--drain-timeout-s", help="How long a stopping stage may "
                                          "take to send on its in-flight work."),
    store_max_mb: float | None = typer.Option(None, "--store-max-mb", help="Limit the bundle store's size "
                                              "(besides the disk's free space)."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write {pid, listen, public_key} JSON "
                                           "once listening."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    stage_log_level: str = typer.Option("info", "--stage-log-level", help="--log-level of the hosted stages."),
) -> None:
    """Run the device daemon that edgepipe-fleet deploys to: bundle store, stages, status, profiling.

    Secure by default: a CurveZMQ server with this device's key that answers only the workstation
    keys in authorized_keys (create the device key with `edgepipe-agent keygen`, copy the
    workstation's public key into KEYS/authorized_keys). Runs under systemd: see `edgepipe-agent unit`.

    Examples:

      edgepipe-agent daemon --device pi-a

      edgepipe-agent daemon --listen tcp://10.0.0.2:5560 --state-dir /var/lib/edgepipe

      edgepipe-agent daemon --insecure --listen tcp://127.0.0.1:5560    (testing only)
    """
    import os
    import platform

    from edgepipe.agent.device.daemon import DaemonConfig, run_daemon
    from edgepipe.agent.formats.control import BadRequest
    from edgepipe.agent.formats.keys import AUTHORIZED_KEYS, KeyFileError, key_dir, load_keypair

    if log_level.lower() not in LOG_LEVELS or stage_log_level.lower() not in LOG_LEVELS:
        raise _fail(f"--log-level/--stage-log-level: choose one of {', '.join(LOG_LEVELS)}")
    if max_request_mb <= 0 or hang_s <= 0 or drain_timeout_s < 0 or (store_max_mb is not None and store_max_mb <= 0):
        raise _fail("--max-request-mb, --hang-s and --store-max-mb must be more than 0")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s edgepipe-agent[%(process)d] %(message)s")
    try:
        ports = parse_port_range(data_ports)
        keys = key_dir()
        if insecure:
            logging.getLogger("edgepipe.agent").warning(
                "INSECURE: --insecure given; the control endpoint %s accepts anyone who can reach it, and they "
                "can deploy and run code on this device", listen)
            keypair, key_file, operators = None, None, ()
        else:
            key_file = Path(key) if key is not None else keys / "device.key_secret"
            keypair = load_keypair(key_file)
            operators = tuple(authorized_keys) or (str(keys / AUTHORIZED_KEYS),)
            for source in operators:
                if not Path(source).expanduser().exists() and len(source) != 40:
                    raise KeyFileError(f"{source}: no authorized keys file; put the workstation's public key in it "
                                       "(one per line) or pass --authorized-keys")
        config = DaemonConfig(
            listen=listen, device=device or platform.node(), state_dir=(state_dir or default_state_dir()),
            keypair=keypair, authorized_keys=operators, key_file=key_file, threads=threads,
            max_request_bytes=int(max_request_mb * 2**20), ready_file=ready_file, data_bind=data_bind,
            data_ports=ports, hang_s=hang_s, drain_timeout_s=drain_timeout_s,
            store_quota_bytes=None if store_max_mb is None else int(store_max_mb * 2**20),
            stage_log_level=stage_log_level.lower())
    except (KeyFileError, ValueError) as exc:
        raise _fail(str(exc)) from None
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        os.umask(0o027)  # the store and logs are nobody else's business
        run_daemon(config, stop, reload)
    except (TransportError, OSError, BadRequest, KeyFileError) as exc:
        raise _fail(str(exc)) from None


app.command("daemon")(daemon_cmd)
app.command("control", help="Alias of `daemon` (the name before deployments existed).")(daemon_cmd)


@app.command("unit")
def unit_cmd(
    user: str = typer.Option("edgepipe", "--user", help="The account the daemon runs as."),
    state_dir: Path = typer.Option(Path("/var/lib/edgepipe"), "--state-dir", help="The daemon's --state-dir."),
    keys: Path = typer.Option(Path("/etc/edgepipe/keys"), "--keys", help="Key directory (device.key_secret, "
                              "authorized_keys)."),
    listen: str = typer.Option("tcp://*:5560", "--listen", help="The daemon's --listen."),
    device: str = typer.Option("%H", "--device", help="The device's name in the cluster file (%H: the host name)."),
    install: bool = typer.Option(False, "--install", metavar="",
                                 help="Write /etc/systemd/system/edgepipe-agent.service (needs root) instead of "
                                 "printing it."),
) -> None:
    """Print (or install) the systemd unit that runs `edgepipe-agent daemon` on this device.

    Example, as root on a fresh device:

      edgepipe-agent unit --install && systemctl daemon-reload && systemctl enable --now edgepipe-agent
    """
    from edgepipe.agent.device.unit import UNIT_PATH, render_unit

    text = render_unit(executable=Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "edgepipe-agent"
                       else Path(sys.executable).with_name("edgepipe-agent"),
                       user=user, state_dir=state_dir, key_dir=keys, listen=listen, device=device)
    if not install:
        typer.echo(text, nl=False)
        return
    try:
        UNIT_PATH.write_text(text)
    except OSError as exc:
        raise _fail(f"cannot write {UNIT_PATH}: {exc.strerror} (run as root)") from None
    typer.echo(f"wrote {UNIT_PATH}; now: systemctl daemon-reload && systemctl enable --now edgepipe-agent")


@app.command("metrics")
def metrics_cmd(
    control: str = typer.Option(..., "--control", help="The stage's control endpoint (serve --control), "
                                "e.g. tcp://127.0.0.1:5560."),
    listen: str = typer.Option("127.0.0.1:9101", "--listen", help="HOST:PORT to serve /metrics on."),
    ready_file: Path | None = typer.Option(None, "--ready-file", help="Write {pid, url} JSON once serving."),
) -> None:
    """Serve a stage's counters in the Prometheus text format (needs: pip install 'edgepipe\\[metrics]').

    At every scrape the stage's control endpoint is asked for its status; requests, errors, queue
    depth, busy fraction and bytes in/out are published with the labels stage, device and model.
    edgepipe_up is 0 while the stage does not answer. Runs until SIGTERM/SIGINT.

    Example: edgepipe-agent metrics --control tcp://127.0.0.1:5560 --listen 0.0.0.0:9101
    """
    from edgepipe.agent.device.metrics import MetricsUnavailable, serve_metrics

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise _fail(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9101")
    try:
        server, _thread = serve_metrics(control, host, int(port))
    except MetricsUnavailable as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"--listen {listen}: {exc.strerror or exc}") from None
    url = f"http://{host}:{server.server_address[1]}/metrics"
    if ready_file is not None:
        ready_file.write_text(json.dumps({"pid": os.getpid(), "url": url}))
    typer.echo(f"serving {url} for {control}", err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.shutdown()


@app.command("keygen")
def keygen_cmd(
    name: str = typer.Option("device", "--name", help="Key file name: NAME.key (public) and NAME.key_secret."),
    key_dir: Path | None = typer.Option(None, "--dir", help="Where to write the keys "
                                        "[$EDGEPIPE_KEYS, else ~/.config/edgepipe/keys]."),
    force: bool = typer.Option(False, "--force", help="Replace an existing keypair of that name."),
    as_json: bool = typer.Option(False, "--json", help="Print {name, public_key, public_file, secret_file}."),
) -> None:
    """Create this machine's CurveZMQ keypair and print its public key.

    Run it once on each device (and on the workstation and each client machine, with --name
    workstation / --name client). The secret key never leaves the machine; copy the printed public
    key into the cluster file (devices) or into the devices' authorized_keys (the workstation).

    Example: edgepipe-agent keygen --dir /etc/edgepipe/keys
    """
    from edgepipe.agent.formats.keys import KeyFileError, generate_keypair
    from edgepipe.agent.formats.keys import key_dir as default_key_dir

    try:
        pair, public, secret = generate_keypair(default_key_dir(key_dir), name, overwrite=force)
    except (KeyFileError, OSError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps({"name": name, "public_key": pair.public_text, "public_file": str(public),
                               "secret_file": str(secret)}))
        return
    typer.echo(f"public key {pair.public_text}")
    typer.echo(f"wrote {public} (share it) and {secret} (mode 0600, never copy it)")


def main() -> None:
    app(prog_name="edgepipe-agent")


if __name__ == "__main__":
    main()
