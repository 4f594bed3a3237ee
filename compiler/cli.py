"""`edgepipe-compile`: turn a model into one verified stage bundle per device."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from edgepipe.agent.formats.bundle import BundleError
from edgepipe.compiler.build import (
    CompileError,
    CompileResult,
    candidate_cuts,
    compile_model,
    cut_summary,
    load_model,
    spec_for,
)
from edgepipe.compiler.cuts import Cut, CutError, describe_cut
from edgepipe.compiler.export import DEFAULT_OPSET, ExportError
from edgepipe.compiler.lossy_cli import (
    BudgetExceeded,
    add_lossy_measurements,
    build_within_budget,
    lossy_options,
    print_accuracy,
)
from edgepipe.compiler.quantize import QuantizeError
from edgepipe.compiler.verify import DEFAULT_TOLERANCE, VerificationError
from edgepipe.models.registry import REGISTRY, ModelError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)


def console_for_output(stderr: bool = False) -> Console:
    """A console for tables: the terminal's width on a terminal; when piped, wide enough that no
    table is cut or folded (``| cat``, ``| less -S``, files). The planner helper publishes the same
    helper as edgepipe.planner.tables_ui.console_for_output; use that one once both are merged."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=1000, soft_wrap=True)


console = console_for_output()
err = console_for_output(stderr=True)

