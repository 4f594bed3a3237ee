"""A Prometheus endpoint for a stage's counters (optional: ``pip install 'edgepipe[metrics]'``).

``edgepipe-agent metrics --control tcp://127.0.0.1:5560 --listen 0.0.0.0:9101`` serves the
Prometheus text format at ``http://HOST:9101/metrics``. At every scrape it asks the stage's control
endpoint (``edgepipe-agent serve ... --control``, or the device daemon) for ``status`` and publishes
the ``stage`` counters of the reply (field list in docs/profiling.md, "Counters"); nothing is kept
between scrapes, so the exporter can restart at any time and a restarted stage's counters start
again from zero, as Prometheus counters may. It runs as its own small process beside the stage, so
the stage never imports prometheus_client and a device that does not want metrics installs nothing.

Every series carries the labels ``stage`` (index), ``device`` and ``model``; ``edgepipe_up`` is 0
(and nothing else is published) when the control endpoint does not answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

PREFIX = "edgepipe"
# status["stage"] fields published as counters (name -> help); exposed as edgepipe_stage_<name>_total
COUNTERS = {
    "requests_in": "Messages (data and errors) taken in.",
    "requests_out": "Messages passed downstream, or results delivered to clients.",
    "computed": "Microbatches computed by ONNX Runtime.",
    "failed": "Microbatches ONNX Runtime failed on.",
    "errors_out": "Error messages sent downstream.",
    "rejected": "Requests refused at this stage with an error answer.",
    "dropped": "Malformed, over-credit or unanswerable messages dropped.",
    "duplicates": "Copies of a request already here, re-acknowledged without recomputing.",
    "resends": "Messages sent downstream again.",
    "held": "Results held for an absent client.",
    "undeliverable": "Held results dropped after the hold time.",
    "bytes_in": "Wire bytes of data messages taken in.",
    "bytes_out": "Wire bytes of data messages sent.",
}
# gauges: status field -> (metric suffix, help)
GAUGES = {
    "busy": ("busy_ratio", "Fraction of the last 10 s spent in ONNX Runtime."),
    "uptime_s": ("uptime_seconds", "Seconds since the stage started."),
    "queue_msgs": ("queue_messages", "Messages taken in, waiting for or in compute."),
    "queue_bytes": ("queue_bytes", "Bytes taken in, waiting for or in compute."),
    "inflight_msgs": ("inflight_messages", "Messages sent downstream and not yet acknowledged."),
    "inflight_bytes": ("inflight_bytes", "Bytes sent downstream and not yet acknowledged."),
    "peers_down": ("peers_down", "Neighbours currently declared down."),
}
INFO_FIELDS = ("role", "codec", "secure", "deployment", "generation", "incarnation", "stage_count")
NEIGHBOUR_LABELS = ("role", "label", "peer_device", "peer_stage")


class MetricsUnavailable(RuntimeError):
    """prometheus_client is not installed (it is the optional ``metrics`` extra)."""


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:
        raise MetricsUnavailable("the Prometheus endpoint needs prometheus_client: "
                                 "pip install 'edgepipe[metrics]'") from None
    return prometheus_client


def families(status: dict[str, Any] | None) -> list[Any]:
    """The metric families for one ``status`` reply (None: the stage did not answer)."""
    core = _client().core
    up = core.GaugeMetricFamily(f"{PREFIX}_up", "1 if the stage's control endpoint answered the scrape.")
    up.add_metric([], 0.0 if status is None else 1.0)
    if status is None:
        return [up]
    stage = status.get("stage") if isinstance(status.get("stage"), dict) else {}
    labels = {"stage": str(stage.get("stage_index", "")), "device": str(stage.get("device", status.get("device", ""))),
              "model": str(stage.get("model_id", ""))}
    names, values = list(labels), list(labels.values())
    out = [up]
    info = core.InfoMetricFamily(f"{PREFIX}_stage", "What this stage is.", labels=names)
    info.add_metric(values, {k: str(stage[k]) for k in INFO_FIELDS if k in stage}
                    | {"ort_version": str(status.get("ort_version", ""))})
    out.append(info)
    for field, help_text in COUNTERS.items():
        if _number(stage.get(field)):
            family = core.CounterMetricFamily(f"{PREFIX}_stage_{field}", help_text, labels=names)
            family.add_metric(values, float(stage[field]))
            out.append(family)
    for field, (suffix, help_text) in GAUGES.items():
        if _number(stage.get(field)):
            family = core.GaugeMetricFamily(f"{PREFIX}_stage_{suffix}", help_text, labels=names)
            family.add_metric(values, float(stage[field]))
            out.append(family)
    out += _neighbour_families(core, stage.get("neighbours"), names, values)
    return out


def _neighbour_families(core: Any, neighbours: Any, names: list[str], values: list[str]) -> list[Any]:
    if not isinstance(neighbours, list) or not neighbours:
        return []
    labels = [*names, *NEIGHBOUR_LABELS]
    up = core.GaugeMetricFamily(f"{PREFIX}_neighbour_up", "1 while a neighbour's heartbeats arrive.", labels=labels)
    seen = core.GaugeMetricFamily(f"{PREFIX}_neighbour_last_seen_seconds", "Seconds since the neighbour was heard.",
                                  labels=labels)
    restarts = core.CounterMetricFamily(f"{PREFIX}_neighbour_restarts_seen", "New incarnations of the neighbour.",
                                        labels=labels)
    downs = core.CounterMetricFamily(f"{PREFIX}_neighbour_down_events", "Times the neighbour was declared down.",
                                     labels=labels)
    for n in neighbours:
        if not isinstance(n, dict):
            continue
        row = [*values, str(n.get("role", "")), str(n.get("label", "")), str(n.get("device", "")),
               "" if n.get("stage") is None else str(n.get("stage"))]
        up.add_metric(row, 1.0 if n.get("state") == "up" else 0.0)
        if _number(n.get("last_seen_s")):
            seen.add_metric(row, float(n["last_seen_s"]))
        if _number(n.get("restarts_seen")):
            restarts.add_metric(row, float(n["restarts_seen"]))
        if _number(n.get("down_events")):
            downs.add_metric(row, float(n["down_events"]))
    return [up, seen, restarts, downs]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StageCollector:
    """A prometheus_client collector that asks ``read_status`` at every scrape."""

    def __init__(self, read_status: Callable[[], dict[str, Any] | None]) -> None:
        self._read = read_status

    def collect(self) -> Iterator[Any]:
        yield from families(self._read())


def status_reader(control: str, timeout_s: float = 2.0) -> Callable[[], dict[str, Any] | None]:
    """Ask ``control`` for status; None when it does not answer (the scrape then says up = 0)."""
    from edgepipe.agent.control_client import request_status
    from edgepipe.agent.formats.control import ControlError
    from edgepipe.agent.transport import INSECURE

    def read() -> dict[str, Any] | None:
        try:
            # a stage's --control endpoint is plaintext (the device daemon asks it over loopback)
            return request_status(control, auth=INSECURE, timeout_s=timeout_s)
        except ControlError:
            return None

    return read


def serve_metrics(control: str, host: str, port: int) -> tuple[Any, Any]:
    """Start the HTTP endpoint in a background thread; returns prometheus_client's (server, thread)."""
    prometheus_client = _client()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(StageCollector(status_reader(control)))
    return prometheus_client.start_http_server(port, addr=host, registry=registry)


def render(status: dict[str, Any] | None) -> str:
    """The Prometheus text for one status reply (what a scrape returns)."""
    prometheus_client = _client()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(StageCollector(lambda: status))
    return prometheus_client.generate_latest(registry).decode()
