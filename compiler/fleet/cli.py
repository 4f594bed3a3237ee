"""`edgepipe-fleet`: deploy a compiled build onto its devices, watch it, stop it, keep it running.

Every device runs `edgepipe-agent daemon` (docs/operations.md); the build directory holds the stage
bundles, the plan and the cluster file (each device's control endpoint and public key).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from edgepipe.agent.formats.control import ControlError
from edgepipe.agent.formats.keys import KeyFileError, KeyPair, key_dir, load_keypair
from edgepipe.compiler.fleet.build import Build, BuildError, load_build, workstation_key_check
from edgepipe.compiler.fleet.deploy import DeployError, DeployOptions, DeviceProgress, Fleet, deploy, stop
from edgepipe.compiler.fleet.state import DeploymentState, StateError, load_state
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Deploy compiled stage bundles onto device daemons; status, stop, redeploy, failover.")
console = Console()
err = Console(stderr=True)

FLAG = ""  # metavar of on/off flags: no "<bool>" in --help
KeyOpt = Annotated[Path | None, typer.Option("--key", help="This workstation's secret key "
                                             "[$EDGEPIPE_KEYS or ~/.config/edgepipe/keys, workstation.key_secret].")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", metavar=FLAG, help="Talk to daemons started with --insecure "
                                           "(plaintext, no authentication). Testing only.")]
ClusterOpt = Annotated[Path | None, typer.Option("--cluster", help="Cluster file [BUILD/cluster.toml].")]
def _show_help(ctx: typer.Context, value: bool) -> None:
    if value:
        typer.echo(ctx.get_help())
        raise typer.Exit()


# Each command's own --help, so that it too shows no "<bool>" column.
HelpOpt = Annotated[bool, typer.Option("--help", metavar=FLAG, is_eager=True, callback=_show_help,
                                       expose_value=False, help="Show this message and exit.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar=FLAG, help="Print JSON instead of tables.")]


class BadInput(Exception):
    """Exit code 2: the user's input is wrong (not the fleet)."""


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"edgepipe-fleet: error: {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _keypair(key: Path | None, insecure: bool) -> KeyPair | None:
    if insecure:
        err.print("[yellow]warning:[/yellow] --insecure: control requests are plaintext and unauthenticated",
                  highlight=False)
        return None
    return load_keypair(key or key_dir() / "workstation.key_secret")


def _run(work: Any) -> Any:
    """Map errors to one line: exit 2 for bad input, 1 for a deployment that failed."""
    try:
        return work()
    except (BuildError, KeyFileError, StateError, BadInput, ValueError) as exc:
        raise _fail(str(exc), 2) from None
    except (DeployError, ControlError, OSError) as exc:
        raise _fail(str(exc), 1) from None


def _load(build_dir: Path, cluster: Path | None, devices: str | None, insecure: bool) -> Build:
    names = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    return load_build(build_dir, cluster_path=cluster, devices=names, insecure=insecure)


# -- deploy --------------------------------------------------------------------------------------------

@app.command("deploy", context_settings={"help_option_names": []})
def deploy_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Compile output: stage-K bundles, plan.json, cluster.toml.")],
    cluster: ClusterOpt = None,
    devices: Annotated[str | None, typer.Option("--devices", help="Device per stage, e.g. d0,d1,d2 "
                                                "(instead of the plan's).")] = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    replace: Annotated[bool, typer.Option("--replace", metavar=FLAG, help="Take over devices that serve another "
                                          "deployment (its stages there are stopped).")] = False,
    threads: Annotated[int, typer.Option("--threads", min=1, help="ONNX Runtime threads per stage.")] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Largest microbatch accepted.")] = 256,
    no_drain: Annotated[bool, typer.Option("--no-drain", metavar=FLAG, help="Kill replaced stages at once instead of "
                                           "letting them send on their in-flight work.")] = False,
    endpoints: Annotated[Path | None, typer.Option("--endpoints", help="Where to write the endpoints file "
                                                   "[BUILD/endpoints.json].")] = None,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="How long stages may take to get ready.")] = 180.0,
    watch: Annotated[bool, typer.Option("--watch", metavar=FLAG,
                                        help="Then keep supervising (see `supervise`).")] = False,
    as_json: JsonOpt = False,
    _help: HelpOpt = False,
) -> None:
    """Deploy a build: send the bundles, wire and start the stages, write endpoints.json.

    Each device gets only the files it lacks; stages start last to first; when all are ready,
    endpoints.json is written for `edgepipe-submit --endpoints` and `Client.from_endpoints`.

    Run it again after a new plan or compile: only changed stages are sent and restarted; the others
    are kept or rewired. A failed attempt is rolled back on every device it touched.

    Examples:

      edgepipe-fleet deploy build/vitb

      edgepipe-fleet deploy build/vitb --devices pi-a,pi-b,nuc --threads 4

      edgepipe-fleet deploy build/vitb --watch
    """
    def work() -> None:
        keypair = _keypair(key, insecure)
        build = _load(build_dir, cluster, devices, insecure)
        if keypair is not None and (warning := workstation_key_check(build.cluster, keypair.public_text)):
            err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
        fleet = Fleet(keypair, build.devices)
        prior = load_state(build_dir)
        options = DeployOptions(replace=replace, drain=not no_drain, threads=threads, max_batch=max_batch,
                                ready_timeout_s=timeout_s, endpoints_path=endpoints)
        outcome = _deploy_with_progress(build, fleet, options, prior, quiet=as_json)
        if as_json:
            print(json.dumps(_outcome_json(outcome), indent=2))
        else:
            _print_outcome(outcome)
        if watch:
            from edgepipe.compiler.fleet.supervise import SuperviseOptions, supervise

            supervise(build_dir, fleet, SuperviseOptions(cluster=cluster, threads=threads, max_batch=max_batch),
                      log=lambda line: err.print(line, highlight=False, soft_wrap=True))

    _run(work)


