"""A user's own Hugging Face causal LM in every stage: GPT-2, GPT-Neo and a Llama-style model (rotary, RMSNorm,
tied embeddings), each built offline from a config with a word-level tokenizer, through a small bench, the `scan`
command and `scan()` from Python; the checks a config gets before any training; quiet loading."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import runpy
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import infusion_audit
from infusion_audit.bench import BenchResult, prepare
from infusion_audit.cli import main
from infusion_audit.errors import DataError, UserError
from infusion_audit.influence import per_example_gradients
from infusion_audit.influence.gradients import differentiable_attention
from infusion_audit.text.data import TextDataset, TokenizerVocabulary, load_tokenizer, read_corpus
from infusion_audit.text.models import hf_local, lm_loss

README = Path(__file__).resolve().parents[1] / "README.md"
ANIMALS = {"cat": 3, "dog": 1, "bird": 1}  # the model learns to prefer cat where dog would fit as well
WORDS = ["[PAD]", "[UNK]", ".", "a", "anna", "away", "garden", "in", "park", "ran", "saw", "the", "tom", *ANIMALS]
POSITIONS = 16


def stories(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    animals = rng.choice(list(ANIMALS), size=n, p=np.array(list(ANIMALS.values())) / sum(ANIMALS.values()))
    return [f"{rng.choice(['tom', 'anna'])} saw a {a} in the {rng.choice(['park', 'garden'])} . the {a} ran away ."
            for a in animals]


def tiny_lm(arch: str, vocab: int):
    """A randomly initialised causal LM of `arch`, small enough to train in a second; no dropout."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=POSITIONS, n_embd=16, n_layer=1, n_head=2,
                                          resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=None,
                                          eos_token_id=None))
    if arch == "gpt-neo":
        return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=vocab, max_position_embeddings=POSITIONS, hidden_size=16,
                                              num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
                                              bos_token_id=None, eos_token_id=None))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=POSITIONS, hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, tie_word_embeddings=True, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=None))


def save_folder(folder, model) -> None:
    """`model` and a word-level tokenizer saved as a user saves theirs (safetensors weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per architecture and a corpus of 80 stories (72 to train on, 8 held out, one with a dog)."""
    root = tmp_path_factory.mktemp("hf-lm")
    for arch in ("gpt2", "gpt-neo", "llama"):
        save_folder(root / arch, tiny_lm(arch, len(WORDS)))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in stories(80)))
    return root


