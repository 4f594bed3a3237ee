"""`edgepipe-submit`: send batches to a running pipeline and report throughput and latency."""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import typer
from edgepipe.agent import clihelp
from edgepipe.agent.client.client import Client, ClientError, Result
from edgepipe.agent.client.inputs import (
    InputError,
    ModelInputs,
    inputs_from_bundle,
    inputs_from_shape,
    load_arrays,
    requests_from,
)
from edgepipe.agent.client.report import ReportError, compare, print_prediction, read_prediction
from edgepipe.agent.formats.bundle import BundleError
from edgepipe.agent.formats.endpoints import EndpointsError

app = clihelp.Typer(add_completion=False, pretty_exceptions_enable=False)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


class SubmitError(ValueError):
    """Bad input files or options; one line for the user."""


@dataclass(frozen=True)
class Report:
    requests: int
    samples: int
    failed: int
    wall_s: float
    throughput_samples_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    resends: int
    duplicates: int
    stage_compute_ms: list[float]  # median per stage
    stage_overhead_ms: list[float]  # median time per stage outside ONNX Runtime
    errors: list[str]
    command: str
    machine: str
    planned: int = 0  # requests the run was to send (more than ``requests`` if interrupted)
    interrupted: bool = False  # Ctrl-C: the report covers the results that had arrived


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else math.nan


def stage_medians(results: list[Result]) -> tuple[list[float], list[float]]:
    """Median compute and outside-ORT time of each stage, in ms, from the results' traces."""
    by_stage: dict[int, list[tuple[float, float]]] = {}
    for result in results:
        for rec in result.trace:
            by_stage.setdefault(rec.stage, []).append((rec.compute_s, rec.overhead_s))
    stages = sorted(by_stage)
    compute = [float(np.median([c for c, _ in by_stage[s]]) * 1000) for s in stages]
    overhead = [float(np.median([o for _, o in by_stage[s]]) * 1000) for s in stages]
    return compute, overhead


