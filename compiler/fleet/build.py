"""What a compile output directory deploys: stage bundles by content, which device runs which stage,
how to reach and authenticate every device.

A build directory is what ``edgepipe-compile ... -o BUILD`` writes: ``stage-K/`` bundles, and with
``--cluster`` also ``plan.json`` (which device runs which stage), ``problem.json`` (what failover
re-plans from) and a copy of the cluster file, ``cluster.toml``. The cluster file gives each
device's daemon (``control``, or ``address`` as before) and public key, the workstation's key and
the authorised client keys (docs/formats/cluster.md).

Nothing here imports torch or onnx: deploy, status and stop run with the base install plus the
planner.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from edgepipe.agent.formats.bundle import MANIFEST_NAME, BundleError, StageManifest, TensorSpec, read_manifest
from edgepipe.agent.formats.control import StageBundleRef
from edgepipe.agent.formats.keys import KeyFileError, is_public_key, load_key_list, load_public_key
from edgepipe.planner.cluster import Cluster, ClusterError, load_cluster
from edgepipe.planner.plan import Plan, PlanError, load_plan

CLUSTER_COPY = "cluster.toml"
PLAN_FILE = "plan.json"
PROBLEM_FILE = "problem.json"
_ENDPOINT = re.compile(r"^tcp://([A-Za-z0-9.\-_]+|\*):(\d{1,5})$")


class BuildError(ValueError):
    """The build directory, its plan or its cluster file cannot be deployed; the message says why."""


@dataclass(frozen=True)
class BundleFile:
    name: str
    sha256: str
    size: int
    path: Path


@dataclass(frozen=True)
class StageBuild:
    """One stage bundle by content: its manifest's sha256 and every file's."""

    index: int
    dir: Path
    manifest_sha256: str
    manifest_size: int
    files: tuple[BundleFile, ...]  # the files the manifest lists (stage.json excluded)
    manifest: StageManifest

    def ref(self, results: bool) -> StageBundleRef:
        return StageBundleRef(instance_id(self.index), self.manifest_sha256,
                              tuple(sorted((f.name, f.sha256) for f in self.files)), results)

    def all_files(self) -> tuple[BundleFile, ...]:
        return (BundleFile(MANIFEST_NAME, self.manifest_sha256, self.manifest_size, self.dir / MANIFEST_NAME),
                *self.files)

    @property
    def bytes(self) -> int:
        return self.manifest_size + sum(f.size for f in self.files)


@dataclass(frozen=True)
class DeviceTarget:
    """A device's daemon: where it listens and which key it must prove it holds."""

    name: str
    control: str
    host: str  # the address the device's data endpoints are reached at
    public_key: str | None  # Z85; None only in insecure mode


@dataclass(frozen=True)
class Build:
    dir: Path
    model_id: str
    stages: tuple[StageBuild, ...]
    placement: tuple[tuple[str, ...], ...]  # per stage: the device(s) that run it (several = replicas)
    weights: tuple[tuple[float, ...], ...]  # per stage: each replica's share of the work (the plan's)
    codecs: tuple[str | None, ...]  # per stage: the codec of its output hop (the plan's; None: raw)
    devices: dict[str, DeviceTarget]  # every device of the cluster file that has a daemon
    cluster: Cluster
    client_keys: tuple[str, ...]
    plan: Plan | None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[0].manifest.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[-1].manifest.outputs

    def used_devices(self) -> tuple[str, ...]:
        seen: list[str] = []
        for devices in self.placement:
            seen.extend(d for d in devices if d not in seen)
        return tuple(seen)


def instance_id(stage: int) -> str:
    return f"stage-{stage}"


def read_stage(bundle_dir: Path) -> StageBuild:
    """A stage bundle by content, from its manifest (file hashes are the manifest's: the device
    checks every file against them on arrival, so a damaged file is refused there)."""
    manifest = read_manifest(bundle_dir)
    raw = (bundle_dir / MANIFEST_NAME).read_bytes()
    files = []
    for name, entry in sorted(manifest.files.items()):
        path = bundle_dir / name
        if "/" in name or name == MANIFEST_NAME or not path.is_file():
            raise BuildError(f"{bundle_dir}: manifest lists {name!r}, which is not a file of the bundle")
        files.append(BundleFile(name, entry.sha256, entry.bytes, path))
    return StageBuild(manifest.stage_index, bundle_dir, hashlib.sha256(raw).hexdigest(), len(raw), tuple(files),
                      manifest)


def stage_dirs(build_dir: Path) -> list[Path]:
    found = sorted((p for p in Path(build_dir).glob("stage-*") if (p / MANIFEST_NAME).is_file()),
                   key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else 10**9)
    if not found:
        raise BuildError(f"{build_dir}: no stage-K bundle directories (compile with edgepipe-compile -o {build_dir})")
    return found


