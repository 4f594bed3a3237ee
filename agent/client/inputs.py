"""What a client sends: the model's named inputs, read from files or made up to fit the model.

A request is a dict of input name -> array whose axis 0 is the batch. The first stage's bundle says
what the model takes (``ModelInputs``): names, dtypes, per-sample shapes, what values each input
takes (token ids within the vocabulary, attention masks, real numbers) and, for a model exported
without a batch axis, the one batch size it accepts. Everything here checks arrays against that
and fails with one line naming the input and what is wrong (``InputError``).

Used by ``edgepipe-submit`` (agent/client/submit.py) and by the compiler's verification, which
feeds the same kind of inputs to the whole model and to the chained stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgepipe.agent.formats.bundle import InputValues, TensorSpec, read_manifest


class InputError(ValueError):
    """Input files or arrays that do not fit the model; one line for the user."""


@dataclass(frozen=True)
class ModelInputs:
    """What the first stage takes. An unnamed single input (``name == ""``) is sent positionally."""

    specs: tuple[TensorSpec, ...]
    values: Mapping[str, InputValues] = field(default_factory=dict)
    fixed_batch: int | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def values_of(self, spec: TensorSpec) -> InputValues:
        """What ``spec`` takes: from the bundle, else real numbers for floats and small integers
        (0 and 1) for integer inputs, which are valid ids and mask entries alike."""
        known = self.values.get(spec.name)
        if known is not None:
            return known
        return InputValues("real") if spec.dtype.startswith("float") else InputValues("index", 2)


def inputs_from_bundle(bundle_dir: Path) -> ModelInputs:
    """The model inputs of a pipeline, from its first stage's bundle."""
    manifest = read_manifest(bundle_dir)
    if manifest.stage_index != 0:
        raise InputError(f"{bundle_dir} is stage {manifest.stage_index}; --bundle takes the first stage (stage-0)")
    return ModelInputs(manifest.inputs, dict(manifest.input_values), manifest.fixed_batch)


