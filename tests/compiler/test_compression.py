"""What lossy choices cost, measured per cut and per segment on vit_tiny (random weights), and
checked against the pipeline actually built with that one choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edgepipe.agent.formats import codecs
from edgepipe.agent.formats.bundle import load_bundle
from edgepipe.compiler.build import candidate_cuts, compile_model, load_model
from edgepipe.compiler.calibration import registry_calibration
from edgepipe.compiler.compression import (
    LossyMeasurements,
    OutputError,
    cache_path,
    measure_lossy,
    output_error,
)
from edgepipe.compiler.plan_check import StageChoice, check_deployed, quantize_stages

TINY = "vit_tiny_patch16_224"
SAMPLES = 4


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


@pytest.fixture(scope="module")
def calibration():
    return registry_calibration(TINY, SAMPLES)


@pytest.fixture(scope="module")
def measured(tiny, calibration) -> LossyMeasurements:
    return measure_lossy(tiny.model, candidate_cuts(tiny), calibration, tiny.identity.model_sha256)


def test_output_error_of_identical_and_perturbed_outputs() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    assert output_error([ref], [ref.copy()], classifier=True) == OutputError(0.0, 1.0, 1.0)
    got = ref.copy()
    got[2] = -got[2]  # one sample flipped: cosine -1 for it, top-1 changes for it
    error = output_error([ref], [got], classifier=True)
    assert error.max_abs_diff == pytest.approx(2 * np.abs(ref[2]).max())
    assert error.cosine == pytest.approx(-1.0)
    assert error.top1_agreement == 0.75
    assert output_error([ref], [got], classifier=False).top1_agreement is None


def test_every_cut_has_both_codecs_and_every_segment_an_int8_variant(tiny, measured) -> None:
    cuts = candidate_cuts(tiny)
    assert [s.name for s in measured.segments] == ["input", *[c.label for c in cuts]]
    assert measured.classifier and measured.samples == SAMPLES
    for cut, segment in zip(cuts, measured.segments):  # segment k's output is cut k
        by_codec = {c.codec: c for c in segment.codecs}
        assert set(by_codec) == {"fp16", "int8"}
        raw = cut.bytes_per_sample
        assert by_codec["fp16"].out_bytes == raw // 2
        assert raw // 4 < by_codec["int8"].out_bytes < raw // 3  # one byte a value plus a scale per row
        fp16, int8 = by_codec["fp16"].error, by_codec["int8"].error
        assert 0 < fp16.max_abs_diff < int8.max_abs_diff  # fp16 keeps 11 bits, int8 about 8
        assert int8.cosine <= fp16.cosine <= 1.0
    assert measured.segments[-1].codecs == ()  # the model's output goes to the client raw
    for segment in measured.segments:
        assert segment.int8 is not None
        if segment.int8.quantized_nodes == 0:  # patch embedding, norms: nothing to rewrite
            assert segment.int8.error == OutputError(0.0, 1.0, 1.0)
        else:
            assert segment.int8.error.max_abs_diff > 0


def test_problem_fields_follow_planner_v2(measured) -> None:
    fields = measured.segments[3].problem_fields()
    assert set(fields) == {"codecs", "int8"}
    assert set(fields["codecs"]) == {"fp16", "int8"}
    assert set(fields["codecs"]["int8"]) == {"out_bytes", "max_abs_diff", "cosine", "top1_agreement"}
    assert set(fields["int8"]) == {"weight_bytes", "max_abs_diff", "cosine", "top1_agreement"}


def test_a_cut_compressed_in_the_built_pipeline_costs_what_was_measured(tiny, measured, calibration,
                                                                       tmp_path: Path) -> None:
    """The measurement runs suffixes from roundtripped cut tensors; a real 2-stage build with that hop
    compressed must show the same error."""
    k = [s.name for s in measured.segments].index("blocks.5")  # segment k ends at the next cut
    cut = measured.segments[k + 1].name
    result = compile_model(TINY, tmp_path, cuts=[cut])
    for codec in ("fp16", "int8"):
        expected = next(c.error for c in measured.segments[k].codecs if c.codec == codec)
        check = check_deployed(result.model_path, result.bundle_dirs, [StageChoice(False, codec), StageChoice()],
                               calibration)
        assert check.measured.max_abs_diff == pytest.approx(expected.max_abs_diff, rel=1e-3, abs=1e-6)
        assert check.measured.cosine == pytest.approx(expected.cosine, abs=1e-6)


def test_one_int8_stage_costs_what_its_segment_measured(tiny, measured, calibration, tmp_path: Path) -> None:
    """A stage that is exactly one segment, built with int8 weights, gives the segment's measured error."""
    names = [s.name for s in measured.segments]
    k = names.index("blocks.6")  # the attention half of block 6: from blocks.6 to blocks.6.norm2
    result = compile_model(TINY, tmp_path, cuts=[names[k], names[k + 1]])
    choices = [StageChoice(), StageChoice(int8_weights=True), StageChoice()]
    assert quantize_stages(result.bundle_dirs, choices) == [1]
    manifest = load_bundle(result.bundle_dirs[1])  # still hash-checked after the rewrite
    assert manifest.quantization is not None and manifest.quantization.weights == "int8"
    assert manifest.weight_bytes == measured.segments[k].int8.weight_bytes
    check = check_deployed(result.model_path, result.bundle_dirs, choices, calibration)
    expected = measured.segments[k].int8.error
    assert check.measured.max_abs_diff == pytest.approx(expected.max_abs_diff, rel=1e-3)
    assert check.measured.cosine == pytest.approx(expected.cosine, abs=1e-6)
    assert check.int8_stages == (1,)


