"""`infusion-audit bench` on a text scenario: the grid of (target, seed) units of a `TextAuditConfig`.

Each unit's records (every attack arm, Infusion first, and the detection records of the scanned arms)
are appended to results.jsonl in one write, so a killed run loses at most the unit in flight and
re-running the same command skips the units already there. The report is rendered by the caller.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..bench import package_versions
from ..config import to_dict
from ..io import append_jsonl_many, read_jsonl, repair_jsonl, stable_hash, write_json
from ..runtime import threads_info
from .evaluation import CaesarEvaluation, TextAuditConfig

log = logging.getLogger(__name__)


def run_text_bench(config: TextAuditConfig, out: Path, progress: bool = True) -> None:
    """Run (or resume) every (target, seed) unit of `config` into out/results.jsonl; write out/provenance.json."""
    out = Path(out)
    results = out / "results.jsonl"
    started = time.perf_counter()
    repair_jsonl(results)
    evaluation = CaesarEvaluation(config, out, progress=progress)
    units = [(target, seed) for target in evaluation.targets() for seed in config.attack.seeds]
    done = {r.get("unit") for r in read_jsonl(results) if r.get("kind") == "attack"}
    todo = [(target, seed) for target, seed in units if evaluation.unit_key(target, seed) not in done]
    log.info("%d text units, %d already finished, %d to run", len(units), len(units) - len(todo), len(todo))
    with tqdm(total=len(units), initial=len(units) - len(todo), desc="text bench units", unit="unit",
              disable=not progress) as bar:
        for target, seed in todo:
            append_jsonl_many(results, evaluation.run_unit(target, seed))
            bar.update(1)
    write_json(out / "provenance.json", provenance(config, evaluation, time.perf_counter() - started, len(todo)))


def provenance(config: TextAuditConfig, evaluation: CaesarEvaluation, seconds: float, units_run: int) -> dict:
    """Versions, threads, seeds, corpus hashes, training metrics and setup timings: what a reviewer needs to repeat
    the run."""
    train, test = evaluation.train_set, evaluation.test_set
    return {
        "domain": "text", "packages": package_versions(), "compute": threads_info(),
        "config_hash": stable_hash(to_dict(config)),
        "seeds": {"data": config.scenario.dataset.params.get("seed"), "train": config.scenario.train.seed,
                  "attack": config.attack.seeds},
        "data": {"train_hash": train.content_hash(), "test_hash": test.content_hash(),
                 "n_train": len(train), "n_test": len(test)},
        "training": {config.scenario.model.name: {k: v for k, v in evaluation.trained.metrics.items()
                                                  if k != "history"}},
        "task_quality": evaluation.quality,
        "decryption_accuracy": {"trained": evaluation.acc_before, "control": evaluation.acc_control},
        "ihvp": evaluation.ihvp.info,
        "seconds_this_invocation": round(seconds, 2), "units_run_this_invocation": units_run,
        "shared_stage_seconds": evaluation.timings,
    }