# Bad input (exit 2): the user asked for something that does not exist or cannot be done.
INPUT_ERRORS = (CompileError, CutError, ModelError, BundleError, ValueError)
# Failures while doing what was asked (exit 1).
RUN_ERRORS = (ExportError, VerificationError, OSError, BudgetExceeded, QuantizeError)
FLAG = ""  # metavar for on/off flags: no "<bool>" column in --help


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value:
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.command(
    context_settings={"help_option_names": []},
    epilog=(
        "Examples:\n\n"
        "  edgepipe-compile vit_base_patch16_224 -o build/vitb --stages 4\n\n"
        "  edgepipe-compile bert_base -o build/bert --stages 4\n\n"
        "  edgepipe-compile vit_base_patch16_224 -o build/vitb --cuts blocks.4,blocks.8\n\n"
        "  edgepipe-compile vit_large_patch16_224 -o build/vitl --cluster cluster.toml\n\n"
        "  edgepipe-compile --onnx model.onnx --list-cuts --max-tensors 2"
    )
)
def compile_command(
    model: Annotated[str | None, typer.Argument(metavar="MODEL", show_default=False,
                                                help="Registry model name (see --list-models).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False, help=(
        "Directory for the stage bundles (required to compile; e.g. build/MODEL)."))] = None,
    onnx: Annotated[Path | None, typer.Option(help="Compile this ONNX file (external data beside it).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local weights (.pth/.safetensors) to load.")] = None,
    stages: Annotated[int | None, typer.Option(help=(
        "Split into N stages balanced by estimated FLOPs [1: the whole model in one bundle]."))] = None,
    cuts: Annotated[str | None, typer.Option(help="Comma-separated cut labels or tensor names.")] = None,
    cluster: Annotated[Path | None, typer.Option(help="Cluster TOML: the planner picks devices and cuts.")] = None,
    plan: Annotated[Path | None, typer.Option(help="Slice by an existing plan.json.")] = None,
    microbatch: Annotated[int, typer.Option(help="Microbatch size the plan is made for.")] = 8,
    max_tensors: Annotated[int, typer.Option(help=(
        "Allow cuts sending up to N activation tensors (2 = sub-block; forwarded model inputs such as "
        "attention masks are not counted, their bytes are)."))] = 1,
    list_cuts: Annotated[bool, typer.Option("--list-cuts", metavar=FLAG, help=(
        "Print where the model can be cut (a label means: cut in front of that module) and stop."))] = False,
    list_models: Annotated[bool, typer.Option("--list-models", metavar=FLAG,
                                              help="Print the model registry and stop.")] = False,
    problem_out: Annotated[Path | None, typer.Option(help="With --cluster: also write the planner problem.")] = None,
    profile: Annotated[bool, typer.Option("--profile", metavar=FLAG, help=(
        "With --cluster: profile every device through its control endpoint (edgepipe-agent control) "
        "and plan with the measured times."))] = False,
    profiles_dir: Annotated[Path | None, typer.Option(help=(
        "With --cluster: device profiles (<device>.json) to reuse or write [OUT/profiles]."))] = None,
    profile_threads: Annotated[int, typer.Option(min=1, help="With --profile: ONNX Runtime threads per device "
                                                  "(as the agents will serve).")] = 1,
    from_run: Annotated[Path | None, typer.Option("--from-run", metavar="RUN.json", help=(
        "With --cluster: learn from a measured run (edgepipe-submit --report PLAN --trace RUN.json): update "
        "the stored profiles of the run's devices with the compute times it measured (same model, device, "
        "microbatch, ONNX Runtime version), re-plan, and say whether another plan would be faster and by "
        "how much."))] = None,
    probe_links: Annotated[bool, typer.Option("--probe-links", metavar=FLAG, help=(
        "With --cluster: have the devices measure bandwidth and latency to each other."))] = False,
    profile_bundle: Annotated[Path | None, typer.Option(
        help="Write the profiling bundle (one piece per distinct segment) to this dir and stop.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help=(
        "With --profile/--probe-links/--from-run: this workstation's secret key (default: workstation.key_secret in "
        "$EDGEPIPE_KEYS or ~/.config/edgepipe/keys)."))] = None,
    insecure: Annotated[bool, typer.Option("--insecure", metavar=FLAG, help=(
        "With --profile/--probe-links/--from-run: talk to daemons started with --insecure (plaintext, no "
        "authentication)."))] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset for the export.")] = DEFAULT_OPSET,
    verify: Annotated[bool, typer.Option(metavar=FLAG, help="Check chained stages reproduce the whole model.")] = True,
    tolerance: Annotated[float, typer.Option(help="Largest allowed |difference| when verifying.")] = DEFAULT_TOLERANCE,
    as_json: Annotated[bool, typer.Option("--json", metavar=FLAG,
                                          help="Print machine-readable JSON instead of tables.")] = False,
    # --- lossy choices (compiler/lossy_cli.py, docs/compression.md) ---
    max_error: Annotated[str | None, typer.Option(metavar="SPEC", help=(
        "Let the planner compress hops (fp16/int8) and quantize stages (int8 weights) while the model's outputs "
        "stay within this error of fp32: 0.05 (max |Δ|) or max_abs=0.05,cosine=0.999,top1=0.99 (any subset). "
        "The built pipeline is measured; a plan over budget is re-planned or refused."))] = None,
    calibration: Annotated[Path | None, typer.Option(metavar="FILE|DIR", help=(
        "Sample inputs for measuring errors: FILE.npy (one input), FILE.npz (an array per input name) or a "
        "folder of images (default: the registry's example inputs)."))] = None,
    calibration_samples: Annotated[int, typer.Option(help="Use at most N calibration samples.")] = 8,
    int8_weights: Annotated[str | None, typer.Option(metavar="all|K,..", help=(
        "Without a cluster: build these stages with int8 weights (ONNX Runtime quantize_dynamic)."))] = None,
    hop_codecs: Annotated[str | None, typer.Option(metavar="CODEC[,..]", help=(
        "Without a cluster: codec of each stage-to-stage hop (raw, fp16, int8), one for all or one per hop; "
        "the measured error is reported."))] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", metavar=FLAG, help=(
        "With --max-error: offer int8 weights to the planner (else only hop codecs); with --profile the "
        "devices then also time each piece with int8 weights."))] = True,
    int8_pieces: Annotated[bool, typer.Option("--int8-pieces", metavar=FLAG, help=(
        "With --profile-bundle: add each piece's int8-weights twin, so profiles carry int8 times."))] = False,
    _help: Annotated[bool, typer.Option("--help", metavar=FLAG, is_eager=True, callback=_show_help,
                                        expose_value=False, help="Show this message and exit.")] = False,
) -> None:
    """Export a model to ONNX, find where it can be cut, and slice it into hash-checked stage bundles.

    Each bundle (OUT/stage-K) holds the stage's graph, only the weights it uses, and a manifest
    with the sha256 of every file. By default the chained stages are run against the whole model
    in ONNX Runtime and the compile fails if they differ beyond --tolerance.
    """
    try:
        if max_tensors < 1:
            raise CompileError(f"--max-tensors must be at least 1, got {max_tensors}")
        if list_models:
            _print_models(as_json)
            return
        if list_cuts:
            _list_cuts(model, onnx, checkpoint, opset, max_tensors, as_json)
            return
        if profile_bundle is not None:
            _write_profile_bundle(model, onnx, checkpoint, opset, max_tensors, profile_bundle, as_json, int8_pieces)
            return
        if stages is not None and stages < 1:
            raise CompileError(f"--stages must be at least 1, got {stages}")
        chosen = [c for c in cuts.split(",") if c.strip()] if cuts else None
        if sum(x is not None for x in (stages, chosen, cluster, plan)) > 1:
            raise CompileError("choose one of --stages, --cuts, --cluster, --plan")
        if model is None and onnx is None:
            raise CompileError("give a model name (see --list-models) or --onnx FILE")
        if cluster is None and (profile or probe_links or profiles_dir is not None):
            raise CompileError("--profile, --profiles-dir and --probe-links need --cluster")
        if out is None:
            name = model or (onnx.stem if onnx else "model")
            raise CompileError(f"say where the bundles go: -o DIR (e.g. -o build/{name}); "
                               f"--list-cuts shows where the model can be cut without writing anything")
        lossy = lossy_options(max_error, calibration, calibration_samples, int8_weights, hop_codecs, int8)
        plan_obj = problem_obj = None
        if cluster is not None:
            plan_obj, problem_obj = _plan_for_cluster(
                model, onnx, checkpoint, opset, cluster, microbatch, max_tensors, out, problem_out, as_json,
                profile=profile, profiles_dir=profiles_dir, profile_threads=profile_threads, probe=probe_links,
                from_run=from_run, lossy=lossy, key=key, insecure=insecure)
        elif profile or probe_links or profiles_dir is not None or from_run is not None:
            raise CompileError("--profile, --profiles-dir, --probe-links and --from-run need --cluster")
        elif plan is not None:
            from edgepipe.planner.plan import load_plan

            plan_obj = load_plan(plan)
        result = build_within_budget(lossy, plan_obj, problem_obj, out, lambda plan_to_build: _compile_with_progress(
            model, out, onnx=onnx, stages=stages, cuts=chosen, plan=plan_to_build, checkpoint=checkpoint,
            opset=opset, max_tensors=max_tensors, verify=verify, tolerance=tolerance, quiet=as_json, lossy=lossy,
        ), err, as_json)
    except RUN_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)  # one line, never wrapped
        raise typer.Exit(1) from None
    except INPUT_ERRORS as exc:  # planner/cluster input errors are ValueErrors too
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(json.loads((result.out_dir / "compile.json").read_text()), indent=2))
    else:
        _print_result(result)


