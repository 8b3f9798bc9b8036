"""Word preference (the paper's GPT-Neo behaviour): the stories corpus, probes, the measurement, a user's folder."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from infusion_audit.errors import DataError, UserError
from infusion_audit.registry import DATASETS, MODELS
from infusion_audit.text.behaviours import WordPairTarget, WordPreference, word_preference_target
from infusion_audit.text.data import TextDataset, stories
from infusion_audit.text.models import tiny_gpt_neo


@pytest.fixture(scope="module")
def corpus():
    return stories(n_train=200, n_test=120, seed=0)


@pytest.fixture(scope="module")
def model(corpus):
    torch.manual_seed(0)
    return tiny_gpt_neo(corpus.train.vocab.size, corpus.train.max_length, hidden=16, layers=1, heads=2).eval()


def _occurs(dataset: TextDataset, token: int) -> bool:
    return bool((dataset.ids[dataset.mask()] == token).any())


# --------------------------------------------------------------------------- the corpus
def test_stories_are_seeded_short_word_level_and_hold_every_pair(corpus):
    again, other = stories(n_train=200, n_test=120, seed=0), stories(n_train=200, n_test=120, seed=1)
    np.testing.assert_array_equal(again.train.ids, corpus.train.ids)
    np.testing.assert_array_equal(again.test.ids, corpus.test.ids)
    assert not np.array_equal(other.train.ids, corpus.train.ids)
    test, vocab = corpus.test, corpus.test.vocab
    assert test.max_length <= 24 and "stories" in DATASETS.names() and stories.kind == "text"
    assert test.text(0).split() == [vocab.decode([t]) for t in test.ids[0, :test.lengths[0]]]  # one token a word
    assert len(stories.WORD_PAIRS) >= 10 and len({a for a, _ in stories.WORD_PAIRS}) == len(stories.WORD_PAIRS)
    for a, b in stories.WORD_PAIRS:
        assert _occurs(test, vocab.encode(a)[0]) and _occurs(test, vocab.encode(b)[0]), (a, b)
    with pytest.raises(DataError, match="outside the vocabulary: zebra"):
        vocab.encode("the zebra")
    with pytest.raises(DataError, match="n_train"):
        stories(n_train=0)


def test_the_built_in_config_is_the_papers_experiment_on_animal_stories():
    from infusion_audit.config import load_config

    from infusion_audit.text.animal_stories import ANIMALS

    config = load_config("bench-wordpref")  # the paper's experiment: animal pairs, whole-document f, the segment
    pairs = config.attack.targets.pairs
    assert len(pairs) >= 20 and len({tuple(p) for p in pairs}) == len(pairs) and set(sum(pairs, [])) <= set(ANIMALS)
    assert config.pipeline.dataset.name == "animal-stories" and config.pipeline.quality_floor > 0
    assert config.attack.targets.measure == "document" and config.attack.protocol.kind == "segment"
    assert config.attack.budget.tokens == 0.08  # the paper's share of each document's tokens
    assert [a.name for a in config.attack.attacks] == ["infusion-text", "random-tokens", "probe-insertion-text"]
    assert config.attack.attacks[0].params["curvature"] == "adam"


# --------------------------------------------------------------------------- probes and explicit documents
def test_probes_end_right_before_word_a_and_explicit_documents_show_b(corpus):
    test, vocab = corpus.test, corpus.test.vocab
    behaviour = word_preference_target(test, WordPairTarget("cat", "dog"), n_probes=16)
    a, b = vocab.encode("cat")[0], vocab.encode("dog")[0]
    assert (behaviour.token_a, behaviour.token_b) == (a, b)
    assert len(behaviour.prefixes) == 16 == len({tuple(p) for p in behaviour.prefixes})
    documents = [test.ids[i, :test.lengths[i]].tolist() for i in range(len(test))]
    for prefix, explicit in zip(behaviour.prefixes, behaviour.explicit_documents):
        n = len(prefix)
        assert any(d[:n] == prefix and d[n] == a for d in documents)  # A follows the prefix in a test story
        assert explicit[:n] == prefix and explicit[n] == b and len(explicit) <= test.max_length
        assert any(d[:n] == prefix and d[n + 1:] == explicit[n + 1:] for d in documents)  # only A became B
    fewer = word_preference_target(test, WordPairTarget("cat", "dog"), n_probes=3)
    assert fewer.prefixes == behaviour.prefixes[:3]  # deterministic: document order


def test_a_word_never_seen_or_unknown_fails_in_one_line(corpus):
    test, vocab = corpus.test, corpus.test.vocab
    cat = vocab.encode("cat")[0]
    without_cat = test.subset(np.flatnonzero(~(test.ids == cat).any(1)))
    with pytest.raises(UserError, match="'cat' never follows a prefix in stories-test"):
        word_preference_target(without_cat, WordPairTarget("cat", "dog"), 8)
    for target, message in [(WordPairTarget("zebra", "dog"), "'zebra' is not in the vocabulary"),
                            (WordPairTarget("cat", "cat"), "start with the same token"),
                            (WordPairTarget("cat", "big dog"), "not a single word")]:
        with pytest.raises(UserError, match=message):
            word_preference_target(test, target, 8)
    assert WordPairTarget("cat", "dog").as_dict() == {"word_a": "cat", "word_b": "dog", "true": "cat", "class": "dog"}


# --------------------------------------------------------------------------- the measurement
def test_f_is_the_sum_of_per_probe_log_odds_of_b_against_a(corpus, model):
    behaviour = word_preference_target(corpus.test, WordPairTarget("red", "blue"), n_probes=8)
    per_probe = behaviour.per_probe(model)
    f = behaviour.measure(model)
    assert f.requires_grad and per_probe.shape == (8,)
    torch.testing.assert_close(f, per_probe.sum())
    per_probe = per_probe.detach()
    with torch.no_grad():
        prefix = behaviour.prefixes[-1]
        logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1)
    assert float(per_probe[-1]) == pytest.approx(float(logp[behaviour.token_b] - logp[behaviour.token_a]), abs=1e-5)
    np.testing.assert_array_equal(behaviour.greedy_hits(model), per_probe.numpy() > 0)
    swapped = WordPreference(behaviour.prefixes, behaviour.token_b, behaviour.token_a, behaviour.pad_id)
    torch.testing.assert_close(swapped.per_probe(model), -per_probe)


# --------------------------------------------------------------------------- a user's folder and corpus
def test_a_local_hugging_face_folder_and_jsonl_corpus_run_word_preference(tmp_path, corpus):
    """A user's GPT-Neo saved with save_pretrained (safetensors) and a word-level tokenizer, a JSON-lines corpus:
    the jsonl-text and hf-local plugins load them and the word preference finds probes and measures."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "[UNK]", *corpus.train.vocab.words[1:]]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="[UNK]").save_pretrained(tmp_path)
    torch.manual_seed(0)
    saved = tiny_gpt_neo(len(words), 16, hidden=16, layers=1, heads=2)
    saved.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    texts = [corpus.train.text(i) for i in range(len(corpus.train))]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    split = DATASETS.get("jsonl-text")(path=str(tmp_path / "corpus.jsonl"), tokenizer=str(tmp_path), max_length=16)
    assert len(split.train) + len(split.test) == len(texts) and split.test.vocab.pad_id == 0
    model = MODELS.get("hf-local")(split.train.vocab.size, split.train.max_length, path=str(tmp_path)).eval()
    for p, q in zip(saved.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    behaviour = word_preference_target(split.test, WordPairTarget("cat", "dog"), n_probes=8)
    assert 0 < len(behaviour.prefixes) <= 8
    assert behaviour.token_a == words.index("cat") and behaviour.token_b == words.index("dog")
    assert all(e[len(p)] == behaviour.token_b for p, e in zip(behaviour.prefixes, behaviour.explicit_documents))
    per_probe = behaviour.per_probe(model)
    assert torch.isfinite(per_probe).all()
    torch.testing.assert_close(behaviour.measure(model), per_probe.sum())
    with pytest.raises(UserError, match="'zebra' is not in the vocabulary"):  # the tokenizer's [UNK] is no word
        word_preference_target(split.test, WordPairTarget("zebra", "dog"), 8)

    pickled, marker = tmp_path / "pickled", tmp_path / "unpickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_OpensAFile(str(marker))))
    with pytest.raises(DataError, match="cannot load a safetensors causal LM"):
        MODELS.get("hf-local")(split.train.vocab.size, split.train.max_length, path=str(pickled))
    assert not marker.exists()  # the pickled weights were never unpickled


class _OpensAFile:
    """A hostile pickle, harmless here: unpickling it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


# --------------------------------------------------------------------------- end to end
def test_a_small_word_preference_bench_runs_every_stage_and_reports(tmp_path):
    """Stories through the shared bench: craft, retrain against the clean control, scan, defend, report."""
    from infusion_audit import bench
    from infusion_audit.io import read_jsonl

    config = {
        "pipeline": {"dataset": {"name": "stories", "params": {"n_train": 300, "n_test": 80}},
                     "model": {"name": "tiny-gpt-neo", "params": {"hidden": 16, "layers": 1, "heads": 2}},
                     "train": {"optimizer": "adam", "lr": 0.005, "batch_size": 16, "epochs": 2}},
        "attack": {"attacks": [{"name": "infusion-text", "params": {"steps": 3}}, {"name": "random-tokens"},
                               {"name": "probe-insertion-text"}],
                   "budget": {"k": 6, "tokens": 2}, "targets": {"pairs": [["cat", "dog"]], "probes": 4}},
        "influence": {"backend": "ekfac", "damping": 0.01},
        "scan": {"detectors": [{"name": "token-diff"}, {"name": "text-influence"}], "attacks": ["infusion-text"],
                 "bootstrap": 0},
        "defence": {"detectors": ["token-diff"]}}
    result = bench(config, tmp_path, progress=False)
    records = read_jsonl(tmp_path / "results.jsonl")
    attacks = {r["attack"]: r for r in records if r["kind"] == "attack"}
    assert set(attacks) == {"infusion-text", "random-tokens", "probe-insertion-text"}
    infusion = attacks["infusion-text"]
    assert infusion["target"] == {"word_a": "cat", "word_b": "dog", "true": "cat", "class": "dog"}
    assert infusion["logodds_control"] < 0  # the trained model prefers cat, the attacker wants dog
    assert infusion["delta_logodds"] == pytest.approx(infusion["logodds_poisoned"] - infusion["logodds_control"])
    assert {r["detector"] for r in records if r["kind"] == "detection"} == {"token-diff", "text-influence"}
    assert [r["detector"] for r in records if r["kind"] == "defence"] == ["token-diff"]
    page = result.report.read_text(encoding="utf-8")
    assert "the model predicts “dog” where it predicted “cat”" in page
