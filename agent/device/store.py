"""The device's bundle store: files by sha256, uploaded in chunks, checked on arrival.

    STORE/objects/<sha256>    complete files, read-only, named by their content's hash
    STORE/partial/<sha256>    uploads in progress (resumable: a new ``put`` continues at its size)
    STORE/bundles/<id>-<manifest sha[:16]>/   stage bundles built from objects (hard links)

Because a file is named by its hash, a file the device already has is never sent again, whatever
stage, model version or deployment it belongs to; a redeploy sends only what changed. A finished
upload whose content does not hash to its name is deleted and refused. Before an upload starts its
whole size is checked against the free space (the disk's, less a reserve, and an optional store
quota); when it does not fit, objects no deployment needs (least recently used first) are
evicted, and if that is not enough the upload is refused with the numbers.

A bundle is built from objects only when the manifest object hashes to the manifest sha256 the
workstation sent over the authenticated channel, and every file then matches the manifest
(``load_bundle``), so a manifest and weights swapped on the device's disk are refused.

Used by one thread (the daemon's control loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgepipe.agent.formats.bundle import MANIFEST_NAME, BundleError, StageManifest, load_bundle, sha256_file
from edgepipe.agent.formats.control import BadRequest, StageBundleRef

DEFAULT_RESERVE_BYTES = 64 * 2**20  # never fill the disk to the last byte: logs and the OS need room


class StoreError(BadRequest):
    """An upload or a bundle was refused; the message says why (sent back to the workstation)."""


@dataclass(frozen=True)
class StoreUsage:
    objects: int
    object_bytes: int
    partial_bytes: int
    free_bytes: int  # what an upload may still use (disk free less the reserve, within the quota)
    quota_bytes: int | None


class BundleStore:
    def __init__(self, root: Path, *, quota_bytes: int | None = None,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.partial = self.root / "partial"
        self.bundles = self.root / "bundles"
        for d in (self.objects, self.partial, self.bundles):
            d.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.reserve_bytes = reserve_bytes
        self._hashers: dict[str, tuple[int, hashlib._Hash]] = {}  # sha -> (bytes hashed, running hash)
        self._pinned: frozenset[str] = frozenset()

    # -- queries ------------------------------------------------------------------------------------

    def has(self, sha: str) -> bool:
        return (self.objects / sha).is_file()

    def received(self, sha: str) -> int:
        """Bytes of an unfinished upload already on disk (0 if none)."""
        try:
            return (self.partial / sha).stat().st_size
        except FileNotFoundError:
            return 0

    def usage(self) -> StoreUsage:
        sizes = [p.stat().st_size for p in self.objects.iterdir() if p.is_file()]
        partial = sum(p.stat().st_size for p in self.partial.iterdir() if p.is_file())
        return StoreUsage(len(sizes), sum(sizes), partial, self._free(sum(sizes) + partial), self.quota_bytes)

    def _free(self, used: int | None = None) -> int:
        disk = shutil.disk_usage(self.root).free - self.reserve_bytes
        if self.quota_bytes is None:
            return max(0, disk)
        if used is None:
            used = sum(p.stat().st_size for d in (self.objects, self.partial) for p in d.iterdir() if p.is_file())
        return max(0, min(disk, self.quota_bytes - used))

    # -- uploads ------------------------------------------------------------------------------------

    def pin(self, hashes: Iterable[str]) -> None:
        """Objects to keep even when no deployment uses them yet (standby bundles for a failover)."""
        self._pinned = frozenset(hashes)

    def put(self, sha: str, size: int, offset: int, data: bytes,
            keep: frozenset[str] = frozenset()) -> tuple[int, bool]:
        """Write one chunk of the file ``sha`` (``size`` bytes in all) at ``offset``; return (bytes
        received so far, complete). ``keep``: objects that must not be evicted to make room."""
        if self.has(sha):
            return size, True
        path = self.partial / sha
        have = self.received(sha)
        if offset != have:
            raise StoreError(f"{sha[:12]}: chunk at offset {offset}, but {have} bytes have arrived so far; "
                             f"resend from {have}")
        if offset + len(data) > size:
            raise StoreError(f"{sha[:12]}: chunk ends at {offset + len(data)}, past the file's size {size}")
        if offset == 0:
            self._make_room(size, keep | self._pinned)
        elif size - offset > self._free():
            # the disk filled up since the upload began (another writer): say so before writing
            self._make_room(size - offset, keep | self._pinned)
        hasher = self._hasher(sha, path, have)
        try:
            with open(path, "ab") as fh:
                fh.write(data)
        except OSError as exc:
            raise StoreError(f"{sha[:12]}: cannot write to the store ({exc.strerror}); "
                             f"{_mib(self._free())} free in {self.root}") from None
        hasher.update(data)
        done = offset + len(data)
        self._hashers[sha] = (done, hasher)
        if done < size:
            return done, False
        del self._hashers[sha]
        actual = hasher.hexdigest()
        if actual != sha:
            path.unlink(missing_ok=True)
            raise StoreError(f"{sha[:12]}: sha256 mismatch on arrival (the {size} bytes received hash to "
                             f"{actual[:12]}); the partial file was deleted, send it again")
        os.chmod(path, 0o444)
        path.replace(self.objects / sha)
        return size, True

    def _hasher(self, sha: str, path: Path, have: int) -> hashlib._Hash:
        cached = self._hashers.get(sha)
        if cached is not None and cached[0] == have:
            return cached[1]
        hasher = hashlib.sha256()  # a resumed upload (daemon restarted): hash what is on disk first
        if have:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 22):
                    hasher.update(block)
        return hasher

    def _make_room(self, needed: int, keep: frozenset[str]) -> None:
        free = self._free()
        if needed <= free:
            return
        # Least recently used first: what an older deployment needed and no one has asked for since.
        candidates = sorted((p for p in self.objects.iterdir() if p.is_file() and p.name not in keep),
                            key=lambda p: p.stat().st_mtime)
        for path in candidates:
            if needed <= free:
                break
            path.unlink(missing_ok=True)
            free = self._free()
        if needed > free:
            quota = f", store limit {_mib(self.quota_bytes)}" if self.quota_bytes is not None else ""
            raise StoreError(f"not enough disk space: {_mib(needed)} needed, {_mib(free)} free in {self.root}"
                             f"{quota}, {len(keep)} file(s) in use kept; free space or raise --store-max-mb")

    def drop_partial(self, keep: frozenset[str] = frozenset()) -> None:
        """Forget unfinished uploads except ``keep`` (called when a deployment is released)."""
        for path in self.partial.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
                self._hashers.pop(path.name, None)

    # -- bundles ------------------------------------------------------------------------------------

    def bundle_dir(self, ref: StageBundleRef) -> Path:
        return self.bundles / f"{ref.id}-{ref.manifest[:16]}"

    def build_bundle(self, ref: StageBundleRef) -> tuple[Path, StageManifest]:
        """The bundle directory for ``ref``, built from objects and fully verified; StoreError if a
        file is missing or anything does not match (the message names it)."""
        missing = [sha for sha in ref.all_hashes if not self.has(sha)]
        if missing:
            raise StoreError(f"{ref.id}: {len(missing)} file(s) not in the store yet ({missing[0][:12]}...); "
                             "send them with put first")
        manifest_path = self.objects / ref.manifest
        actual = sha256_file(manifest_path)
        if actual != ref.manifest:
            raise StoreError(f"{ref.id}: the stored manifest hashes to {actual[:12]}, not {ref.manifest[:12]} as "
                             "the workstation expects: it was changed on this device; refused")
        try:
            manifest = StageManifest.from_dict(json.loads(manifest_path.read_text()), f"{ref.id} manifest")
        except (BundleError, ValueError) as exc:
            raise StoreError(f"{ref.id}: manifest refused: {exc}") from None
        listed = {name: entry.sha256 for name, entry in manifest.files.items()}
        if listed != dict(ref.files):
            raise StoreError(f"{ref.id}: the manifest lists {sorted(listed)} with other hashes than the request "
                             f"({sorted(dict(ref.files))}); refused")
        target = self.bundle_dir(ref)
        if not target.is_dir():
            scratch = self.bundles / f".{target.name}.{os.getpid()}.{time.monotonic_ns()}"
            scratch.mkdir()
            try:
                link_or_copy(manifest_path, scratch / MANIFEST_NAME)
                for name, sha in ref.files:
                    link_or_copy(self.objects / sha, scratch / name)
                scratch.rename(target)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
        for sha in ref.all_hashes:  # recently used: the last to be evicted
            os.utime(self.objects / sha)
        try:
            return target, load_bundle(target)  # every file hashed against the manifest
        except BundleError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise StoreError(f"{ref.id}: bundle refused: {str(exc).replace(str(target) + os.sep, '')}; "
                             "a stored file was changed on this device") from None

    def forget_bundles(self, keep: Iterable[Path]) -> None:
        """Remove built bundle directories not in ``keep`` (their objects stay in the store)."""
        kept = {Path(p).name for p in keep}
        for path in self.bundles.iterdir():
            if path.is_dir() and path.name not in kept and not path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported: a copy is as good, only bigger
        shutil.copyfile(src, dst)


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"