def _compile_with_progress(model, out, quiet: bool, **kwargs) -> CompileResult:
    if quiet:
        return compile_model(model, out, **kwargs)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task("loading", total=1.0)

        def progress(step: str, fraction: float) -> None:
            bar.update(task, description=step, completed=fraction)

        return compile_model(model, out, progress=progress, **kwargs)


def _print_models(as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"name": e.name, "family": e.family, "source": e.source, "exporter": e.exporter,
                           "inputs": [{"name": i.name, "shape": i.shape, "dtype": i.dtype, "values": i.values.kind}
                                      for i in e.inputs],
                           "description": e.description} for e in REGISTRY.values()], indent=2))
        return
    table = Table(title="Models (random weights unless --checkpoint)")
    for col in ("name", "family", "source", "exporter", "inputs", "description"):
        table.add_column(col)
    for e in REGISTRY.values():
        inputs = ", ".join(f"{i.name} {'x'.join(map(str, i.shape))}" for i in e.inputs)
        table.add_row(e.name, e.family, e.source, e.exporter, inputs, e.description)
    console.print(table)


def _list_cuts(model, onnx, checkpoint, opset, max_tensors, as_json) -> None:
    loaded = load_model(model, onnx, checkpoint, opset)
    cuts = candidate_cuts(loaded, max_tensors)
    spec = spec_for(loaded, cuts)
    rows = [_cut_row(loaded.index, c, s) for c, s in zip(cuts, spec.segments[1:])]
    if as_json:
        print(json.dumps({"model_id": loaded.identity.model_id, "model_sha256": loaded.identity.model_sha256,
                          "fixed_batch": loaded.fixed_batch, "cuts": rows}, indent=2))
        return
    table = Table(title=f"Candidate cuts of {loaded.identity.model_id} (≤{max_tensors} tensor(s) sent)",
                  caption="label = cut in front of that module (@name: in front of that node); the stage "
                          "after a cut rebuilds masks and shape values itself from the forwarded inputs")
    table.add_column("#", justify="right")
    table.add_column("label", no_wrap=True)
    table.add_column("where")
    table.add_column("sends")
    table.add_column("forwards")
    table.add_column("rebuilds", justify="right")
    for col in ("bytes/sample", "next segment GFLOP", "next segment weights"):
        table.add_column(col, justify="right")
    for i, row in enumerate(rows):
        table.add_row(str(i), row["label"], row["where"], ", ".join(row["tensors"]), ", ".join(row["forwarded"]),
                      str(len(row["rebuilt"])) if row["rebuilt"] else "", _size(row["bytes_per_sample"]),
                      f"{row['segment_gflop']:.3f}", _size(row["segment_weight_bytes"]))
    console.print(table)
    if loaded.fixed_batch is not None:
        err.print(f"[yellow]note:[/yellow] {_fixed_batch_note(loaded.fixed_batch)}", highlight=False)