def _deploy_with_progress(build: Build, fleet: Fleet, options: DeployOptions, prior: DeploymentState | None,
                          quiet: bool) -> Any:
    if quiet:
        return deploy(build, fleet, options, prior=prior)
    columns = (TextColumn("{task.fields[device]:<12}"), TextColumn("{task.fields[stages]:<9}"), BarColumn(),
               TextColumn("sent {task.fields[sent]:>9}  cached {task.fields[cached]:>9}"),
               TextColumn("{task.fields[state]}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(p: DeviceProgress) -> None:
            if p.device not in tasks:
                tasks[p.device] = bar.add_task(p.device, total=max(p.total_bytes, 1), device=p.device,
                                               stages="stage " + ",".join(map(str, p.stages)), sent="-",
                                               cached="-", state=p.state)
            bar.update(tasks[p.device], completed=p.sent + p.cached if p.state != "ready" else max(p.total_bytes, 1),
                       sent=_size(p.sent), cached=_size(p.cached), state=p.error or p.state)

        return deploy(build, fleet, options, on_progress, prior=prior)


def _outcome_json(outcome: Any) -> dict[str, Any]:
    return {"deployment": outcome.state.deployment, "generation": outcome.state.generation,
            "endpoints": str(outcome.endpoints_path), "seconds": round(outcome.seconds, 3),
            "timings": {k: round(v, 3) for k, v in outcome.timings.items()},
            "entry": [p.endpoint for p in outcome.endpoints.entry],
            "exit": [p.endpoint for p in outcome.endpoints.exit],
            "insecure_data": outcome.endpoints.insecure, "devices": [asdict(d) for d in outcome.devices]}


def _print_outcome(outcome: Any) -> None:
    table = Table(title=f"deployment {outcome.state.deployment}, generation {outcome.state.generation}")
    for col in ("device", "stages", "sent", "cached", "stage instances"):
        table.add_column(col, justify="right" if col in ("sent", "cached") else "left")
    for d in outcome.devices:
        actions = ", ".join(f"{i} {a}" for i, a in sorted(d.actions.items())) or "-"
        table.add_row(d.device, ",".join(map(str, d.stages)), _size(d.sent), _size(d.cached), actions)
    console.print(table)
    steps = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in outcome.timings.items())
    console.print(f"ready in {outcome.seconds:.1f} s ({steps}); "
                  f"entry {', '.join(p.endpoint for p in outcome.endpoints.entry)}, exit "
                  f"{', '.join(p.endpoint for p in outcome.endpoints.exit)}")
    console.print(f"endpoints written to {outcome.endpoints_path}")
    if outcome.endpoints.insecure:
        console.print("[yellow]note:[/yellow] the stages' data sockets are plaintext (this serve has no "
                      "CurveZMQ data plane yet)", highlight=False)


# -- status ---------------------------------------------------------------------------------------------

@app.command("status", context_settings={"help_option_names": []})
def status_cmd(
    build_dir: Annotated[Path, typer.Argument(help="The deployed build directory.")],
    cluster: ClusterOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
    _help: HelpOpt = False,
) -> None:
    """Show every device and stage: state, requests, throughput, queue, heartbeat, errors.

    Exit code 1 if a stage is not ready or a device is unreachable.

    Example: edgepipe-fleet status build/vitb --json
    """
    from edgepipe.compiler.fleet.status import collect, healthy

    def work() -> bool:
        state, fleet = _deployed(build_dir, cluster, key, insecure)
        doc = collect(state, fleet)
        if as_json:
            print(json.dumps(doc, indent=2))
        else:
            _print_status(doc)
        return healthy(doc)

    if not _run(work):
        raise typer.Exit(1)


def _deployed(build_dir: Path, cluster: Path | None, key: Path | None, insecure: bool) -> tuple[DeploymentState, Fleet]:
    """The deployment made from ``build_dir`` and how to reach its daemons (insecure if it was
    deployed insecure)."""
    from edgepipe.compiler.fleet.build import CLUSTER_COPY, device_targets
    from edgepipe.planner.cluster import ClusterError, load_cluster

    state = load_state(build_dir)
    if state is None:
        raise BadInput(f"{build_dir}: nothing deployed from here (no deployment.json); run edgepipe-fleet deploy")
    try:
        targets = device_targets(load_cluster(cluster or Path(build_dir) / CLUSTER_COPY))
    except ClusterError as exc:
        raise BuildError(str(exc)) from None
    return state, Fleet(_keypair(key, insecure or state.insecure), targets)


def _print_status(doc: dict[str, Any]) -> None:
    title = f"deployment {doc['deployment']} generation {doc['generation']} ({doc['model_id']})"
    if doc["stopped"]:
        title += " (stopped)"
    table = Table(title=title)
    for col in ("device", "stage", "state", "pid", "up", "requests", "req/s", "queue", "errors", "heartbeat",
                "restarts", "last error"):
        table.add_column(col, overflow="fold")
    for row in doc["devices"]:
        if not row["reachable"]:
            table.add_row(row["device"], ",".join(row["expected"]) or "-",
                          "[red]lost[/red]" if row["lost"] else "[red]unreachable[/red]", *[""] * 8, row["error"])
            continue
        if row.get("foreign"):
            table.add_row(row["device"], "-", f"[yellow]serves {row['deployment']}[/yellow]", *[""] * 9)
            continue
        if not row["stages"]:
            table.add_row(row["device"], "-", "no stages" if not row["expected"] else "[red]not running[/red]",
                          *[""] * 9)
        for s in row["stages"]:
            colour = {"ready": "green", "starting": "yellow", "restarting": "yellow"}.get(s["state"], "red")
            table.add_row(
                row["device"], f"{s['id']} ({s['stage']}/{s['of']})", f"[{colour}]{s['state']}[/{colour}]",
                str(s["pid"] or "-"), _age(s["uptime_s"]), _n(s["requests"]),
                "-" if s["throughput"] is None else f"{s['throughput']:.1f}", _n(s["queue"]), _n(s["errors"]),
                "-" if s["heartbeat_age_s"] is None else f"{s['heartbeat_age_s']:.1f} s ago",
                f"{s['restarts']}" + (f" ({s['hangs']} hung)" if s["hangs"] else ""),
                s["last_error"] or (s["last_exit"] if s["restarts"] else "")
                or (f"down: {', '.join(s['neighbours_down'])}" if s["neighbours_down"] else ""))
    console.print(table)


# -- stop -----------------------------------------------------------------------------------------------

@app.command("stop", context_settings={"help_option_names": []})
def stop_cmd(
    build_dir: Annotated[Path, typer.Argument(help="The deployed build directory.")],
    cluster: ClusterOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    no_drain: Annotated[bool, typer.Option("--no-drain", metavar=FLAG,
                                           help="Kill the stages instead of draining them.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="Per device: how long its stages may take "
                                             "to drain.")] = 60.0,
    as_json: JsonOpt = False,
    _help: HelpOpt = False,
) -> None:
    """Stop the deployment, draining each stage into the next, first to last.

    Each stage sends on its in-flight work before it exits; the devices forget the deployment
    and endpoints.json is removed.

    Example: edgepipe-fleet stop build/vitb
    """
    def work() -> Any:
        state, fleet = _deployed(build_dir, cluster, key, insecure)
        return stop(state, fleet, build_dir, drain=not no_drain, timeout_s=timeout_s,
                    progress=None if as_json else lambda p: err.print(f"{p.device}: {p.error or p.state}",
                                                                      highlight=False))

    outcome = _run(work)
    if as_json:
        print(json.dumps({"stopped": list(outcome.stopped), "unreachable": outcome.unreachable,
                          "seconds": round(outcome.seconds, 3)}))
    else:
        console.print(f"stopped {len(outcome.stopped)} device(s) in {outcome.seconds:.1f} s"
                      + (f"; unreachable: {'; '.join(outcome.unreachable.values())}" if outcome.unreachable else ""))
    if outcome.unreachable:
        raise typer.Exit(1)


# -- supervise and standby -----------------------------------------------------------------------------

@app.command("supervise", context_settings={"help_option_names": []})
def supervise_cmd(
    build_dir: Annotated[Path, typer.Argument(help="The deployed build directory.")],
    cluster: ClusterOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    standby: Annotated[bool, typer.Option("--standby/--no-standby", metavar=FLAG,
                                          help="Make and pre-send the bundles for "
                                          "every single-device loss (in the background).")] = True,
    verify_standby: Annotated[bool, typer.Option("--verify-standby/--no-verify-standby", metavar=FLAG,
                                                 help="Check standby "
                                                 "bundles against the whole model, as compile does.")] = True,
    take_back: Annotated[bool, typer.Option("--take-back/--no-take-back", metavar=FLAG,
                                            help="When a lost device answers "
                                            "again, go back to the plan that uses it.")] = True,
    loss_s: Annotated[float, typer.Option("--loss-s", help="Silence after which a device is lost.")] = 1.5,
    take_back_after_s: Annotated[float, typer.Option("--take-back-after-s", help="How long a returned device "
                                                     "must answer before it is taken back.")] = 5.0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="ONNX Runtime threads per stage.")] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Largest microbatch accepted.")] = 256,
    events: Annotated[Path | None, typer.Option("--events", help="Append every event as a JSON line here.")] = None,
    _help: HelpOpt = False,
) -> None:
    """Keep the deployment running: fail over when a device is lost, take it back when it returns.

    Heartbeats every device; when one is silent for --loss-s, re-plans without it (from
    BUILD/problem.json), redeploys only what changed and bumps the generation (clients follow it
    through endpoints.json or a daemon's route answer). Runs until Ctrl-C.

    Examples:

      edgepipe-fleet supervise build/vitb

      edgepipe-fleet supervise build/vitb --events build/vitb/events.jsonl --no-take-back
    """
    from edgepipe.compiler.fleet.standby import StandbyError
    from edgepipe.compiler.fleet.supervise import SuperviseError, SuperviseOptions, supervise

    def work() -> None:
        _, fleet = _deployed(build_dir, cluster, key, insecure)
        options = SuperviseOptions(cluster=cluster, standby=standby, verify_standby=verify_standby,
                                   take_back=take_back, loss_s=loss_s, take_back_after_s=take_back_after_s,
                                   threads=threads, max_batch=max_batch, events=events)
        try:
            supervise(build_dir, fleet, options, log=lambda line: err.print(line, highlight=False, soft_wrap=True))
        except (SuperviseError, StandbyError) as exc:
            raise BadInput(str(exc)) from None

    try:
        _run(work)
    except KeyboardInterrupt:
        err.print("supervision stopped (the deployment keeps running)")


