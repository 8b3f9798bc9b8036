"""The detection engine: one call for scan(), each bench cell and the unedited null."""

import numpy as np
import pytest

from infusion_audit.behaviour import ClassBehaviour, sample_targets
from infusion_audit.config import InfluenceConfig, PluginSpec, ScanConfig
from infusion_audit.detection import UneditedNull, detect, detector_specs, truth_mask
from infusion_audit.detectors import AuditContext
from infusion_audit.errors import DataError, UserError

SPECS = [PluginSpec("loss-outlier"), PluginSpec("influence-outlier", {"mode": "forensic"})]


@pytest.fixture(scope="module")
def behaviours(context):
    return [ClassBehaviour.from_target(t, context.test) for t in sample_targets(context.test, 2, seed=3)]


def test_detect_measures_what_ran_and_records_what_did_not(context):
    data = context.train
    edited = data.with_documents([2, 5], data.x[[2, 5]] + 1 / 16)
    detection = detect(AuditContext(edited, model=context.model, progress=False), SPECS, truth=[2, 5], bootstrap=0)
    assert detection.labels == ["loss-outlier", "influence-outlier(mode=forensic)"]
    assert [label for label, _ in detection.completed] == ["loss-outlier"]
    assert "behaviour" in detection.skipped["influence-outlier(mode=forensic)"]  # what would enable it
    assert set(detection.figures) == {"loss-outlier"} and detection.truth.sum() == 2
    assert detection.ranks["loss-outlier"].min() == 1
    with pytest.raises(UserError, match="listed twice"):
        detect(AuditContext(edited, progress=False), [PluginSpec("loss-outlier")] * 2)


def test_known_runs_are_reused_not_run_again(context):
    ctx = AuditContext(context.train, model=context.model, progress=False)
    first = detect(ctx, SPECS[:1])
    again = detect(ctx, SPECS[:1], known={"loss-outlier": first.runs[0]})
    assert again.runs[0] is first.runs[0]


def test_unedited_null_shares_one_cache_and_reruns_only_what_reads_the_behaviour(context, behaviours):
    clean = context.train
    null = UneditedNull(clean, context.model, ScanConfig(), InfluenceConfig())
    indices = np.array([3, 8, 13])
    scanned = [detect(AuditContext(clean, model=context.model, behaviour=b, progress=False), SPECS, truth=indices,
                      bootstrap=0) for b in behaviours]
    figures = [null.figures(s, indices, b, target) for s, b, target in zip(scanned, behaviours, ("t0", "t1"))]
    for f in figures:
        assert set(f) == {"loss-outlier", "influence-outlier(mode=forensic)"}
        assert f["loss-outlier"]["unedited_model"] == "clean control" and "auroc_unedited" in f["loss-outlier"]
    runs = null._runs
    assert ("loss-outlier", None) in runs  # one run of a detector that ignores the behaviour, for every target
    assert {key[1] for key in runs if key[0].startswith("influence")} == {"t0", "t1"}  # one per behaviour
    assert figures[0]["loss-outlier"] == figures[1]["loss-outlier"]
    assert null.context(None).behaviour is None  # each cell's behaviour on its own copy; one shared cache
    assert null.context(behaviours[0])._cache is null.context(behaviours[1])._cache


def test_detector_specs_and_truth_masks():
    assert [s.name for s in detector_specs("loss-outlier, knn-label", None)] == ["loss-outlier", "knn-label"]
    assert truth_mask([1, 3], 4).tolist() == [False, True, False, True]
    with pytest.raises(DataError, match="outside 0..3"):
        truth_mask([4], 4)
    with pytest.raises(DataError, match="mask has shape"):
        truth_mask(np.zeros(3, bool), 4)