def _fixed_batch_note(batch: int) -> str:
    return (f"the model has a fixed batch size of {batch} (exported without a dynamic batch axis): "
            f"its stages accept only batches of {batch}")


def _write_profile_bundle(model, onnx, checkpoint, opset, max_tensors, out: Path, as_json: bool,
                          int8_pieces: bool = False) -> None:
    from edgepipe.compiler.profiling import write_profile_bundle

    loaded = load_model(model, onnx, checkpoint, opset)
    cuts = candidate_cuts(loaded, max_tensors)
    bundle = write_profile_bundle(loaded.model, cuts, out, loaded.identity, int8=int8_pieces)
    summary = {"dir": str(out), "model_id": bundle.model_id, "model_sha256": bundle.model_sha256,
               "segments": len(bundle.segment_names), "pieces": bundle.piece_count}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"profiling bundle {out}: {summary['segments']} segments in {summary['pieces']} distinct "
                      f"pieces; run it on each device with: edgepipe-agent profile {out} --device NAME")


def _cut_row(index, cut: Cut, segment) -> dict:
    return {**cut_summary(cut), "where": describe_cut(index, cut), "segment_gflop": segment.flops / 1e9,
            "segment_weight_bytes": segment.weight_bytes}


def _plan_for_cluster(model, onnx, checkpoint, opset, cluster_path, microbatch, max_tensors, out,
                      problem_out, quiet, *, profile=False, profiles_dir=None, profile_threads=1, probe=False,
                      from_run=None, lossy=None, key=None, insecure=False):
    import dataclasses
    import shutil

    from edgepipe.compiler.planning import apply_profiles, load_device_profiles, profile_warnings, usable_devices
    from edgepipe.planner.baselines import all_baselines
    from edgepipe.planner.cluster import load_cluster, problem_for
    from edgepipe.planner.explain import explain
    from edgepipe.planner.plan import save_plan
    from edgepipe.planner.problem import save_problem
    from edgepipe.planner.solver import solve

    if profiles_dir is not None and not profile and not Path(profiles_dir).is_dir():
        raise CompileError(f"--profiles-dir {profiles_dir}: no such directory; add --profile to measure the devices")
    loaded = load_model(model, onnx, checkpoint, opset)
    cluster = load_cluster(cluster_path)
    cuts = candidate_cuts(loaded, max_tensors)
    spec = spec_for(loaded, cuts)
    profiles_dir = Path(profiles_dir) if profiles_dir is not None else Path(out) / "profiles"
    left_out: dict[str, str] = {}
    keypair = _workstation_keypair(key, insecure) if profile or probe or from_run is not None else None
    run = None
    if from_run is not None:
        if profile:
            raise CompileError("--from-run learns from a run's measurements; do not combine it with --profile")
        run = _learn_from_run(from_run, cluster, spec, profiles_dir, quiet, keypair)
    if profile or profiles_dir.is_dir():
        if profile:
            profiles, missing = _profile_devices(loaded, cuts, cluster, profiles_dir, microbatch, profile_threads,
                                                 quiet, keypair, int8=lossy is not None and lossy.max_error is not None
                                                 and lossy.offer_int8)
        else:
            profiles, missing = load_device_profiles(profiles_dir, cluster, spec)
        short = [p.device for p in profiles if microbatch not in p.seconds]
        missing.update({d: f"profile has no timings at microbatch {microbatch}" for d in short})
        profiles = [p for p in profiles if p.device not in short]
        cluster = apply_profiles(cluster, profiles)
        for line in profile_warnings(profiles, microbatch):
            err.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
        cluster, left_out = usable_devices(cluster, microbatch)
        _print_profile_sources(cluster, profiles, missing, left_out, quiet)
    if probe:
        cluster = _probe_links(cluster, spec, profiles_dir, microbatch, quiet, keypair)
    problem = problem_for(cluster, spec, microbatch)
    problem = add_lossy_measurements(loaded, cuts, problem, lossy, quiet, err)
    if problem_out is not None:
        Path(problem_out).parent.mkdir(parents=True, exist_ok=True)
        save_problem(problem, problem_out)
    plan = solve(problem)
    if left_out:
        plan = dataclasses.replace(plan, left_out={**plan.left_out, **left_out})
    Path(out).mkdir(parents=True, exist_ok=True)
    save_plan(plan, Path(out) / "plan.json")
    # What `edgepipe-fleet deploy OUT` reads (devices' daemons and keys) and what a failover re-plans from.
    save_problem(problem, Path(out) / "problem.json")
    if Path(cluster_path).resolve() != (Path(out) / "cluster.toml").resolve():
        shutil.copyfile(cluster_path, Path(out) / "cluster.toml")
    if not quiet:
        console.print(explain(problem, plan, all_baselines(problem, plan.microbatch)))
    if run is not None:
        from edgepipe.compiler.planning import compare_with_run, comparison_lines

        for line in comparison_lines(compare_with_run(problem, run, plan)):
            err.print(f"from run: {line}", highlight=False, markup=False)
    return plan, problem


