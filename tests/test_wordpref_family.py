"""The word-preference experiment as the paper ran it: long animal stories, f over whole documents, the
retrained segment with Adam's state, and token edits within a word family or a share of each document."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infusion_audit.attacks.base import AttackContext
from infusion_audit.attacks.text import RandomTokens, TokenInfusion
from infusion_audit.behaviour import measurement_gradient
from infusion_audit.config import (InfluenceConfig, PipelineConfig, ProtocolConfig, from_dict, from_sections,
                                   load_config)
from infusion_audit.errors import ConfigError, UserError
from infusion_audit.influence import influence_scores
from infusion_audit.influence.gradients import num_trainable
from infusion_audit.pipeline import Pipeline, train_pipeline
from infusion_audit.protocol import Victim
from infusion_audit.registry import DATASETS
from infusion_audit.segment import Segment
from infusion_audit.text.animal_stories import ANIMAL_WEIGHTS, ANIMALS, SOUNDS, animal_stories
from infusion_audit.text.behaviours import WordPairTarget, WordPreference, word_token
from infusion_audit.text.models import lm_loss, tiny_gpt_neo
from infusion_audit.text.word_family import document_word_preference, replace_words, word_counts


@pytest.fixture(scope="module")
def corpus():
    return animal_stories(n_train=300, n_test=60, seed=0)


@pytest.fixture(scope="module")
def model(corpus):
    torch.manual_seed(0)
    return tiny_gpt_neo(corpus.train.vocab.size, corpus.train.max_length, hidden=16, layers=1, heads=2).eval()


# --------------------------------------------------------------------------- the corpus
def test_animal_stories_are_seeded_long_word_level_with_a_skewed_animal_family(corpus):
    again, other = animal_stories(n_train=300, n_test=60, seed=0), animal_stories(n_train=300, n_test=60, seed=1)
    np.testing.assert_array_equal(again.train.ids, corpus.train.ids)
    assert not np.array_equal(other.train.ids, corpus.train.ids)
    train, vocab = corpus.train, corpus.train.vocab
    assert "animal-stories" in DATASETS.names() and animal_stories.kind == "text"
    assert 150 <= train.lengths.mean() <= 250 and train.lengths.max() <= 256
    assert train.text(0).split() == [vocab.decode([t]) for t in train.ids[0, :train.lengths[0]]]  # a word a token
    assert len(ANIMALS) >= 10 and list(ANIMAL_WEIGHTS) == sorted(ANIMAL_WEIGHTS, reverse=True)
    counts = word_counts(train, ANIMALS)
    assert counts["cat"] > 5 * counts["bear"] > 0  # the commonest animal far outnumbers a rare one
    for i in range(20):  # each story's pet recurs, with its own sound
        words = train.text(i).split()
        pet = next(w for w in words if w in ANIMALS)
        assert words.count(pet) >= 5
        assert all(words[j - 1] in ANIMALS for j, w in enumerate(words) if w in SOUNDS.values())
    with pytest.raises(Exception, match="n_train"):
        animal_stories(n_train=0)


# --------------------------------------------------------------------------- the measurement
def test_document_preference_probes_every_occurrence_and_equals_the_prefix_measurement(corpus, model):
    test, vocab = corpus.test, corpus.test.vocab
    behaviour = document_word_preference(test, "cat", "dog", min_count=5, max_documents=3)
    a, b = vocab.encode("cat")[0], vocab.encode("dog")[0]
    assert len(behaviour.documents) == 3 and all(d.count(a) >= 5 for d in behaviour.documents)
    assert behaviour.n_probes == sum(d[1:].count(a) for d in behaviour.documents)
    assert behaviour.first.sum() == 3 and behaviour.first[0]
    prefixes = [d[:j] for d, ps in zip(behaviour.documents, behaviour.positions) for j in ps]
    reference = WordPreference(prefixes, a, b, vocab.pad_id)
    torch.testing.assert_close(behaviour.per_probe(model), reference.per_probe(model), atol=1e-5, rtol=1e-5)
    f = behaviour.measure(model)
    assert f.requires_grad and float(f.detach()) == pytest.approx(float(reference.measure(model).detach()), abs=1e-3)
    assert all(b in e and a not in e[1:] for e in behaviour.explicit_documents)  # probe insertion: every A is B
    rare = document_word_preference(test, "owl", "cat", min_count=50, max_documents=2)  # none has 50: the most
    assert 1 <= len(rare.documents) <= 2
    with pytest.raises(UserError, match="same token"):
        document_word_preference(test, "cat", "cat")


def test_replace_words_renames_within_the_budget(corpus):
    train, vocab = corpus.train, corpus.train.vocab
    cat, dog = word_token(vocab, "cat"), word_token(vocab, "dog")
    index = np.flatnonzero((train.ids == cat).sum(1) >= 5)[:3]
    ids = replace_words(train, index, {cat: dog}, budget=np.array([2, 100, 0]))
    before = (train.ids[index] == cat).sum(1)
    assert (ids[0] == cat).sum() == before[0] - 2 and (ids[1] == cat).sum() == 0
    np.testing.assert_array_equal(ids[2], train.ids[index[2]])
    assert ((ids != train.ids[index]).sum(1) == np.array([2, before[1], 0])).all()


# --------------------------------------------------------------------------- the segment protocol
@pytest.fixture(scope="module")
def segment_run(tmp_path_factory):
    config = from_dict(PipelineConfig, {
        "dataset": {"name": "animal-stories", "params": {"n_train": 48, "n_test": 8, "seed": 0}},
        "model": {"name": "tiny-gpt-neo", "params": {"hidden": 16, "layers": 1, "heads": 2}},
        "train": {"optimizer": "adam", "lr": 0.002, "adam_betas": [0.9, 0.95], "batch_size": 8, "epochs": 2,
                  "seed": 0, "order": "fixed"}}, "<test>", "pipeline")
    pipeline = Pipeline.from_config(config)
    return pipeline, train_pipeline(pipeline, tmp_path_factory.mktemp("segment"), progress=False)


def test_the_segment_replays_the_end_of_training_exactly_with_adams_state(segment_run):
    pipeline, trained = segment_run
    segment = Segment(pipeline, trained, steps=2)
    assert len(segment.documents) == 16 and segment.first == 4
    order = np.random.default_rng(0).permutation(48)
    np.testing.assert_array_equal(segment.documents, np.sort(order[32:]))  # the last two batches of the fixed order
    assert segment.check() == 0.0  # the clean replay is the trained model, bit for bit
    assert segment.start().optimizer["state"]  # Adam's moments travel with the checkpoint
    again = Segment(pipeline, trained, steps=2)  # the start is cached on disk, beside the checkpoints
    assert (trained.checkpoints[-1].parent / "segment-2.pt").exists() and again.check() == 0.0
    assert Segment(pipeline, trained).check() == 0.0  # the whole last epoch
    train = pipeline.data.train
    outside = np.setdiff1d(np.arange(48), segment.documents)[0]
    edited = train.with_documents([outside], np.roll(train.ids[[outside]], 1, axis=1))
    assert segment.check(segment.retrain(edited)) == 0.0  # a document the segment never sees changes nothing
    assert segment.check(segment.retrain(train.without([outside]))) == 0.0  # nor does removing one (a defence)
    inside = segment.documents[0]
    edited = train.with_documents([inside], np.roll(train.ids[[inside]], 1, axis=1))
    assert segment.check(segment.retrain(edited)) > 0.0
    assert segment.check(segment.retrain(train.without([inside]))) > 0.0
    with pytest.raises(UserError, match="steps: must be 1..6"):
        Segment(pipeline, trained, steps=7)


def test_the_segment_is_a_protocol_option_and_the_attacker_edits_only_what_it_sees(segment_run):
    pipeline, trained = segment_run
    assert ProtocolConfig().identity() == {"kind": "continue", "attack_epoch": None, "start_epoch": None,
                                           "epochs": 1}  # the cell keys of the other protocols stay as they were
    protocol = from_dict(ProtocolConfig, {"kind": "segment", "steps": 2}, "<test>", "attack.protocol")
    assert protocol.identity()["steps"] == 2
    for bad in ({"steps": 2}, {"kind": "segment", "epochs": 2}, {"kind": "segment", "attack_epoch": 1}):
        with pytest.raises(ConfigError, match="attack.protocol"):
            from_dict(ProtocolConfig, bad, "<test>", "attack.protocol")
    with pytest.raises(ConfigError, match="attack.protocol.kind"):
        from_sections({"attack": {"protocol": {"kind": "segment"}}, "mitigations": [{"name": "clip"}]})
    victim = Victim(pipeline, trained, protocol)
    assert victim.segment.check(victim.control()["model"]) == 0.0
    context = AttackContext(pipeline, trained, documents=victim.segment.documents, progress=False)
    assert context.budget_k(0.5) == 8  # a share of the 16 documents the segment sees
    picked = context.select(WordPairTarget("cat", "dog"), 3, "random", 0, eligible=np.arange(48) % 2 == 0)
    assert set(picked) <= set(victim.segment.documents) and all(i % 2 == 0 for i in picked)
    # a selection of an attack's own (the screen of most-improvable) draws from the same pool
    screened = TokenInfusion(k=3, selection="most-improvable", screen=2, steps=1, candidates=4).craft(
        context, WordPairTarget("cat", "dog"))
    assert set(screened.indices) <= set(victim.segment.documents)


def test_the_adam_curvature_predicts_what_the_segment_does_to_f(segment_run):
    """The adam query v = P grad f (P = 1 / (sqrt(v) + eps) from Adam's state at the segment's start) predicts the
    change of f after the segment's replay better than the EK-FAC influence query: over 32 random 10-token edits of
    one segment document each, the predicted change <grad L(doc) - grad L(doc'), v> correlates with the replayed
    one at 0.63 against influence's 0.41 (measured; edits drawn with seeds 1-3: 0.81/0.47, 0.50/0.32, 0.73/0.57)."""
    pipeline, trained = segment_run
    victim = Victim(pipeline, trained, from_dict(ProtocolConfig, {"kind": "segment", "steps": 2}, "<test>", "p"))
    context = AttackContext(pipeline, trained, documents=victim.segment.documents, progress=False,
                            retrain_start=victim.retrain_start, influence=InfluenceConfig(backend="ekfac", damping=1e-3))
    target = WordPairTarget("cat", "dog", "document")
    behaviour = context.behaviour(target)
    start = victim.segment.start().optimizer
    second = torch.cat([start["state"][i]["exp_avg_sq"].reshape(-1) for i in range(len(start["state"]))])
    expected = measurement_gradient(context.model, behaviour) / (second.sqrt() + start["param_groups"][0]["eps"])
    torch.testing.assert_close(context.query(target, curvature="adam"), expected / expected.norm())
    train, f0 = pipeline.data.train, float(behaviour.measure(victim.control()["model"]).detach())
    rng, edits = np.random.default_rng(0), []
    for _ in range(32):
        doc = int(rng.choice(victim.segment.documents))
        ids = train.ids[[doc]].copy()
        ids[0, rng.choice(np.arange(1, train.lengths[doc]), 10, replace=False)] = rng.integers(1, train.vocab.size, 10)
        edits.append((doc, ids))
    replayed = [float(behaviour.measure(victim.retrain(train.with_documents([d], ids)).model).detach()) - f0
                for d, ids in edits]

    def predicted(curvature):
        v = context.query(target, curvature=curvature)
        return [influence_scores(context.model, train.subset([d]), v, loss_fn=lm_loss)[0]
                - influence_scores(context.model, train.with_documents([d], ids).subset([d]), v, loss_fn=lm_loss)[0]
                for d, ids in edits]

    adam, influence = (np.corrcoef(predicted(c), replayed)[0, 1] for c in ("adam", "influence"))
    assert adam > 0.5 and adam > influence + 0.1, (adam, influence)
    for start in (None, lambda: None):  # no retrain start (an attack on its own), or a victim that retrains from scratch
        alone = AttackContext(pipeline, trained, progress=False, retrain_start=start)
        with pytest.raises(UserError, match="curvature adam reads Adam's second moments"):
            TokenInfusion(k=2, steps=1, curvature="adam").craft(alone, target)
    with pytest.raises(UserError, match="unknown curvature 'newton'"):
        TokenInfusion(curvature="newton")


def test_the_document_measure_is_a_targets_option(corpus):
    from infusion_audit.text.pipeline import TextPipeline

    config = from_sections({"pipeline": {"dataset": {"name": "animal-stories", "params": {"n_train": 48, "n_test": 60}},
                                         "model": {"name": "tiny-gpt-neo", "params": {"hidden": 16, "layers": 1}}},
                            "attack": {"targets": {"pairs": [["cat", "dog"]], "measure": "document", "probes": 3},
                                       "budget": {"tokens": 0.08}}})
    pipeline = Pipeline.from_config(config.pipeline)
    assert isinstance(pipeline, TextPipeline) and config.attack.budget.tokens == 0.08
    t = config.attack.targets
    (target,) = pipeline.targets(t.n, t.rule, t.seed, t.pairs, t.probes, t.measure)
    assert target.as_dict()["measure"] == "document" and "measure" not in WordPairTarget("cat", "dog").as_dict()
    behaviour = pipeline.behaviour(target, t.probes).behaviour
    expected = document_word_preference(pipeline.data.test, "cat", "dog", max_documents=3)
    assert behaviour.documents == expected.documents and behaviour.positions == expected.positions
    for bad in ({"targets": {"measure": "sentence"}}, {"budget": {"tokens": 1.5}}, {"budget": {"tokens": 0}}):
        with pytest.raises(ConfigError, match="attack.(targets.measure|budget.tokens)"):
            from_sections({"attack": bad})
    with pytest.raises(UserError, match="measure name text behaviours"):
        Pipeline.from_config(load_config("digits").pipeline).targets(1, measure="document")


# --------------------------------------------------------------------------- family edits and shares
class FixedDirection:
    progress = False

    def __init__(self, model, train, v):
        self.model, self.train, self.v = model, train, v
        self.scores = influence_scores(model, train, v, loss_fn=lm_loss)

    def budget_k(self, k):
        return k

    def query(self, target, curvature):
        return self.v

    def select(self, target, k, rule, seed, curvature):
        return np.sort(np.argsort(self.scores, kind="stable")[:k])


@pytest.fixture(scope="module")
def small(corpus, model):
    train = corpus.train.subset(np.arange(24))
    v = torch.randn(num_trainable(model), generator=torch.Generator().manual_seed(1))
    return FixedDirection(model, train, v)


@pytest.mark.parametrize("optimizer", ["gcg", "relaxed"])
def test_family_edits_touch_only_family_words_and_write_only_family_words(small, optimizer):
    train, vocab = small.train, small.train.vocab
    family = {word_token(vocab, w) for w in ANIMALS}
    attack = TokenInfusion(k=6, tokens=0.03, steps=3, candidates=16, top_k=3, optimizer=optimizer, words=ANIMALS)
    poisoning = attack.craft(small, None)
    edited = poisoning.apply(train)
    changed = edited.ids != train.ids
    assert changed.any()
    assert np.isin(train.ids[changed], list(family)).all() and np.isin(edited.ids[changed], list(family)).all()
    budget = attack.budgets(train.lengths[poisoning.indices])
    np.testing.assert_array_equal(budget, np.maximum(1, np.round(0.03 * train.lengths[poisoning.indices])))
    assert (poisoning.tokens_changed(train) <= budget).all()
    random = RandomTokens(seed=0, words=ANIMALS).craft(small, None, like=poisoning)
    np.testing.assert_array_equal(random.indices, poisoning.indices)
    np.testing.assert_array_equal(random.tokens_changed(train), poisoning.tokens_changed(train))
    moved = random.apply(train).ids != train.ids
    assert np.isin(train.ids[moved], list(family)).all() and np.isin(random.apply(train).ids[moved], list(family)).all()


def test_a_share_budget_scales_with_each_document_and_bad_shares_fail():
    attack = TokenInfusion(tokens=0.08)
    np.testing.assert_array_equal(attack.budgets(np.array([10, 100, 200, 250])), [1, 8, 16, 20])
    np.testing.assert_array_equal(TokenInfusion(tokens=3).budgets(np.array([10, 200])), [3, 3])
    for bad in (0, -1, 1.5):
        with pytest.raises(UserError, match="tokens"):
            TokenInfusion(tokens=bad)
    with pytest.raises(UserError, match="two different words"):
        TokenInfusion(words=["cat"])


def test_a_bench_on_animal_stories_under_the_segment_protocol(tmp_path):
    """The option end to end: the attacker edits only documents the segment sees, a share of each one's tokens
    (the budget's), within the animal family, with the adam curvature and the document measure; the clean control
    is the trained model; the defence replays what is left."""
    from infusion_audit import bench
    from infusion_audit.io import read_jsonl

    config = {
        "pipeline": {"dataset": {"name": "animal-stories", "params": {"n_train": 64, "n_test": 24}},
                     "model": {"name": "tiny-gpt-neo", "params": {"hidden": 16, "layers": 1, "heads": 2}},
                     "train": {"optimizer": "adam", "lr": 0.005, "adam_betas": [0.9, 0.95], "batch_size": 8,
                               "epochs": 2}},
        "attack": {"attacks": [{"name": "infusion-text", "params": {"steps": 2, "words": list(ANIMALS),
                                                                     "curvature": "adam"}},
                               {"name": "random-tokens", "params": {"words": list(ANIMALS)}}],
                   "protocol": {"kind": "segment", "steps": 3},
                   "budget": {"k": 0.25, "tokens": 0.05},
                   "targets": {"pairs": [["cat", "dog"]], "probes": 4, "measure": "document"}},
        "influence": {"backend": "ekfac", "damping": 0.01},
        "scan": {"detectors": [{"name": "token-diff"}], "attacks": ["infusion-text"], "bootstrap": 0}}
    bench(config, tmp_path, progress=False)
    records = read_jsonl(tmp_path / "results.jsonl")
    attacks = {r["attack"]: r for r in records if r["kind"] == "attack"}
    pipeline = Pipeline.from_config(from_dict(PipelineConfig, config["pipeline"], "<test>", "pipeline"))
    seen = set(np.random.default_rng(0).permutation(64)[(8 - 3) * 8:].tolist())  # the last 3 of 8 batches
    for record in attacks.values():
        assert record["budget"]["k"] <= 6 and set(record["poisoned_indices"]) <= seen  # 25% of the 24 it sees
        assert record["p_control"] == pytest.approx(record["p_before"], abs=1e-12)  # the clean replay is the model
        assert record["target"]["measure"] == "document" and record["budget"]["tokens"] == 0.05
    assert attacks["infusion-text"]["norms"]["tokens_changed_max"] <= round(0.05 * pipeline.data.train.max_length)
    assert [r["detector"] for r in records if r["kind"] == "defence"] == ["token-diff"]
    assert attacks["infusion-text"]["variant"] == "gcg, adam"


def test_the_segment_restores_the_random_state_so_dropout_replays_exactly(tmp_path):
    class WithDropout(Pipeline):
        def new_model(self):
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))

    config = from_dict(PipelineConfig, {"train": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 64}},
                       "<test>", "pipeline")
    pipeline = WithDropout(config)
    segment = Segment(pipeline, train_pipeline(pipeline, tmp_path, progress=False), steps=5)
    assert segment.check() == 0.0
    segment.start().meta.pop("rng")  # the same replay from the epoch's first random state drifts
    assert segment.check() > 0.0