def load_images(folder: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Images -> float32 [N, 3, size, size], resized (shorter side) and centre-cropped, normalised."""
    try:
        from PIL import Image
    except ImportError:
        raise SubmitError("reading images needs Pillow (pip install pillow); or use --npy") from None
    if not folder.is_dir():
        raise SubmitError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SubmitError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                scale = size / min(img.size)
                w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
                img = img.resize((w, h), Image.Resampling.BICUBIC)
                left, top = (w - size) // 2, (h - size) // 2
                img = img.crop((left, top, left + size, top + size))
                arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        except OSError as exc:
            raise SubmitError(f"{path}: not a readable image: {exc}") from None
    data = (np.stack(arrays) - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(data.transpose(0, 3, 1, 2))


Outcome = Result | ClientError


Request = dict[str, np.ndarray]  # input name ("" for an unnamed single input) -> batch


def make_client(entry: str | None, exit_: str | None, endpoints: Path | None, key: Path | None,
                entry_key: str | None, exit_key: str | None, insecure: bool, **options: object) -> Client:
    """The client the options describe: from an endpoints file, or from ENTRY and EXIT with the
    devices' public keys; this client's key from --key or the key directory; or --insecure."""
    from edgepipe.agent.formats.keys import KeyFileError, key_dir, load_keypair

    try:
        keypair = None if insecure or (endpoints is not None and key is None) else \
            load_keypair(key or key_dir() / "client.key_secret")
    except KeyFileError as exc:
        raise SubmitError(f"--key: {exc}") from None
    if endpoints is not None:
        if entry or exit_:
            raise SubmitError("give ENTRY and EXIT, or --endpoints FILE, not both")
        return Client.from_endpoints(endpoints, keypair, **options)
    if not entry or not exit_:
        raise SubmitError("give ENTRY and EXIT (the first stage's --listen and the last stage's --results), "
                          "or --endpoints FILE")
    from edgepipe.agent.transport import TransportError, check_endpoint

    try:
        check_endpoint(entry, "ENTRY")
        check_endpoint(exit_, "EXIT")
    except TransportError as exc:
        raise SubmitError(str(exc)) from None
    if insecure:
        return Client(entry, exit_, insecure=True, **options)
    if not entry_key or not exit_key:
        raise SubmitError("a secure pipeline needs --entry-key and --exit-key (the first and last devices' public "
                          "keys), or --endpoints FILE; or --insecure for one started with --insecure")
    return Client(entry, exit_, keypair=keypair, entry_key=entry_key, exit_key=exit_key, **options)


def inputs_from_endpoints(endpoints: Path) -> ModelInputs:
    """The model's inputs as the deployment's endpoints file lists them (names, dtypes, shapes)."""
    from edgepipe.agent.formats.endpoints import load_endpoints

    return ModelInputs(load_endpoints(endpoints).inputs)


def submit_all(client: Client, batches: list[Request], warmup: int,
               on_result: Callable[[Outcome], None] | None = None) -> tuple[list[Outcome], float]:
    """Warm up, then push every batch through ``client.results``; return outcomes and wall time.
    On Ctrl-C, return what had arrived (KeyboardInterrupt is not raised)."""
    outcomes: list[Result | ClientError] = []
    start = time.perf_counter()
    try:
        for outcome in client.results([batches[0]] * warmup, errors="return"):
            if isinstance(outcome, ClientError):
                raise outcome
        start = time.perf_counter()
        for outcome in client.results(iter(batches), errors="return"):
            outcomes.append(outcome)
            if on_result:
                on_result(outcome)
    except KeyboardInterrupt:
        pass  # the caller sees fewer outcomes than batches
    return outcomes, time.perf_counter() - start


def samples_in(request: Request) -> int:
    return next(iter(request.values())).shape[0]


def make_report(outcomes: list[Result | ClientError], batches: list[Request], wall_s: float,
                client: Client) -> Report:
    ok = [o for o in outcomes if isinstance(o, Result)]
    bad = [o for o in outcomes if not isinstance(o, Result)]
    latencies = [r.latency_s for r in ok]
    samples = sum(samples_in(b) for b, o in zip(batches, outcomes, strict=False) if isinstance(o, Result))
    compute, overhead = stage_medians(ok)
    return Report(
        requests=len(outcomes), samples=samples, failed=len(bad), wall_s=wall_s,
        throughput_samples_s=samples / wall_s if wall_s > 0 else math.nan,
        latency_p50_ms=percentile_ms(latencies, 50), latency_p95_ms=percentile_ms(latencies, 95),
        latency_p99_ms=percentile_ms(latencies, 99), resends=client.resends, duplicates=client.duplicates,
        stage_compute_ms=compute, stage_overhead_ms=overhead, errors=[str(e) for e in bad[:10]],
        command=shlex.join(["edgepipe-submit", *sys.argv[1:]]),
        machine=f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        planned=len(batches), interrupted=len(outcomes) < len(batches),
    )


def save_outputs(path: Path, outcomes: list[Result | ClientError]) -> None:
    ok = [o for o in outcomes if isinstance(o, Result)]
    if not ok:
        raise SubmitError("no successful results to save")
    names = list(ok[0].outputs)
    merged = {n: np.concatenate([r.outputs[n] for r in ok]) for n in names}
    if path.suffix == ".npz":
        np.savez(path, **merged)
    elif len(names) == 1:
        np.save(path, merged[names[0]])
    else:
        raise SubmitError(f"the pipeline returns {len(names)} outputs ({', '.join(names)}); "
                          "save to a .npz file")


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "edgepipe-submit" + (f" (interrupted: {report.requests} of {report.planned} requests done)"
                                  if report.interrupted else "")
    table = Table(title=title, show_header=False)
    table.add_row("requests (failed)", f"{report.requests} ({report.failed})")
    table.add_row("samples", str(report.samples))
    table.add_row("wall time", f"{report.wall_s:.3f} s")
    table.add_row("throughput", f"{report.throughput_samples_s:.1f} samples/s")
    p50, p95, p99 = report.latency_p50_ms, report.latency_p95_ms, report.latency_p99_ms
    table.add_row("latency p50 / p95 / p99", f"{p50:.1f} / {p95:.1f} / {p99:.1f} ms")
    table.add_row("resends / duplicates", f"{report.resends} / {report.duplicates}")
    for i, (c, o) in enumerate(zip(report.stage_compute_ms, report.stage_overhead_ms, strict=True)):
        table.add_row(f"stage {i} median compute / outside ORT", f"{c:.2f} / {o:.2f} ms")
    console = Console()
    console.print(table)
    for err in report.errors:
        console.print(f"[red]error:[/red] {err}", highlight=False)


@app.command()
def submit(
    entry: str | None = typer.Argument(None, metavar="ENTRY", help="First agent's --listen, e.g. tcp://dev0:5550 "
                                       "(or --endpoints)."),
    exit_: str | None = typer.Argument(None, metavar="EXIT", help="Last agent's --results address, e.g. "
                                       "tcp://dev2:5551."),
    endpoints: Path | None = typer.Option(None, "--endpoints", metavar="FILE",
                                          help="The deployment's endpoints.json (addresses, "
                                          "public keys, model inputs) instead of ENTRY and EXIT."),
    key: Path | None = typer.Option(None, "--key", metavar="FILE", help="This client's secret key file "
                                    "[$EDGEPIPE_KEYS/client.key_secret, else ~/.config/edgepipe/keys/...]."),
    entry_key: str | None = typer.Option(None, "--entry-key", metavar="KEY",
                                         help="The first device's public key (Z85 or .key file)."),
    exit_key: str | None = typer.Option(None, "--exit-key", metavar="KEY",
                                        help="The last device's public key (Z85 or .key file)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext, unauthenticated: only for a pipeline "
                                  "started with --insecure."),
    codec: str = typer.Option("raw", "--codec", metavar="CODEC",
                              help="Compress float32 inputs on the way in: raw, fp16 or int8."),
    random: bool = typer.Option(False, "--random", help="Send random data (the default): with --bundle, token ids "
                                "within the vocabulary, masks of ones, normal noise for real inputs."),
    npy: list[Path] = typer.Option([], "--npy", metavar="FILE.npy",
                                   help="A .npy array of samples (axis 0), for a single-input model."),
    input_files: list[str] = typer.Option([], "--input", metavar="NAME=FILE.npy|FILE.npz", help=(
        "An input's samples (axis 0); repeat for each input, or give one .npz holding one array per input.")),
    images: Path | None = typer.Option(None, "--images", help="A folder of images (needs Pillow)."),
    bundle: Path | None = typer.Option(None, "--bundle", help="First stage's bundle (input names, shapes, values)."),
    shape: str | None = typer.Option(None, "--shape", help="Per-sample shape for --random [3,224,224]."),
    dtype: str = typer.Option("float32", "--dtype", help="dtype for --random without --bundle."),
    batch: int | None = typer.Option(None, "--batch", "-b", min=1,
                                     help="Microbatch size (samples per request) [8, or a fixed-batch model's own]."),
    count: int | None = typer.Option(None, "--count", "-n", min=1,
                                     help="Number of microbatches [8 for --random; all data otherwise]."),
    window: int = typer.Option(8, "--window", min=1, help="Requests in flight. One more than the number of "
                               "stages keeps every stage busy; each beyond that adds about one step of the slowest "
                               "stage to every request's latency."),
    timeout_s: float | None = typer.Option(None, "--timeout-s", help="Last resort: send a request again when "
                                           "its result has not come after this long [5x the slowest recent "
                                           "latency, at least 30 s; 120 s before the first result]. Faults are "
                                           "handled without it."),
    retries: int = typer.Option(2, "--retries", min=0, help="Last-resort resends before a request fails."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Microbatches sent first and not measured."),
    image_size: int = typer.Option(224, "--image-size", help="Square image size for --images."),
    mean: str = typer.Option("0.5,0.5,0.5", "--mean", help="Per-channel mean for --images (timm ViT)."),
    std: str = typer.Option("0.5,0.5,0.5", "--std", help="Per-channel std for --images."),
    seed: int = typer.Option(0, "--seed", help="Seed for --random."),
    save: Path | None = typer.Option(None, "--save", help="Write outputs in order to a .npy (or .npz) file."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plan: Path | None = typer.Option(None, "--report", metavar="PLAN.json",
                                     help="Compare with this plan: predicted vs measured per stage."),
    trace: Path | None = typer.Option(None, "--trace", metavar="FILE.json",
                                      help="Write a timeline of the run (Chrome/Perfetto trace: one track per "
                                           "stage; open in ui.perfetto.dev or draw with tools/plot_trace.py)."),
) -> None:
    """Send microbatches to a pipeline; print throughput and latency p50/p95/p99.

    With --report PLAN.json (the plan the stages were compiled from), also print each stage's
    predicted vs measured compute and send time, the throughput error and the bottleneck.

    With --trace FILE.json, write the run as a trace: per stage, each microbatch's receive, wait,
    compute and send; the client's submits and results. The file also keeps the raw records (and
    the plan, with --report) for `edgepipe-compile ... --from-run FILE.json`.

    Ctrl-C prints the report of what has arrived so far (exit code 130).

    Example: edgepipe-submit --endpoints build/vitb/endpoints.json --key client.key_secret --random -b 8 -n 32

    or: edgepipe-submit tcp://dev0:5550 tcp://dev2:5551 --entry-key K0 --exit-key K2 --bundle stage-0 -n 32
    """
    if bool(npy or input_files) + (images is not None) + random > 1:
        raise _fail("give only one of --random, --npy/--input, --images")
    try:
        prediction = read_prediction(plan) if plan is not None else None
        batches = load_requests(bundle, shape, dtype, npy, input_files, images, image_size, mean, std,
                                batch, count, seed, endpoints)
        client = make_client(entry, exit_, endpoints, key, entry_key, exit_key, insecure, window=window,
                             timeout_s=timeout_s, retries=retries, codec=codec)
    except (SubmitError, InputError, BundleError, ReportError, TypeError, ValueError, EndpointsError) as exc:
        raise _fail(str(exc)) from None
    except ClientError as exc:
        raise _fail(str(exc), code=1) from None
    if insecure:
        typer.echo("edgepipe-submit: warning: --insecure: requests and results travel unauthenticated, in "
                   "plaintext", err=True)

    try:
        with client:
            handed: list[float] = []  # when each result was handed over: the trace's client times
            outcomes, wall = _run_with_progress(client, batches, warmup, quiet=as_json, handed=handed)
            report = make_report(outcomes, batches, wall, client)
    except (ClientError, ValueError) as exc:
        raise _fail(str(exc), code=1) from None
    if save is not None:
        try:
            save_outputs(save, outcomes)
        except (SubmitError, OSError) as exc:
            raise _fail(str(exc), code=1) from None
    if trace is not None:
        from edgepipe.agent.client.trace import TraceError, write_traced_outcomes

        try:
            write_traced_outcomes(trace, outcomes, handed, samples_in(batches[0]), plan)
        except (TraceError, OSError) as exc:
            raise _fail(f"--trace {trace}: {exc}", code=1) from None
    compared = None
    if prediction is not None:
        traces = [o.trace for o in outcomes if isinstance(o, Result)]
        try:
            compared = compare(prediction, traces, samples_in(batches[0])) if traces else None
        except ReportError as exc:
            raise _fail(str(exc), code=1) from None
    if as_json:
        typer.echo(json.dumps({**asdict(report), **({"prediction": asdict(compared)} if compared else {})}))
    else:
        print_report(report)
        if compared is not None:
            print_prediction(compared)
    raise typer.Exit(130 if report.interrupted else 1 if report.failed else 0)


def load_requests(bundle: Path | None, shape: str | None, dtype: str, npy: list[Path], input_files: list[str],
                  images: Path | None, image_size: int, mean: str, std: str, batch: int | None,
                  count: int | None, seed: int, endpoints: Path | None = None) -> list[Request]:
    """The requests the options ask for, checked against the model's inputs (agent/client/inputs.py):
    those of the first stage's bundle, else those the endpoints file lists, else --shape/--dtype."""
    if bundle is not None:
        model_inputs = inputs_from_bundle(bundle)
    elif endpoints is not None and shape is None:
        model_inputs = inputs_from_endpoints(endpoints)
    else:
        model_inputs = None
    if npy or input_files:
        arrays = load_arrays(input_files, npy)
    elif images is not None:
        arrays = {"": load_images(images, image_size, _floats(mean, "--mean"), _floats(std, "--std"))}
    else:
        arrays, model_inputs = None, model_inputs or inputs_from_shape(shape, dtype)
    return requests_from(model_inputs, arrays, batch, count, seed)


def _run_with_progress(client: Client, batches: list[Request], warmup: int,
                       quiet: bool, handed: list[float]) -> tuple[list[Result | ClientError], float]:
    def stamp(_outcome: Outcome) -> None:
        handed.append(time.time())

    if quiet:
        return submit_all(client, batches, warmup, stamp)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("submitting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task("submit", total=len(batches))
        def advance(outcome: Outcome) -> None:
            stamp(outcome)
            progress.advance(task)

        return submit_all(client, batches, warmup, advance)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SubmitError(f"{option} {text!r}: expected numbers like 0.5,0.5,0.5") from None


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"edgepipe-submit: error: {message}", err=True)
    return typer.Exit(code)


def main() -> None:
    app(prog_name="edgepipe-submit")


if __name__ == "__main__":
    main()