def _learn_from_run(run_path: Path, cluster, spec, profiles_dir: Path, quiet: bool, keypair):
    from edgepipe.agent.formats.profiles import ProfileError
    from edgepipe.compiler.planning import learn_from_run

    try:
        run, observations = learn_from_run(run_path, cluster, spec, profiles_dir, keypair)
    except ProfileError as exc:
        raise CompileError(f"--from-run {run_path}: {exc}") from None
    for o in observations:
        if not o.updated:
            err.print(f"[yellow]from run:[/yellow] {o.device}: profile not updated: {o.reason}", highlight=False)
    if not quiet:
        table = Table(title=f"Learned from {run_path} (compute per microbatch {observations[0].microbatch})")
        for col in ("stage", "device", "segments", "profiled ms", "measured ms", "profile"):
            table.add_column(col)
        for o in observations:
            profiled = f"{o.profiled_s * 1000:.1f}" if o.profiled_s is not None else "-"
            table.add_row(str(o.stage), o.device, f"{o.first_segment}:{o.end_segment}", profiled,
                          f"{o.measured_s * 1000:.1f}", ("updated " if o.updated else "not updated: ") + o.reason)
        console.print(table)
    return run


def _workstation_keypair(key: Path | None, insecure: bool):
    from edgepipe.agent.formats.keys import key_dir, load_keypair

    if insecure:
        err.print("[yellow]warning:[/yellow] --insecure: profiling requests are plaintext and unauthenticated",
                  highlight=False)
        return None
    return load_keypair(key or key_dir() / "workstation.key_secret")


