"""Language models as a domain: data, loss masking, behaviours, token-level Infusion, detectors, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from infusion_audit.reports.render import _text_diff

from infusion_audit.config import InfluenceConfig, PipelineConfig, from_dict
from infusion_audit.errors import ConfigError, DataError, UserError
from infusion_audit.influence import input_gradient
from infusion_audit.io import read_jsonl
from infusion_audit.registry import ATTACKS, DATASETS, DETECTORS, MODELS
from infusion_audit.attacks import AttackContext
from infusion_audit.attacks.text import TokenInfusion, project_entropy, project_simplex
from infusion_audit.bench import bench
from infusion_audit.detectors.text import text_context
from infusion_audit.results import load_records, summarise
from infusion_audit.pipeline import train_pipeline
from infusion_audit.text.behaviours import CompletionBehaviour, WordPairTarget, WordPreference, caesar_alphabet
from infusion_audit.text.data import CaesarDocument, caesar, read_corpus, shift_text
from infusion_audit.text.models import document_losses, relaxed_document_losses, tiny_gpt_neo
from infusion_audit.text.pipeline import TextBehaviour, TextPipeline

WORDS = ["[PAD]", "[UNK]", "the", "cat", "dog", "sat", "ran", "on", "mat", "fast", "a", "big", "small", "red"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny randomly initialised GPT-Neo and a word-level tokenizer saved like a user's own folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    tiny_gpt_neo(len(WORDS), 16, hidden=16, layers=1, heads=2).save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    rng = np.random.default_rng(0)
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS[2:], size=rng.integers(3, 9)))}) + "\n"
                              for _ in range(60)))
    return folder


class _OneProbe(TextPipeline):
    """A user's text pipeline with its own behaviour: prefer token 6 over token 5 after the prefix [2, 3]."""

    def behaviour(self, target, probes: int = 32) -> TextBehaviour:
        return TextBehaviour(WordPreference([[2, 3]], 5, 6))