def load_build(build_dir: Path, *, cluster_path: Path | None = None, devices: list[str] | None = None,
               insecure: bool = False, bundle_root: Path | None = None, plan_path: Path | None = None) -> Build:
    """Read a build for deployment. ``devices`` (one per stage) overrides the plan's placement;
    ``bundle_root``/``plan_path`` deploy another set of bundles of the same build (a standby)."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise BuildError(f"{build_dir}: no such build directory")
    try:
        stages = tuple(read_stage(d) for d in stage_dirs(bundle_root or build_dir))
    except BundleError as exc:
        raise BuildError(str(exc)) from None
    for k, stage in enumerate(stages):
        if stage.index != k or stage.manifest.stage_count != len(stages):
            raise BuildError(f"{stage.dir}: is stage {stage.index}/{stage.manifest.stage_count}, expected stage {k} "
                             f"of {len(stages)} (a stale bundle from another compile?)")
    if len({s.manifest.model_sha256 for s in stages}) != 1:
        raise BuildError(f"{build_dir}: the stage bundles come from different models")
    plan = None
    plan_file = plan_path or (bundle_root or build_dir) / PLAN_FILE
    if plan_file.is_file():
        try:
            plan = load_plan(plan_file)
        except PlanError as exc:
            raise BuildError(str(exc)) from None
    cluster_file = cluster_path or build_dir / CLUSTER_COPY
    if not Path(cluster_file).is_file():
        raise BuildError(f"{cluster_file}: no cluster file; pass --cluster (it gives every device's control "
                         "endpoint and public key)")
    try:
        cluster = load_cluster(cluster_file)
    except ClusterError as exc:
        raise BuildError(str(exc)) from None
    placement = _placement(stages, plan, devices, build_dir)
    if plan is not None and not devices:
        weights = tuple(tuple(float(getattr(r, "weight", 1.0)) for r in getattr(st, "replicas", ())) or (1.0,)
                        for st in plan.stages)
        codecs = tuple(getattr(st, "codec_out", None) for st in plan.stages)
    else:
        weights, codecs = tuple((1.0,) for _ in stages), tuple(None for _ in stages)
    targets = device_targets(cluster)
    for names in placement:
        for name in names:
            if name not in {d.name for d in cluster.devices}:
                raise BuildError(f"device {name!r} is not in the cluster file {cluster.source}")
            if name not in targets:
                raise BuildError(f"{cluster.source}: [[device]] {name!r} has no control endpoint (control = "
                                 "\"tcp://host:5560\")")
            if targets[name].public_key is None and not insecure:
                raise BuildError(f"{cluster.source}: [[device]] {name!r} has no public_key (its `edgepipe-agent "
                                 "keygen` output); add it, or deploy with --insecure")
    try:
        clients = tuple(k.decode() for k in sorted(load_key_list(_relative(cluster, s) for s in cluster.client_keys)))
    except KeyFileError as exc:
        raise BuildError(f"{cluster.source}: [cluster].clients: {exc}") from None
    return Build(build_dir, stages[0].manifest.model_id, stages, placement, weights, codecs, targets, cluster, clients,
                 plan)


def _placement(stages: tuple[StageBuild, ...], plan: Plan | None, devices: list[str] | None,
               build_dir: Path) -> tuple[tuple[str, ...], ...]:
    if devices:
        if len(devices) != len(stages):
            raise BuildError(f"--devices names {len(devices)} device(s) for {len(stages)} stage(s)")
        if len(set(devices)) != len(devices):
            raise BuildError("--devices names a device twice")
        return tuple((d,) for d in devices)
    if plan is None:
        raise BuildError(f"{build_dir}: no plan.json saying which device runs which stage; compile with --cluster, "
                         "or pass --devices dev0,dev1,... (one per stage)")
    if len(plan.stages) != len(stages):
        raise BuildError(f"{build_dir}: plan.json has {len(plan.stages)} stages but there are {len(stages)} stage "
                         "bundles; recompile")
    for k, (st, sb) in enumerate(zip(plan.stages, stages)):
        if st.cut_in != sb.manifest.cut_in or st.cut_out != sb.manifest.cut_out:
            raise BuildError(f"{sb.dir}: cuts {sb.manifest.cut_in}..{sb.manifest.cut_out}, but plan stage {k} is "
                             f"{st.cut_in}..{st.cut_out}; recompile with this plan")
    return tuple(_replicas(st) for st in plan.stages)


def _replicas(stage: object) -> tuple[str, ...]:
    """The devices of a plan stage: its ``replicas`` if the plan has them (planner v2), else its device."""
    replicas = getattr(stage, "replicas", None)
    if replicas:
        return tuple(getattr(r, "device", r) for r in replicas)
    return (stage.device,)  # type: ignore[attr-defined]


def device_targets(cluster: Cluster) -> dict[str, DeviceTarget]:
    """Every device that names a daemon, with its public key (None when the cluster file has none:
    only insecure mode can talk to it)."""
    targets = {}
    for device in cluster.devices:
        endpoint = cluster.control.get(device.name) or device.address
        if not endpoint:
            continue
        endpoint = endpoint if "://" in endpoint else f"tcp://{endpoint}"
        match = _ENDPOINT.match(endpoint)
        if not match or match.group(1) == "*":
            raise BuildError(f"{cluster.source}: [[device]] {device.name!r}.control: {endpoint!r} is not a "
                             "tcp://host:port endpoint")
        key = cluster.public_keys.get(device.name)
        if key:
            try:
                key = load_public_key(_relative(cluster, key)).decode()
            except KeyFileError as exc:
                raise BuildError(f"{cluster.source}: [[device]] {device.name!r}.public_key: {exc}") from None
        targets[device.name] = DeviceTarget(device.name, endpoint, match.group(1), key or None)
    return targets


def workstation_key_check(cluster: Cluster, public: str) -> str | None:
    """A warning if the cluster file names another workstation key than the one in use."""
    if not cluster.workstation_key:
        return None
    try:
        listed = load_public_key(_relative(cluster, cluster.workstation_key)).decode()
    except KeyFileError as exc:
        return f"{cluster.source}: [cluster].workstation_key: {exc}"
    if listed != public:
        return (f"{cluster.source}: [cluster].workstation_key is {listed[:8]}…, but this workstation's key is "
                f"{public[:8]}…: the devices' authorized_keys must list the key in use")
    return None


def _relative(cluster: Cluster, value: str) -> str:
    """A key or a path; a relative path is relative to the cluster file."""
    if is_public_key(value.strip()) or Path(value).expanduser().is_absolute():
        return value
    base = Path(cluster.source).parent
    candidate = base / value
    return str(candidate) if candidate.exists() else value
