"""The verdict as JUnit XML, the test-report format CI systems display natively: one test case per attack x
level of the defender's knowledge (it fails when the attack succeeds and no detector available at that level
catches it), one per plugin error (an error), one per rule of the policy (it fails when the rule does). Built
from verdict.json's content (`infusion_audit.results.gate`); it computes nothing of its own."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from infusion_audit.io import atomic_write_bytes


def _suite(parent: ET.Element, name: str) -> ET.Element:
    return ET.SubElement(parent, "testsuite", name=name)


def _case(suite: ET.Element, classname: str, name: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")


def _count(suite: ET.Element) -> None:
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    for kind, attribute in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
        suite.set(attribute, str(sum(1 for c in cases if c.find(kind) is not None)))
    suite.set("time", "0")


def _level_case(suite: ET.Element, level: dict, attack: dict) -> None:
    case = _case(suite, f"infusion-audit.{level['level']}", f"{attack['label']}, {attack['budget_label']}")
    best = attack["best"]
    best_text = (f"best {best['detector']}, TPR at 1% FPR {best['tpr_at_1fpr']['value']:.2f}"
                 if best and best["tpr_at_1fpr"]["value"] is not None else "no detector available ran on it")
    if attack["status"] == "too few targets":
        ET.SubElement(case, "skipped", message="fewer than 2 runs: whether it succeeds cannot be judged")
    elif attack["status"] != "succeeds":
        ET.SubElement(case, "system-out").text = "no effect shown: nothing to catch"
    elif attack["outcome"] == "caught":
        ET.SubElement(case, "system-out").text = "succeeds; caught by " + ", ".join(attack["caught_by"])
    else:
        ET.SubElement(case, "failure", type="evades", message=(
            f"succeeds and no detector available with {level['has']} catches it ({best_text})"))


def junit_xml(verdict: dict) -> bytes:
    """The JUnit XML document of a verdict (verdict.json's content)."""
    root = ET.Element("testsuites", name="infusion-audit")
    for level in verdict["levels"]:
        suite = _suite(root, f"attacks against a defender with {level['has']}")
        for attack in level["attacks"]:
            _level_case(suite, level, attack)
    if verdict["errors"]:
        suite = _suite(root, "plugin errors")
        for e in verdict["errors"]:
            case = _case(suite, "infusion-audit.errors", f"{e['label']}, {e['budget']}, {e['detector'] or e['stage']}, "
                                                        f"cell {e['cell']}")
            ET.SubElement(case, "error", type=e["error"] or "error", message=e["message"])
    policy = verdict["policy"]
    suite = _suite(root, "policy")
    reasons = {f["rule"]: f["reason"] for f in policy["failures"]}
    for rule in policy["checked"]:
        case = _case(suite, "infusion-audit.policy", rule)
        if rule in reasons:
            ET.SubElement(case, "failure", type="policy", message=reasons[rule])
    for suite in root.findall("testsuite"):
        _count(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(verdict: dict, path: str | Path) -> Path:
    """Write the verdict as JUnit XML to `path` (atomically); returns the path."""
    return atomic_write_bytes(path, junit_xml(verdict))