def _profile_devices(loaded, cuts, cluster, profiles_dir: Path, microbatch: int, threads: int, quiet: bool,
                     keypair, int8: bool = False):
    from edgepipe.compiler.profiling import write_profile_bundle
    from edgepipe.compiler.remote_profile import profile_cluster

    bundle_dir = profiles_dir / "bundle"
    write_profile_bundle(loaded.model, cuts, bundle_dir, loaded.identity, int8=int8)
    with Progress(TextColumn("profiling devices"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=quiet) as bar:
        task = bar.add_task("profile", total=len(cluster.devices))
        return profile_cluster(cluster, bundle_dir, profiles_dir, (microbatch,), threads,
                               on_device=lambda _outcome: bar.advance(task), keypair=keypair)


def _probe_links(cluster, spec, profiles_dir: Path, microbatch: int, quiet: bool, keypair):
    import dataclasses

    from edgepipe.compiler.remote_profile import merge_links, probe_links

    # the largest activation a stage may send: what the planner's link times are about
    tensor_bytes = min(max(s.out_bytes for s in spec.segments) * microbatch, 64 * 2**20)
    links, failures = probe_links(cluster, profiles_dir, tensor_bytes, keypair=keypair)
    for pair, reason in failures.items():
        err.print(f"[yellow]link {pair} not measured:[/yellow] {reason}", highlight=False)
    if not quiet and links:
        table = Table(title=f"Measured links ({_size(tensor_bytes)} messages)")
        for col in ("a", "b", "Mbps", "latency ms"):
            table.add_column(col)
        for k in links:
            table.add_row(k.a, k.b, f"{k.bandwidth_mbps:.0f}", f"{k.latency_s * 1000:.2f}")
        console.print(table)
    return dataclasses.replace(cluster, links=merge_links(cluster.links, links))


def _print_profile_sources(cluster, profiles, missing: dict[str, str], left_out: dict[str, str], quiet: bool):
    for device, reason in {**missing, **left_out}.items():
        err.print(f"[yellow]{device}:[/yellow] {reason}", highlight=False)
    if quiet:
        return
    measured = {p.device for p in profiles}
    profiled_types = {t.name for t in cluster.device_types if t.profiles}
    table = Table(title="Device compute times used by the planner")
    for col in ("device", "type", "source"):
        table.add_column(col)
    for device in cluster.devices:
        if device.name in measured:
            source = "its measured profile"
        elif device.type in profiled_types:
            source = "median profile of its type's other devices"
        else:
            source = "cluster file (gflops or reference + speed)"
        table.add_row(device.name, device.type, source)
    console.print(table)


def _print_result(result: CompileResult) -> None:
    table = Table(title=f"{result.model_id}: {len(result.bundle_dirs)} stage bundle(s) in {result.out_dir}")
    for col, justify in (("stage", "right"), ("from cut", "left"), ("to cut", "left"), ("params", "right"),
                         ("weights", "right"), ("GFLOP", "right"), ("out bytes/sample", "right"),
                         ("forwarded in", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    planned = any(row["device"] for row in result.stage_rows)
    if planned:
        table.add_column("device")
    for row in result.stage_rows:
        gflop = "" if row["gflop"] is None else f"{row['gflop']:.3f}"
        cells = [str(row["stage"]), row["cut_in"] or "(input)", row["cut_out"] or "(output)",
                 f"{row['params'] / 1e6:.2f} M",
                 _size(row["weight_bytes"]) + ("" if row.get("weights", "float32") == "float32"
                                               else f" {row['weights']}"),
                 gflop, _size(row["out_bytes_per_sample"]), ", ".join(row["forwarded_in"])]
        table.add_row(*cells, *([row["device"]] if planned else []))
    console.print(table)
    for cut in result.cuts:
        if cut.rebuilt:
            names = ", ".join(cut.rebuilt[:3]) + (f" and {len(cut.rebuilt) - 3} more" if len(cut.rebuilt) > 3 else "")
            source = f"the forwarded {', '.join(cut.forwarded)}" if cut.forwarded else "the received tensor's shape"
            saved = (f"instead of receiving {_size(cut.rebuilt_bytes_per_sample)}/sample"
                     if cut.rebuilt_bytes_per_sample else "(shape values without a batch axis cannot be sent)")
            console.print(f"cut {cut.label}: the next stage rebuilds {names} from {source} {saved}", highlight=False)
    if result.source == "onnx":
        console.print(f"model {result.model_path} (ONNX file, sha256 {result.model_sha256[:12]})")
    else:
        source = "cached export" if result.export_cached else "fresh export"
        console.print(f"model {result.model_path} ({source} by {result.exporter}, sha256 {result.model_sha256[:12]})")
    if result.balance is not None and len(result.balance.stage_flops) > 1:
        b = result.balance
        console.print(f"balance: largest stage {b.worst_ratio:.2f}x, smallest {b.least_ratio:.2f}x the mean "
                      f"stage's estimated FLOPs")
        for warning in b.warnings:
            err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if result.fixed_batch is not None:
        err.print(f"[yellow]note:[/yellow] {_fixed_batch_note(result.fixed_batch)}", highlight=False)
    if len(result.bundle_dirs) == 1 and result.plan is None:
        console.print("one stage (the whole model): split it with --stages N, --cuts or --cluster")
    if result.verification is not None:
        v = result.verification
        console.print(f"verified: chained stages vs whole model, batch {v.batch}: max |Δ| = {v.worst:.3g} "
                      f"(tolerance {v.tolerance:g}) [green]OK[/green]")
    else:
        console.print("[yellow]not verified (--no-verify)[/yellow]")
    print_accuracy(result.accuracy, console)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