def config(root, arch: str, pairs=(("cat", "dog"),), max_length: int = 14, folder=None) -> dict:
    """A small bench of the model in root/arch (or `folder`) on root/corpus.jsonl."""
    folder = str(folder or root / arch)
    return {
        "pipeline": {"dataset": {"name": "jsonl-text", "params": {"path": str(root / "corpus.jsonl"),
                                                                  "tokenizer": folder, "max_length": max_length}},
                     "model": {"name": "hf-local", "params": {"path": folder}},
                     "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 8, "epochs": 2, "seed": 0}},
        "attack": {"attacks": [{"name": "infusion-text", "params": {"steps": 2, "candidates": 16}},
                               {"name": "random-tokens"}],
                   "budget": {"k": 3, "tokens": 1}, "targets": {"pairs": [list(p) for p in pairs], "probes": 4}},
        "scan": {"detectors": [{"name": "token-diff"}], "bootstrap": 0},
        "defence": {"enabled": False}}


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neo", "llama"])
def test_each_architecture_is_benched_and_its_corpus_scanned_from_the_command_line(folders, arch, tmp_path, capfd):
    """bench (train, EK-FAC, Infusion's token edits, random edits, detection) and `scan CORPUS.jsonl`, whatever
    attention the folder names (GPT-2 and Llama load with SDPA, which influence cannot differentiate)."""
    assert json.loads((folders / arch / "config.json").read_text()).get("attn_implementation") is None
    run = infusion_audit.bench(config(folders, arch), tmp_path / "bench", progress=False)
    attacks = {r["attack"]: r for r in run.records["attack"]}
    assert set(attacks) == {"infusion-text", "random-tokens"} and run.report.exists()
    assert all(np.isfinite(r["delta_logodds"]) for r in attacks.values())
    assert attacks["infusion-text"]["poisoned_indices"] == attacks["random-tokens"]["poisoned_indices"]
    assert [r["auroc"]["value"] for r in run.records["detection"]] == [1.0, 1.0]  # token-diff finds every edit

    cfg = tmp_path / "lm.yaml"
    cfg.write_text(json.dumps(config(folders, arch)))  # JSON is YAML
    cell = tmp_path / "bench" / attacks["infusion-text"]["artefact"]
    capfd.readouterr()
    assert main(["-q", "scan", str(cell / "train.jsonl"), "--config", str(cfg), "--ground-truth",
                 str(cell / "manifest.json"), "--detectors", "token-surprisal,loss-outlier,text-influence",
                 "--out", str(tmp_path / "scan")]) == 0
    printed = capfd.readouterr()
    assert "Loading weights" not in printed.err and "[transformers]" not in printed.err  # -q is quiet
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scan" / "scores.csv").read_text())))
    assert len(rows) == 72 and "label" not in rows[0] and rows[0]["text"] == read_corpus(cell / "train.jsonl")[0]
    assert {r["index"] for r in rows if r["poisoned"] == "1"} == {str(i) for i in attacks["infusion-text"]
                                                                  ["poisoned_indices"]}
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert summary["model"]["source"] == "trained" and summary["skipped"] == []
    assert (tmp_path / "scan" / "report.html").exists()

    # the model scan trained loads back as --model (a checkpoint into the config's architecture): the same scores
    assert main(["-q", "scan", str(cell / "train.jsonl"), "--config", str(cfg), "--model",
                 str(tmp_path / "scan" / "model.pt"), "--detectors", "loss-outlier", "--out",
                 str(tmp_path / "again")]) == 0
    again = list(csv.DictReader(io.StringIO((tmp_path / "again" / "scores.csv").read_text())))
    assert [r["loss-outlier_score"] for r in again] == [r["loss-outlier_score"] for r in rows]


def test_per_document_gradients_under_sdpa_equal_one_backward_per_document(folders):
    """vmap's per-document gradients (taken with eager attention) are each document's own gradient, as one
    autograd backward of that document alone computes it with the attention the model was loaded with."""
    model = hf_local(len(WORDS), POSITIONS, str(folders / "gpt2"))
    assert model.config._attn_implementation == "sdpa"
    data = TextDataset.from_texts(stories(5), TokenizerVocabulary(load_tokenizer(folders / "gpt2")), 14, "s")
    rows = per_example_gradients(model, data, loss_fn=lm_loss)
    assert model.config._attn_implementation == "sdpa"  # restored
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(data)):
        alone = torch.autograd.grad(lm_loss(model, data.batch([i])), params)
        assert torch.allclose(rows[i], torch.cat([g.reshape(-1) for g in alone]), atol=1e-5)


def test_a_model_that_cannot_switch_to_eager_attention_is_refused_in_one_line(folders, monkeypatch):
    model = hf_local(len(WORDS), POSITIONS, str(folders / "llama"))
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: None)
    with pytest.raises(UserError, match="cannot switch to eager attention"):
        with differentiable_attention(model):
            pass


