"""examples/github-actions: the workflow's own steps run as GitHub Actions runs them (bash -eo pipefail, the
job's environment, later steps skipped after a failure unless `if: always()`), in a copy of the examples with
the audit's config reduced to seconds and given a rule that fails: the audit step exits with the policy's code,
and the artifacts the workflow keeps exist and read back (the JUnit file with a JUnit reader)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from junitparser import Failure, JUnitXml

from infusion_audit.cli.bench import POLICY_FAILED

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-actions" / "poisoning-audit.yml"


def expand(text: str, env: dict) -> str:
    """A step's `${{ env.NAME }}` expressions, as Actions expands them."""
    return re.sub(r"\$\{\{\s*env\.(\w+)\s*\}\}", lambda m: env[m.group(1)], text)


def test_the_workflow_audits_keeps_its_artifacts_and_fails_on_the_policy(tmp_path):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    install = next(step for step in steps if step.get("name") == "Install infusion-audit")
    assert 'pip install "$INFUSION_AUDIT"' in install["run"] and job["env"]["INFUSION_AUDIT"] == "infusion-audit"

    # the team's checkout: its examples; the audit's config reduced (2 epochs, 2 targets, 1 detector) and given a
    # rule this run cannot meet (no mitigation ran), so the job must fail on the policy
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    config = yaml.safe_load((tmp_path / job["env"]["AUDIT_CONFIG"]).read_text())
    config["pipeline"]["dataset"]["params"]["test_fraction"] = 0.5
    config["pipeline"]["train"]["epochs"] = 2
    config["pipeline"]["quality_floor"] = 0.0
    config["attack"]["targets"]["n"] = 2
    config["scan"].update({"detectors": [{"name": "loss-outlier"}], "bootstrap": 0})
    config["policy"]["max_mitigated_effect"] = 1.0
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, **job["env"], "AUDIT_CONFIG": "small.yaml",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # where pip put the command

    ran, failed = {}, False
    for step in steps:
        if step is install or (failed and step.get("if") != "always()"):
            continue
        if "run" in step:
            done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                  cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            ran[step["name"]] = done
            failed = failed or done.returncode != 0
        elif step["uses"].startswith("actions/upload-artifact"):
            kept = [tmp_path / path for path in expand(step["with"]["path"], env).split()]
            assert all(path.is_file() for path in kept), kept
            ran[step["name"]] = kept
        elif step["uses"].startswith("mikepenz/action-junit-report"):
            ran[step["name"]] = JUnitXml.fromfile(str(tmp_path / expand(step["with"]["report_paths"], env)))

    audit = ran["Audit the training pipeline"]
    assert audit.returncode == POLICY_FAILED, audit.stderr[-3000:]
    verdict = json.loads((tmp_path / "runs" / "poisoning-audit" / "verdict.json").read_text())
    lines = [line for line in audit.stderr.splitlines() if line.startswith("infusion-audit:")]
    assert lines == [f"infusion-audit: policy failed: {f['rule']}: {f['reason']}" for f in verdict["policy"]["failures"]]
    assert ("infusion-audit: policy failed: max_mitigated_effect=1: no attack was retrained under a mitigation in "
            "this run, so the effect under one cannot be checked (add a mitigations: section)") in lines
    assert verdict["policy"]["passed"] is False and len(verdict["attacks"]) == 4
    assert [a["attack"] for a in verdict["attacks"] if a["control"]] == ["random-noise"]
    junit = ran["Show the verdict as test results"]
    policy = {case.name: case for suite in junit if suite.name == "policy" for case in suite}
    assert isinstance(policy["max_mitigated_effect=1"].result[0], Failure)
    assert sum(suite.tests for suite in junit) == 3 * len(verdict["levels"]) + len(policy)
