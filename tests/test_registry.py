import subprocess
import sys
import textwrap

import pytest

from infusion_audit.errors import PluginError
from infusion_audit.registry import DATASETS, MODELS, Registry, load_callable


def _make_distribution(root, dist_name, module_name, source, entry_points):
    """A separately installed distribution: a module plus its .dist-info with entry_points.txt."""
    (root / f"{module_name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist_name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_point_plugin_from_separate_distribution(tmp_path, monkeypatch):
    _make_distribution(tmp_path, "acme_models", "acme_models", '''
        import torch
        def wide_mlp(in_channels=1, num_classes=10):
            """A team's own MLP."""
            return torch.nn.Linear(in_channels, num_classes)
        ''', "[infusion_audit.models]\nacme-mlp = acme_models:wide_mlp\nbroken = acme_models:missing\n"
             "digits-cnn = acme_models:wide_mlp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("models")
    names = registry.names()
    assert "acme-mlp" in names
    plugin = next(p for p in registry.plugins() if p.name == "acme-mlp")
    assert plugin.description == "A team's own MLP." and "acme_models" in plugin.source
    assert registry.get("acme-mlp")(3, 4).out_features == 4
    # the broken plugin is reported by name and does not stop the others
    assert any("'broken'" in p and "failed to import" in p for p in registry.problems)


def test_duplicate_name_is_reported_and_first_kept():
    registry = Registry("attacks")
    registry._discovered = True  # keep this test to the two plugins below

    @registry.register("dup")
    def first():
        """First."""

    @registry.register("dup")
    def second():
        """Second."""

    assert registry.get("dup") is first
    assert "'dup'" in registry.problems[0] and "taken" in registry.problems[0]


def test_builtins_and_unknown_names():
    assert {"digits", "cifar10", "npz", "image-folder"} <= set(DATASETS.names())
    assert {"digits-cnn", "tiny-resnet", "simple-cnn"} <= set(MODELS.names())
    with pytest.raises(PluginError, match="unknown model 'nope'; available: .*digits-cnn"):
        MODELS.get("nope")


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'package.module:callable'"),
    ("not_a_module_xyz:f", "cannot import module"),
    ("json:no_such_thing", "has no attribute"),
    ("json:__doc__", "not callable"),
])
def test_user_callable_errors(spec, message):
    with pytest.raises(PluginError, match=message):
        load_callable(spec)


def test_plugins_command_lists_everything(tmp_path):
    out = subprocess.run([sys.executable, "-m", "infusion_audit", "plugins"], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    for name in ("digits", "cifar10", "npz", "image-folder", "digits-cnn", "tiny-resnet", "simple-cnn"):
        assert f"  {name} " in out
    assert "[built-in]" in out