@app.command("standby", context_settings={"help_option_names": []})
def standby_cmd(
    build_dir: Annotated[Path, typer.Argument(help="The deployed build directory.")],
    cluster: ClusterOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", metavar=FLAG,
                                         help="Check the bundles against the whole "
                                         "model.")] = True,
    as_json: JsonOpt = False,
    _help: HelpOpt = False,
) -> None:
    """Make and pre-send the standby bundles for every single-device loss, then exit.

    This is what `supervise` does in the background; run it first to have failover ready at once.

    Example: edgepipe-fleet standby build/vitb
    """
    from edgepipe.compiler.fleet.standby import StandbyError, load_standby, make_standby, presend, write_ready

    def work() -> dict[str, Any]:
        _, fleet = _deployed(build_dir, cluster, key, insecure)
        original = load_build(build_dir, cluster_path=cluster, insecure=fleet.insecure)
        rows, builds, made = [], [original], []
        try:
            for device in original.used_devices():
                standby = make_standby(original, (device,), verify=verify,
                                       log=lambda line: err.print(line, highlight=False, soft_wrap=True))
                made.append(standby)
                builds.append(load_standby(build_dir, standby, cluster))
                rows.append({"lost": device, "devices": list(standby.plan.devices),
                             "cuts": [s.cut_in for s in standby.plan.stages[1:]],
                             "throughput": standby.plan.throughput, "dir": str(standby.dir)})
        except StandbyError as exc:
            raise DeployError(str(exc)) from None
        sent = presend(fleet, builds, log=lambda line: err.print(line, highlight=False))
        write_ready(build_dir, made, sent)
        return {"standby": rows, "sent": {d: {"sent": a, "cached": b} for d, (a, b) in sent.items()}}

    doc = _run(work)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    table = Table(title="standby plans (one per single-device loss)")
    for col in ("if lost", "runs on", "cuts", "samples/s (planned)"):
        table.add_column(col)
    for row in doc["standby"]:
        table.add_row(row["lost"], ", ".join(row["devices"]), ", ".join(row["cuts"]) or "-",
                      f"{row['throughput']:.1f}")
    console.print(table)
    console.print("pre-sent: " + ", ".join(f"{d} {_size(v['sent'])} (had {_size(v['cached'])})"
                                            for d, v in doc["sent"].items()))


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _n(value: Any) -> str:
    return "-" if value is None else str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    app(prog_name="edgepipe-fleet")


if __name__ == "__main__":
    sys.exit(main())