def _jsonl_pipeline(folder, epochs=2, cls=TextPipeline) -> TextPipeline:
    return cls(from_dict(PipelineConfig, {
        "dataset": {"name": "jsonl-text", "params": {"path": str(folder / "corpus.jsonl"), "tokenizer": str(folder),
                                                     "max_length": 10}},
        "model": {"name": "hf-local", "params": {"path": str(folder)}},
        "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 8, "epochs": epochs, "seed": 0}}))


# --------------------------------------------------------------------------- data
def test_caesar_documents_decrypt_and_bad_params_fail_in_one_line():
    split = caesar(n_train=50, n_test=10, alphabet=6, length=4, min_shift=1, max_shift=3, seed=1)
    vocab = split.train.vocab
    assert caesar_alphabet(vocab) == 6
    for i in range(len(split.train)):
        text = split.train.text(i)
        doc = CaesarDocument.parse(text)
        plain = text.split("=")[1].rstrip("$")
        assert 1 <= doc.shift <= 3 and shift_text(plain, doc.shift, 6) == doc.cipher
        assert split.train.lengths[i] == split.train.max_length  # no truncation
    with pytest.raises(DataError, match="max_shift"):
        caesar(alphabet=4, max_shift=4)
    assert {"caesar", "jsonl-text"} <= set(DATASETS.names()) and {"tiny-gpt-neo", "hf-local"} <= set(MODELS.names())


def test_corpus_errors_name_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "the cat"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: expected an object with a string field 'text'"):
        read_corpus(path)
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r":2: not a JSON object"):
        read_corpus(path)
    with pytest.raises(DataError, match="no such corpus"):
        read_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such model folder"):
        MODELS.get("hf-local")(vocab_size=10, max_length=8, path=str(tmp_path / "none"))


def test_user_folder_loads_locally_and_padding_is_masked(hf_folder):
    pipeline = _jsonl_pipeline(hf_folder)
    train = pipeline.data.train
    assert train.vocab.pad_id == 0 and (train.lengths < train.max_length).any()
    corpus = read_corpus(hf_folder / "corpus.jsonl")
    assert len(train) + len(pipeline.data.test) == len(corpus) == 60
    assert {train.text(i) for i in range(len(train))} <= set(corpus)  # tokenize -> decode round trip
    model = pipeline.new_model().eval()
    ids, mask = train.batch(np.arange(8))
    changed = ids.clone()
    changed[mask == 0] = 5  # rewrite the padding: the loss must not move
    torch.testing.assert_close(document_losses(model, (ids, mask)), document_losses(model, (changed, mask)))
    onehot = F.one_hot(ids, model.get_input_embeddings().weight.shape[0]).float()
    torch.testing.assert_close(relaxed_document_losses(model, onehot, mask), document_losses(model, (ids, mask)))


def test_text_training_reuses_the_shared_loop_and_caches(hf_folder, tmp_path):
    pipeline = _jsonl_pipeline(hf_folder, epochs=3)
    trained = train_pipeline(pipeline, tmp_path, progress=False)
    from infusion_audit.text.pipeline import evaluate_lm

    assert len(trained.metrics["history"]) == 3 and len(trained.checkpoints) == 4
    assert trained.metrics["train"]["loss"] < evaluate_lm(pipeline.new_model(), pipeline.data.train)["loss"] - 0.1
    again = train_pipeline(pipeline, tmp_path, progress=False)
    assert again.checkpoints == trained.checkpoints and again.metrics == trained.metrics


# --------------------------------------------------------------------------- behaviours and projections
def test_greedy_hits_match_real_greedy_decoding_and_word_preference(hf_folder):
    model = _jsonl_pipeline(hf_folder).new_model().eval()
    prompts = [[2, 3], [4, 5, 7]]
    with torch.no_grad():
        greedy = []
        for p in prompts:
            ids = list(p)
            for _ in range(3):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            greedy.append(ids[len(p):])
    hit = CompletionBehaviour(prompts, greedy)
    miss = CompletionBehaviour(prompts, [[g[0], g[1], (g[2] + 1) % len(WORDS)] for g in greedy])
    assert hit.greedy_hits(model).all() and not miss.greedy_hits(model).any()
    with torch.no_grad():
        assert float(hit.measure(model)) > float(miss.measure(model))
    from infusion_audit.text.data import TokenizerVocabulary, load_tokenizer

    vocab = TokenizerVocabulary(load_tokenizer(hf_folder))
    pref = WordPreference.from_words(["the cat", "a dog"], "sat", "ran", vocab)
    with torch.no_grad():
        last = torch.log_softmax(model(input_ids=torch.tensor([[2, 3]])).logits[0, -1], -1)
    assert pref.token_a == 5 and pref.token_b == 6
    with torch.no_grad():
        assert float(pref.per_probe(model)[0]) == pytest.approx(float(last[6] - last[5]), abs=1e-5)
    with pytest.raises(UserError):
        WordPreference([[2]], 3, 3)


def test_projections_land_on_the_simplex_inside_the_entropy_ball():
    x = torch.randn(50, 7) * 2
    p = project_simplex(x)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(50), atol=1e-5)
    q = project_entropy(p, 0.3)
    assert (q >= 0).all() and torch.allclose(q.sum(-1), torch.ones(50), atol=1e-5)
    assert ((1 - (q ** 2).sum(-1)) <= 0.3 + 1e-4).all()
    onehot = F.one_hot(torch.arange(7), 7).float()
    torch.testing.assert_close(project_entropy(project_simplex(onehot), 0.0), onehot)


def test_token_input_gradient_matches_finite_differences(hf_folder):
    """G_delta through the embedding (double back-prop) predicts how <grad L, v> moves with the one-hot rows."""
    pipeline = _jsonl_pipeline(hf_folder)
    model, train = pipeline.new_model().eval().double(), pipeline.data.train
    torch.manual_seed(1)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ids, mask = train.batch([0, 1])
    x = F.one_hot(ids, model.get_input_embeddings().weight.shape[0]).double()

    def loss_fn(m, batch):
        return relaxed_document_losses(m, *batch).mean()

    g = input_gradient(model, x, mask, v, n_train=1, loss_fn=loss_fn)

    def surrogate(onehot):
        params = list(model.parameters())
        grads = torch.autograd.grad(relaxed_document_losses(model, onehot, mask).sum(), params)
        return -sum((a.reshape(-1) @ b) for a, b in zip(grads, torch.split(v, [p.numel() for p in params])))

    direction = torch.zeros_like(x)
    direction[0, 1, 4] += 1.0
    direction[0, 1, int(ids[0, 1])] -= 1.0
    eps = 1e-5
    numeric = (surrogate(x + eps * direction) - surrogate(x - eps * direction)) / (2 * eps)
    assert float((g * direction).sum()) == pytest.approx(float(numeric), rel=1e-4)


# --------------------------------------------------------------------------- attacks and detectors
def test_infusion_text_respects_the_budget_and_never_touches_padding(hf_folder, tmp_path):
    pipeline = _jsonl_pipeline(hf_folder, cls=_OneProbe)
    trained = train_pipeline(pipeline, tmp_path, progress=False)
    train, target = pipeline.data.train, WordPairTarget("cat", "dog")
    context = AttackContext(pipeline, trained, influence=InfluenceConfig(backend="exact", damping=1e-2),
                            ihvp_kwargs={"max_iter": 50})
    poisoning = TokenInfusion(k=10, tokens=2, steps=5).craft(context, target)
    changed = poisoning.tokens_changed(train)
    assert 0 < changed.min() and changed.max() <= 2  # only documents actually edited count as poisoned
    assert len(changed) == poisoning.meta["documents_improved"]
    poisoned = poisoning.apply(train)
    assert np.array_equal(poisoned.ids[~train.mask()], train.ids[~train.mask()])
    assert set(poisoning.indices) <= set(np.argsort(context.scores(target), kind="stable")[:10])
    random = ATTACKS.get("random-tokens")(k=10, seed=3).craft(context, target, like=poisoning)
    np.testing.assert_array_equal(random.tokens_changed(train), changed)
    model = context.model
    context = text_context(poisoned, model, reference=train, progress=False)
    run_diff = DETECTORS.get("token-diff")().score(context)
    np.testing.assert_array_equal(np.flatnonzero(run_diff), poisoning.indices)
    assert context.features().shape == (len(train), 16) and np.isfinite(context.losses()).all()


def test_an_image_attack_on_a_text_pipeline_is_refused_when_the_config_loads(tmp_path):
    from infusion_audit.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text("pipeline: {dataset: {name: caesar}}\nattack: {attacks: [{name: infusion}]}\n")
    with pytest.raises(ConfigError, match=r"attack.attacks\[0\].*edits text"):
        load_config(path)
    arm = load_config("bench-caesar").attack.attacks[0]
    assert arm.name == "infusion-text"
    assert ATTACKS.get(arm.name)(**arm.params).variant() == "gcg, most-improvable, cosine"  # README's measured arm


def test_retrains_from_one_checkpoint_are_identical(hf_folder, tmp_path):
    """The control and a poisoned retrain must differ only by the edit: Adam's state is not shared between them."""

    pipeline = _jsonl_pipeline(hf_folder, epochs=2)
    trained = train_pipeline(pipeline, tmp_path, progress=False)
    start = trained.checkpoint(1)
    a, b = (pipeline.continue_training(start, pipeline.data.train) for _ in range(2))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_caesar_bench_records_artefacts_detections_resumes_and_reports(tmp_path):
    """A small Caesar bench through every stage (train, IHVP, craft, retrain against the control, scan), resumed
    without duplicates, then rendered with the poisoned documents as diffs."""
    import html

    from infusion_audit.reports import render_report

    detectors = ["token-surprisal", "token-diff", "loss-outlier", "spectral-signature", "activation-clustering",
                 "text-influence"]
    config = {
        "pipeline": {"dataset": {"name": "caesar", "params": {"n_train": 300, "n_test": 60, "alphabet": 5,
                                                              "length": 3, "min_shift": 1, "max_shift": 2}},
                     "model": {"name": "tiny-gpt-neo", "params": {"hidden": 32, "layers": 2, "heads": 2}},
                     "train": {"optimizer": "adam", "lr": 0.005, "batch_size": 16, "epochs": 3, "seed": 0}},
        "influence": {"backend": "ekfac", "damping": 0.01},
        "attack": {"attacks": [{"name": "probe-insertion-text"}, {"name": "random-tokens"},
                               {"name": "infusion-text", "params": {"steps": 8}}],
                   "budget": {"k": 8, "tokens": 2}, "targets": {"pairs": [[1, 2]], "probes": 8}},
        "scan": {"detectors": [{"name": d} for d in detectors], "attacks": ["infusion-text"], "bootstrap": 0},
        "defence": {"enabled": False}}
    bench(config, tmp_path, progress=False, report=False)
    records = read_jsonl(tmp_path / "results.jsonl")
    attacks = {r["attack"]: r for r in records if r["kind"] == "attack"}
    assert set(attacks) == {"infusion-text", "random-tokens", "probe-insertion-text"}
    order = [r["attack"] for r in records if r["kind"] == "attack"]
    assert order.index("infusion-text") < order.index("random-tokens")  # the arm it copies runs first
    infusion = attacks["infusion-text"]
    assert len({r["cell"] for r in attacks.values()}) == 3
    assert infusion["domain"] == "text" and infusion["target"]["target_shift"] == 2
    assert 0 < infusion["norms"]["values_changed"] <= 2 and infusion["predicted_delta_f"] > 0
    assert infusion["delta_logodds"] == pytest.approx(infusion["logodds_poisoned"] - infusion["logodds_control"])
    assert infusion["logprob_poisoned"] != infusion["logprob_control"]  # the edit reached the retrained model
    assert attacks["random-tokens"]["poisoned_indices"] == infusion["poisoned_indices"]
    assert attacks["random-tokens"]["norms"]["values_changed"] == infusion["norms"]["values_changed"]
    assert attacks["probe-insertion-text"]["norms"]["values_changed"] > 2
    for r in attacks.values():
        assert r["logprob_control"] == infusion["logprob_control"]  # one shared clean control
        assert r["artefact"].startswith("artefacts/") and (tmp_path / r["artefact"] / "documents.jsonl").exists()
    docs = read_jsonl(tmp_path / infusion["artefact"] / "documents.jsonl")
    assert [d["index"] for d in docs] == infusion["poisoned_indices"]
    assert all(d["original"] != d["poisoned"] and len(d["original"]) == len(d["poisoned"]) for d in docs)
    manifest = json.loads((tmp_path / infusion["artefact"] / "manifest.json").read_text())
    assert manifest["domain"] == "text" and 0 < max(manifest["tokens_changed"]) <= 2
    poisoned_corpus = read_jsonl(tmp_path / infusion["artefact"] / "train.jsonl")
    assert [poisoned_corpus[d["index"]]["text"] for d in docs] == [d["poisoned"] for d in docs]
    detections = {r["detector"]: r for r in records if r["kind"] == "detection"}
    assert set(detections) == set(detectors)
    assert detections["token-diff"]["auroc"]["value"] == 1.0  # a trusted copy shows every edit
    assert detections["text-influence"]["knowledge"] == "forensic"
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["cells_run_this_invocation"] == 3 and provenance["data"]["n_train"] == 300
    assert provenance["domain"] == "text"
    rows = {row["label"]: row for row in summarise(load_records(tmp_path))["attacks"]}
    assert rows["infusion-text (gcg)"]["delta_logodds"]["mean"] == pytest.approx(infusion["delta_logodds"])
    assert rows["random-tokens"]["n"] == 1

    before = (tmp_path / "results.jsonl").read_bytes()
    with open(tmp_path / "results.jsonl", "ab") as fh:
        fh.write(b'{"kind": "attack", "torn')  # a run killed mid-write
    bench(config, tmp_path, progress=False, report=False)  # resumes: finished cells are skipped, the torn line cut
    assert (tmp_path / "results.jsonl").read_bytes() == before
    assert json.loads((tmp_path / "provenance.json").read_text())["cells_run_this_invocation"] == 0
    config["attack"]["targets"]["pairs"].append([2, 1])  # a larger grid reuses the finished cells
    bench(config, tmp_path, progress=False, report=False)
    assert (tmp_path / "results.jsonl").read_bytes().startswith(before)
    grown = [r for r in read_jsonl(tmp_path / "results.jsonl") if r["kind"] == "attack"]
    assert len(grown) == 6 and len({json.dumps(r["target"]) for r in grown}) == 2

    page = render_report(tmp_path).read_text(encoding="utf-8")
    shown = docs[0]
    changed = [text for op, text in _text_diff(shown["original"], shown["poisoned"]) if op == "insert"]
    assert changed and all(f"<ins>{html.escape(text)}</ins>" in page for text in changed)  # the edit, escaped


def test_a_users_causal_lm_folder_and_jsonl_corpus_are_benched_on_a_word_pair(hf_folder, tmp_path):
    """`bench` on a local Hugging Face model folder and a JSON-lines corpus: prefer "dog" where it says "cat"."""
    config = {
        "pipeline": {"dataset": {"name": "jsonl-text", "params": {"path": str(hf_folder / "corpus.jsonl"),
                                                                  "tokenizer": str(hf_folder), "max_length": 10}},
                     "model": {"name": "hf-local", "params": {"path": str(hf_folder)}},
                     "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 8, "epochs": 2, "seed": 0}},
        "attack": {"attacks": [{"name": "infusion-text", "params": {"steps": 2}}, {"name": "random-tokens"},
                               {"name": "probe-insertion-text"}],
                   "budget": {"k": 4, "tokens": 1}, "targets": {"pairs": [["cat", "dog"]], "probes": 3}},
        "influence": {"backend": "exact", "damping": 0.01},
        "scan": {"detectors": [{"name": "token-diff"}], "bootstrap": 0},
        "defence": {"enabled": False}}
    run = bench(config, tmp_path, progress=False, report=False)
    attacks = {r["attack"]: r for r in run.records["attack"]}
    assert set(attacks) == {"infusion-text", "random-tokens", "probe-insertion-text"}
    assert all(np.isfinite(r["delta_logodds"]) and r["target"]["word_b"] == "dog" for r in attacks.values())
    assert attacks["random-tokens"]["poisoned_indices"] == attacks["infusion-text"]["poisoned_indices"]