def inputs_from_shape(shape: str | None, dtype: str) -> ModelInputs:
    """One unnamed input of per-sample ``shape`` ("3,224,224") when no bundle is given."""
    try:
        dims = tuple(int(d) for d in (shape or "3,224,224").replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--shape {shape!r}: expected sizes like 3,224,224") from None
    return ModelInputs((TensorSpec("", dtype, ("batch", *dims)),))


def sample_shape(spec: TensorSpec) -> tuple[int, ...]:
    """One sample's shape; symbolic non-batch axes cannot be made up."""
    if not all(isinstance(d, int) for d in spec.shape[1:]):
        raise InputError(f"input {spec.name!r} has symbolic axes {list(spec.shape)}; give its data with --input")
    return tuple(int(d) for d in spec.shape[1:])


def random_inputs(inputs: ModelInputs, batch: int, rng: np.random.Generator,
                  padded_masks: bool = False) -> dict[str, np.ndarray]:
    """One random batch that fits the model: normal noise for real inputs, uniform ids within
    [0, high) for index inputs, masks of ones (or, with ``padded_masks``, sample k with its last
    k/(2*batch) positions masked out, as the compiler verifies with)."""
    made = {}
    for spec in inputs.specs:
        shape = (batch, *sample_shape(spec))
        values = inputs.values_of(spec)
        if values.kind == "index":
            made[spec.name] = rng.integers(0, values.high or 1, shape).astype(spec.dtype)
        elif values.kind == "mask":
            made[spec.name] = _mask(shape, padded_masks).astype(spec.dtype)
        elif spec.dtype == "bool":
            made[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            made[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return made


def _mask(shape: tuple[int, ...], padded: bool) -> np.ndarray:
    mask = np.ones(shape, dtype=np.int64)
    if padded:
        batch, length = shape[0], shape[-1]
        for k in range(1, batch):
            mask[k, ..., length - max(1, length * k // (2 * batch)):] = 0
    return mask


def random_batches(inputs: ModelInputs, batch: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [random_inputs(inputs, batch, rng) for _ in range(count)]


def load_arrays(items: Sequence[str], npy: Sequence[Path] = ()) -> dict[str, np.ndarray]:
    """Arrays named by ``--input`` items (``NAME=FILE.npy`` or ``FILE.npz``, whose keys are the
    names) and ``--npy FILE`` (the one input, unnamed: only for single-input models)."""
    if len(npy) > 1:
        raise InputError(f"--npy given {len(npy)} times; for several inputs use --input NAME=FILE.npy for each "
                         "(or one --input FILE.npz)")
    arrays: dict[str, np.ndarray] = {}
    if npy:
        arrays[""] = _load_npy(Path(npy[0]), "--npy")
    for item in items:
        name, sep, path = item.partition("=")
        if sep:
            if not name:
                raise InputError(f"--input {item!r}: expected NAME=FILE.npy")
            _add(arrays, name, _load_npy(Path(path), f"--input {name}"))
        elif item.endswith(".npz"):
            for key, arr in _load_npz(Path(item)).items():
                _add(arrays, key, arr)
        else:
            raise InputError(f"--input {item!r}: expected NAME=FILE.npy or FILE.npz")
    return arrays


def _add(arrays: dict[str, np.ndarray], name: str, arr: np.ndarray) -> None:
    if name in arrays:
        raise InputError(f"input {name!r} is given twice")
    arrays[name] = arr


def _load_npy(path: Path, option: str) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({option}): {exc}") from None
    if not isinstance(data, np.ndarray):
        raise InputError(f"{path}: holds several arrays; pass a .npz file as --input {path}")
    return data


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{path}: not a .npz archive; pass a .npy file as --input NAME={path}")
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file: {exc}") from None


def check_arrays(arrays: Mapping[str, np.ndarray], inputs: ModelInputs) -> dict[str, np.ndarray]:
    """``arrays`` checked against the model's inputs (names, dtypes, shapes, one sample count) and
    keyed by input name; an unnamed array stands for a single-input model's input."""
    names = inputs.names
    if set(arrays) == {""} and len(names) == 1:
        arrays = {names[0]: arrays[""]}  # --npy for a single-input model (its name may be "" too)
    elif "" in arrays:
        raise InputError(f"the model takes {len(names)} inputs ({', '.join(names)}); name each: "
                         "--input NAME=FILE.npy, or one --input FILE.npz")
    unknown = [n for n in arrays if n not in names]
    if unknown:
        raise InputError(f"no model input named {unknown[0]!r}; the model takes {', '.join(names)}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"missing input {missing[0]!r}; the model takes {', '.join(names)}")
    checked = {}
    samples = None
    for spec in inputs.specs:
        arr = arrays[spec.name]
        label = spec.name or "the input"
        if arr.dtype.name != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputError(f"input {label!r} is {arr.dtype.name}, the model takes {spec.dtype}")
            arr = arr.astype(spec.dtype)  # float64 -> float32, int32 -> int64: same kind, safe to send
        if arr.ndim != len(spec.shape) or any(isinstance(w, int) and g != w for g, w in zip(arr.shape[1:],
                                                                                            spec.shape[1:])):
            want = ["N", *spec.shape[1:]]
            raise InputError(f"input {label!r} has shape {list(arr.shape)}, the model takes {want} (N samples)")
        if arr.shape[0] == 0:
            raise InputError(f"input {label!r} has no samples (axis 0 is empty)")
        if samples is not None and arr.shape[0] != samples:
            raise InputError(f"input {label!r} has {arr.shape[0]} samples, another input has {samples}")
        samples = arr.shape[0]
        _check_values(label, arr, inputs.values_of(spec) if spec.name in inputs.values else None)
        checked[spec.name] = arr
    return checked


def _check_values(label: str, arr: np.ndarray, values: InputValues | None) -> None:
    if values is None or values.kind == "real":
        return
    high = values.high if values.kind == "index" else 2
    if arr.size and (arr.min() < 0 or arr.max() >= (high or 1)):
        what = f"token ids in [0, {high})" if values.kind == "index" else "0/1 mask values"
        raise InputError(f"input {label!r} holds values in [{arr.min()}, {arr.max()}]; the model takes {what}")


def _same_samples(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    counts = {name: (arr.shape[0] if arr.ndim else 0) for name, arr in arrays.items()}
    if 0 in counts.values():
        name = next(n for n, c in counts.items() if c == 0)
        raise InputError(f"input {name or 'array'!r} has no samples on axis 0")
    if len(set(counts.values())) > 1:
        raise InputError(f"inputs have different sample counts: {counts}")
    return arrays


def batches_of(arrays: Mapping[str, np.ndarray], batch: int, count: int | None) -> list[dict[str, np.ndarray]]:
    """Requests of ``batch`` samples (axis 0 of every input together), the last one possibly
    smaller; with ``count``, exactly ``count`` full requests, cycling through the data."""
    samples = next(iter(arrays.values())).shape[0]
    if count is None:
        return [{n: np.ascontiguousarray(a[i:i + batch]) for n, a in arrays.items()} for i in range(0, samples, batch)]
    return [{n: np.ascontiguousarray(a[[(i * batch + j) % samples for j in range(batch)]]) for n, a in arrays.items()}
            for i in range(count)]


def choose_batch(requested: int | None, inputs: ModelInputs, default: int = 8) -> int:
    """The batch size to send: the requested one, which a fixed-batch model must match."""
    if inputs.fixed_batch is not None:
        if requested is not None and requested != inputs.fixed_batch:
            raise InputError(f"the model was exported with a fixed batch size of {inputs.fixed_batch}; "
                             f"use -b {inputs.fixed_batch} (or re-export it with a dynamic batch axis)")
        return inputs.fixed_batch
    return requested or default


def requests_from(inputs: ModelInputs | None, arrays: Mapping[str, np.ndarray] | None, batch: int | None,
                  count: int | None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The requests to send: ``arrays`` (checked against ``inputs`` when known, cut into batches)
    or, without them, ``count or 8`` random batches that fit ``inputs``."""
    if inputs is None:  # no bundle: send the arrays as they are; the first agent checks them
        if arrays is None:
            raise InputError("random inputs need the model's inputs: give --bundle or --shape")
        return batches_of(_same_samples(arrays), batch or 8, count)
    size = choose_batch(batch, inputs)
    if arrays is None:
        return random_batches(inputs, size, count or 8, seed)
    checked = check_arrays(arrays, inputs)
    samples = next(iter(checked.values())).shape[0]
    if inputs.fixed_batch is not None and count is None and samples % size:
        raise InputError(f"{samples} samples do not fill batches of {size}, the model's fixed batch size; "
                         f"give a multiple of {size} or --count")
    return batches_of(checked, size, count)