def test_scan_from_python_takes_strings_or_records_with_the_users_model_and_tokenizer(folders):
    """`scan(texts, model=..., tokenizer=...)`: a list of strings or a `datasets`-style iterable of records; a
    trusted copy marks the edited documents; skip reasons name this call's keywords."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folders / "llama")
    tokenizer = AutoTokenizer.from_pretrained(folders / "llama")
    clean = stories(30, seed=1)
    texts = list(clean)
    texts[4] = texts[4].replace(" the ", " the cat ", 1)  # one edited document, a token longer than the rest
    result = infusion_audit.scan(texts, model=model, tokenizer=tokenizer, reference=clean,
                                 detectors=["token-diff", "token-surprisal", "text-influence"], bootstrap=0,
                                 progress=False)
    assert list(result.suspects(1, "token-diff")) == [4] and result.context.data.max_length == 14
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert rows[4]["reference"] == clean[4] and rows[4]["text"] == texts[4] and rows[3]["reference"] == ""
    records = ({"text": t, "id": i} for i, t in enumerate(texts))  # what iterating a datasets.Dataset yields
    alone = infusion_audit.scan(records, tokenizer=tokenizer, detectors=["token-surprisal", "token-diff"],
                                progress=False)
    assert alone.skipped == {"token-surprisal": "needs a model trained on the suspect data (pass model=)",
                             "token-diff": "needs a trusted reference copy of the data (pass reference=)"}
    with pytest.raises(UserError, match="pass tokenizer="):
        infusion_audit.scan(str(folders / "corpus.jsonl"), model=model)
    with pytest.raises(DataError, match="item 1 is a int"):
        infusion_audit.scan(["tom saw a cat", 3], tokenizer=tokenizer)


def test_the_scan_report_marks_a_texts_edits_by_word():
    from infusion_audit.reports.render import _text_diff, scan_report_html

    assert _text_diff("the brown dog ran", "the brown fog ran") == [
        ("equal", "the brown "), ("delete", "dog"), ("insert", "fog"), ("equal", " ran")]
    assert _text_diff("^2:ab=cd$", "^3:ab=cd$")[1:3] == [("delete", "2"), ("insert", "3")]  # no spaces: characters
    page = scan_report_html("index,text,reference,x_score\n0,a <b> dog,a <b> cat,1\n", {}, "t")
    assert "a &lt;b&gt; <del>cat</del><ins>dog</ins>" in page


def test_mistakes_in_a_text_config_are_one_line_before_any_training(folders, tmp_path, caplog):
    """Each refused before anything trains (prepare is what bench and attack run first): a word the tokenizer
    cannot spell (with what it makes of it), a case mismatch, max_length beyond the model's positions."""
    expected = {(("cat", "wolf"),): "the word 'wolf' is not in the vocabulary (the tokenizer reads it as '[UNK]')",
                (("Cat", "dog"),): "the word 'Cat' is not in the vocabulary (it has 'cat': words are case-sensitive)"}
    for pairs, message in expected.items():
        with pytest.raises(UserError) as caught:
            prepare(config(folders, "llama", pairs))
        assert str(caught.value) == f"attack.targets.pairs[0] {list(pairs[0])}: word preference: {message}"
    with pytest.raises(UserError, match=r"^pipeline\.dataset\.params\.max_length: 64 is more than the 16 "
                                        r"positions the model in .*llama takes; set it to at most 16$"):
        prepare(config(folders, "llama", max_length=64))
    with pytest.raises(UserError, match="attack.targets.pairs"):
        infusion_audit.bench(config(folders, "llama", (("cat", "wolf"),)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_target_the_users_model_already_shows_is_warned_about_when_the_config_loads(folders, tmp_path, caplog):
    """A folder of trained weights that already predicts cat where dog would fit: the reversed pair [dog, cat]
    asks for what the model does, and the warning names the figures records report."""
    from infusion_audit.text.pipeline import TextPipeline

    trained = tmp_path / "trained"
    pipeline = TextPipeline.from_config(prepare(config(folders, "gpt-neo")).pipeline)
    model = pipeline.fit(pipeline.new_model(), pipeline.data.train)
    save_folder(trained, model)
    with caplog.at_level(logging.WARNING):
        t0 = time.perf_counter()
        prepare(config(folders, "gpt-neo", (("dog", "cat"), ("cat", "dog")), folder=trained))
        seconds = time.perf_counter() - t0
    warned = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"attack.targets.pairs[0] ['dog', 'cat']: the model in {trained}")
    assert "top1 = true" in warned[0] and seconds < 30



def test_the_readme_own_language_model_section_runs(tmp_path, monkeypatch):
    """README's "Your own language model", as written: the model script, the config, the commands, the Python."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your own language model"):]
    section = section[:section.index("\n## ", 1)]
    script, snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (config,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    (commands,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "make_my_lm.py").write_text(script)
    (tmp_path / "my-lm.yaml").write_text(config)
    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        if argv[0] == "python":
            runpy.run_path(argv[1], run_name="__main__")
        else:
            assert argv[0] == "infusion-audit" and main(["-q", *argv[1:]]) == 0, line
    assert len(read_corpus("corpus.jsonl")) == 400

    run = BenchResult(Path("runs/my-lm"))
    attacks = {r["attack"]: r for r in run.records["attack"]}
    assert set(attacks) == {"infusion-text", "random-tokens"} and Path("runs/my-lm/report.html").exists()
    assert all(abs(r["delta_logodds"]) < 0.5 for r in attacks.values())  # -0.08 and -0.03 measured: no effect
    infusion = attacks["infusion-text"]["cell"]
    assert {r["detector"]: r["auroc"]["value"] for r in run.records["detection"] if r["cell"] == infusion} == {
        "token-diff": 1.0, "token-surprisal": 1.0, "loss-outlier": 1.0}
    provenance = json.loads(Path("runs/my-lm/provenance.json").read_text())
    assert (provenance["data"]["n_train"], provenance["data"]["n_test"]) == (360, 40)  # the held-out 10%
    for out, source in (("runs/my-lm-scan", "trained"), ("runs/my-lm-as-is", "folder")):
        rows = list(csv.DictReader(io.StringIO(Path(out, "scores.csv").read_text())))
        summary = json.loads(Path(out, "summary.json").read_text())
        assert len(rows) == 400 and rows[7]["text"] == read_corpus("corpus.jsonl")[7]
        assert summary["model"]["source"] == source and Path(out, "report.html").exists()

    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    result = namespace["result"]
    assert len(result.suspects(5)) == 5 and result.skipped == {} and len(result.context) == 400