def test_measurements_are_cached_by_what_they_depend_on(tiny, measured, calibration) -> None:
    cuts = candidate_cuts(tiny)
    path = cache_path(measured.key)
    assert path.is_file() and json.loads(path.read_text())["model_sha256"] == tiny.identity.model_sha256
    again = measure_lossy(tiny.model, cuts, calibration, tiny.identity.model_sha256)
    assert again.cached and again.segments == measured.segments
    fewer = registry_calibration(TINY, SAMPLES - 1)  # other samples: another key, measured anew
    assert cache_path(again.key) != cache_path({**again.key, "calibration": fewer.digest})


def test_roundtrip_is_what_a_receiver_decodes() -> None:
    """The measurement uses codecs.roundtrip: the exact frame bytes a receiver decodes."""
    arr = np.random.default_rng(1).standard_normal((2, 197, 192)).astype(np.float32)
    for codec in ("fp16", "int8"):
        frame = codecs.encode(arr, codec)
        decoded = codecs.decode(frame.tobytes(), codec, "float32", arr.shape)
        assert np.array_equal(codecs.roundtrip(arr, codec), decoded)


def test_text_model_cuts_carry_their_forwarded_mask_raw() -> None:
    """bert_tiny's cuts forward the attention mask (int64): it travels raw whatever the hop's codec,
    and the segments are measured as stages are sliced (masks rebuilt after each cut)."""
    bert = load_model("bert_tiny")
    cuts = candidate_cuts(bert)
    measured = measure_lossy(bert.model, cuts, registry_calibration("bert_tiny", 2), bert.identity.model_sha256)
    layer = [s.name for s in measured.segments].index("bert.encoder.layer.0")
    cut = cuts[layer]  # the cut after segment `layer`
    assert cut.forwarded == ("attention_mask",)
    hidden = cut.bytes_per_sample - 128 * 8  # the mask: 128 int64 per sample
    by_codec = {c.codec: c for c in measured.segments[layer].codecs}
    assert by_codec["fp16"].out_bytes == hidden // 2 + 128 * 8
    assert by_codec["int8"].error.max_abs_diff > by_codec["fp16"].error.max_abs_diff > 0
    assert measured.segments[layer].int8.quantized_nodes > 0
