"""The paper's word-preference experiment on `animal-stories`: which attack moves "B where the model says A"?

Trains the pipeline (cached), replays only the last `--segment-steps` steps of training from a checkpoint that
holds Adam's moments (the paper's protocol, `infusion_audit.segment`), and for each ordered pair of animals
(A, B) crafts every arm on documents of that segment, replays the segment on the edited corpus and measures
Δf per probe against the clean replay (which equals the trained model). f is the paper's: every occurrence
of A in validation stories holding A at least 5 times, log p(B) - log p(A) there
(`infusion_audit.text.word_family`).

Arms (`--arms`):
  infusion        infusion-text with `--optimizer` (relaxed: the paper's; gcg), `--selection`, `--objective`,
                  `--curvature` (adam: the victim's Adam moments at the segment's start; influence: EK-FAC),
                  budget `--tokens` (a share of each document's tokens, the paper's ~8%) in `--k` documents
  random          random-tokens: Infusion's documents and per-document token counts, random tokens at random
                  positions (`--random-seeds` seeds, paired with Infusion by their mean)
  infusion-family infusion-text restricted to the animal words (only positions holding an animal change, and
                  only to another animal); random-family: its documents and counts, random animals at random
                  animal positions; random-any: its documents and counts, random tokens anywhere
  rename          the natural edit, no gradient: the k segment stories with the most A's, every A renamed B
                  (within the same token budget)
  probe           probe insertion: the probe stories with B for every A, in place of the k most-negative
                  segment documents
Prints per arm the mean Δf per probe [95% CI], paired comparisons (mean difference [CI], wins/n, Wilcoxon p),
flip rates, tokens changed and each edit's change in the edited document's loss (how unnatural it is), and
the "when does it work" correlations (Δf against the prior log-odds of B vs A at the probes and against
log count of B, Spearman with a bootstrap CI). Results: OUT/results.jsonl (one line per pair and arm,
resumable) and OUT/summary.json. Usage, from the repository root:

    python benchmarks/wordpref_family.py --out /tmp/wf --pairs 4 --arms infusion random probe
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from infusion_audit.attacks.base import AttackContext
from infusion_audit.attacks.text import ProbeInsertionText, RandomTokens, TextPoisoning, TokenInfusion
from infusion_audit.config import InfluenceConfig, PipelineConfig, from_dict, load_config
from infusion_audit.io import append_jsonl, read_jsonl, stable_hash, write_json
from infusion_audit.pipeline import Pipeline, train_pipeline
from infusion_audit.runtime import configure
from infusion_audit.segment import Segment
from infusion_audit.statistics import bootstrap_ci, mean_ci, paired_test
from infusion_audit.text.animal_stories import ANIMALS
from infusion_audit.text.behaviours import WordPairTarget, word_token
from infusion_audit.text.models import document_losses
from infusion_audit.text.word_family import (DocumentWordPreference, document_word_preference, replace_words,
                                              word_counts)

PIPELINE = """
dataset: {name: animal-stories, params: {n_train: 2000, n_test: 400, seed: 0}}
model: {name: tiny-gpt-neo, params: {hidden: 64, layers: 2, heads: 4}}
train: {optimizer: adam, lr: 0.002, adam_betas: [0.9, 0.95], batch_size: 16, epochs: 8, seed: 0, order: fixed}
"""


class SegmentContext(AttackContext):
    """An attack context whose training set is the segment's documents (selection, influence, IHVP all on them,
    as the paper's retrain sees only them) and whose behaviour is the driver's whole-document f."""

    def __init__(self, pipeline, trained, documents: np.ndarray, make_behaviour, **kw):
        self._segment = pipeline.data.train.subset(documents)
        super().__init__(pipeline, trained, **kw)
        self._make_behaviour = make_behaviour

    @property
    def train(self):
        return self._segment

    def behaviour(self, target):
        if target not in self._behaviours:
            self._behaviours[target] = self._make_behaviour(target)
        return self._behaviours[target]


def default_pairs(n: int | None) -> list[tuple[str, str]]:
    """The ordered animal pairs in a seeded order (the first n spread over how common A and B are)."""
    pairs = [(a, b) for a in ANIMALS for b in ANIMALS if a != b]
    order = np.random.default_rng(0).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    return pairs[:n] if n else pairs


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", type=Path, help="YAML with a `pipeline:` section (default: the module's)")
    parser.add_argument("--cache", type=Path, default=None, help="checkpoints and factors (default OUT/artefacts)")
    parser.add_argument("--segment-steps", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=4, help="the first N of default_pairs")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"), help="explicit pairs instead")
    parser.add_argument("--arms", nargs="+", default=["infusion", "random", "probe"])
    parser.add_argument("--k", type=int, default=8, help="documents edited, of the segment's")
    parser.add_argument("--tokens", type=float, default=0.08, help="share of each document's tokens (or a count)")
    parser.add_argument("--optimizer", default="relaxed", choices=["relaxed", "gcg"])
    parser.add_argument("--selection", default="most-negative")
    parser.add_argument("--objective", default="influence", choices=["influence", "cosine"])
    parser.add_argument("--curvature", default="adam", choices=["adam", "influence"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1.0, help="relaxed: step in probability mass")
    parser.add_argument("--entropy", type=float, default=0.5)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--probe-docs", type=int, default=8)
    parser.add_argument("--attack-probes", default="all", choices=["all", "first"],
                        help="the probes the attack's measurement (its IHVP) uses: every occurrence of A in the "
                             "probe stories (the paper's, as evaluated), or only first mentions, in --attack-docs stories")
    parser.add_argument("--attack-docs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarize", action="store_true", help="only summarise OUT/results.jsonl (every record)")
    args = parser.parse_args()
    if args.summarize:
        rows = [r for line in read_jsonl(args.out / "results.jsonl") for r in line["records"]]
        print_pairs(rows)
        print_summary(summarize(rows))
        return
    configure(threads=args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.out / "artefacts"

    if args.pipeline:
        pipeline_cfg = load_config(args.pipeline).pipeline
    else:
        pipeline_cfg = from_dict(PipelineConfig, yaml.safe_load(PIPELINE), "<wordpref_family>", "pipeline")
    t0 = time.perf_counter()
    pipeline = Pipeline.from_config(pipeline_cfg)
    trained = train_pipeline(pipeline, cache, progress=False)
    t_train = time.perf_counter() - t0
    final = trained.model()
    quality = pipeline.quality(final)
    t0 = time.perf_counter()
    segment = Segment(pipeline, trained, args.segment_steps)
    control = segment.retrain(pipeline.data.train)
    t_control = time.perf_counter() - t0
    drift = segment.check(control)
    train = pipeline.data.train
    print(f"trained in {t_train:.0f}s ({trained.metrics['train_seconds']:.0f}s when computed); {quality[0]} "
          f"{quality[1]:.4f}; segment {args.segment_steps} steps = {len(segment.documents)} documents; "
          f"clean replay {t_control:.1f}s, max |weight - trained| {drift:.2e}")

    counts = word_counts(train, ANIMALS)
    pairs = [tuple(p) for p in args.pair] if args.pair else default_pairs(args.pairs)
    behaviours = {}

    def make_behaviour(target):
        if target not in behaviours:
            behaviours[target] = document_word_preference(pipeline.data.test, target.word_a, target.word_b,
                                                          args.min_count, args.probe_docs)
        return behaviours[target]

    def attack_behaviour(target):
        if args.attack_probes == "all":
            return make_behaviour(target)
        wide = document_word_preference(pipeline.data.test, target.word_a, target.word_b, args.min_count,
                                        args.attack_docs)
        return DocumentWordPreference(wide.documents, [ps[:1] for ps in wide.positions], wide.token_a, wide.token_b,
                                      wide.pad_id)

    context = SegmentContext(pipeline, trained, segment.documents, attack_behaviour,
                             influence=InfluenceConfig(backend="ekfac", damping=args.damping), cache_dir=cache,
                             progress=False, retrain_start=segment.start)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "cache", "pairs", "pair", "arms", "threads", "summarize")}
    settings["pipeline"] = pipeline_cfg.identity()
    results_path = args.out / "results.jsonl"
    done = {r["key"]: r for r in read_jsonl(results_path)}
    rows = []
    seg_train = context.train
    tokens = int(args.tokens) if args.tokens >= 1 else args.tokens

    def infusion(words=None):
        return TokenInfusion(k=args.k, tokens=tokens, steps=args.steps, lr=args.lr, entropy=args.entropy,
                             selection=args.selection, seed=0, optimizer=args.optimizer, candidates=args.candidates,
                             top_k=args.top_k, objective=args.objective, words=words, curvature=args.curvature)

    for a, b in pairs:
        target = WordPairTarget(a, b)
        behaviour = make_behaviour(target)  # what is measured (the attack may ascend another probe set)
        with torch.no_grad():
            ctrl_logp = behaviour._next_logp(control).double()
            ctrl_probe = (ctrl_logp[:, behaviour.token_b] - ctrl_logp[:, behaviour.token_a]).numpy()
            ctrl_hits = ctrl_probe > 0
        first = behaviour.first
        crafted = {}

        def crafted_infusion(name):
            if name not in crafted:
                t = time.perf_counter()
                crafted[name] = (infusion(words=ANIMALS if name == "infusion-family" else None).craft(context, target),
                                 time.perf_counter() - t)
            return crafted[name]

        def arm_poisonings(name):
            """(label, poisoning, seconds) for an arm; poisonings index the segment's documents."""
            t = time.perf_counter()
            if name in ("infusion", "infusion-family"):
                return [(name, *crafted_infusion(name))]
            if name in ("random", "random-family", "random-any"):
                source = crafted_infusion("infusion" if name == "random" else "infusion-family")[0]
                out = []
                for s in range(args.random_seeds):
                    t = time.perf_counter()
                    r = RandomTokens(seed=s, words=ANIMALS if name == "random-family" else None)
                    out.append((f"{name}#{s}", r.craft(context, target, like=source), time.perf_counter() - t))
                return out
            if name == "probe":
                return [("probe", ProbeInsertionText(k=args.k).craft(context, target), time.perf_counter() - t)]
            if name == "rename":
                ta, tb = word_token(train.vocab, a), word_token(train.vocab, b)
                seg_counts = (seg_train.ids == ta).sum(1)
                index = np.sort(np.argsort(-seg_counts, kind="stable")[:args.k])
                index = index[seg_counts[index] > 0]
                budget = infusion().budgets(seg_train.lengths[index])
                ids = replace_words(seg_train, index, {ta: tb}, budget)
                p = TextPoisoning.from_dataset(seg_train, seg_train.with_documents(index, ids), index)
                return [("rename", p, time.perf_counter() - t)]
            raise SystemExit(f"unknown arm {name}")

        for name in args.arms:
            key = stable_hash({"settings": settings, "pair": [a, b], "arm": name})
            if key in done:
                rows.extend(done[key]["records"])
                continue
            records = []
            for label, poisoning, seconds in arm_poisonings(name):
                full = segment.documents[poisoning.indices]
                poisoned = train.with_documents(full, poisoning.x, poisoning.lengths)
                t = time.perf_counter()
                model = segment.retrain(poisoned)
                t_retrain = time.perf_counter() - t
                with torch.no_grad():
                    logp = behaviour._next_logp(model).double()
                    after = (logp[:, behaviour.token_b] - logp[:, behaviour.token_a]).numpy()
                    moved = (logp - ctrl_logp)[:, [behaviour.token_a, behaviour.token_b]].mean(0).tolist()
                    loss_change = 0.0  # an attack that improved no document edits none
                    if len(poisoning.indices):
                        clean_docs = seg_train.subset(poisoning.indices)
                        edited_docs = poisoning.apply(seg_train).subset(poisoning.indices)
                        loss_change = float((document_losses(final, edited_docs.batch(np.arange(len(edited_docs))))
                                             - document_losses(final, clean_docs.batch(np.arange(len(clean_docs)))))
                                            .mean())
                delta = after - ctrl_probe
                changed = poisoning.tokens_changed(seg_train)
                records.append({
                    "pair": [a, b], "arm": label, "delta_per_probe": float(delta.mean()),
                    "delta_f": float(delta.sum()), "delta_first": float(delta[first].mean()),
                    "delta_later": float(delta[~first].mean()) if (~first).any() else None,
                    "flip_rate": float(((after > 0) & ~ctrl_hits).mean()), "probes": int(len(delta)),
                    "delta_logp_a": moved[0], "delta_logp_b": moved[1],
                    "prior_logodds": float(ctrl_probe.mean()), "prior_first": float(ctrl_probe[first].mean()),
                    "count_a": counts[a], "count_b": counts[b], "k": int(len(poisoning.indices)),
                    "tokens_changed": float(changed.mean()) if len(changed) else 0.0,
                    "share_changed": float((changed / seg_train.lengths[poisoning.indices]).mean()) if len(changed) else 0.0,
                    "loss_change": loss_change,
                    "predicted_delta_f": poisoning.meta.get("predicted_delta_f"),
                    "craft_seconds": seconds, "retrain_seconds": t_retrain})
                print(f"{a}->{b} {label:<18} Δf/probe {delta.mean():+.4f} (first {delta[first].mean():+.3f}) "
                      f"flips {records[-1]['flip_rate']:.3f} tokens {records[-1]['tokens_changed']:.1f} "
                      f"loss +{records[-1]['loss_change']:.3f} craft {seconds:.0f}s retrain {t_retrain:.0f}s", flush=True)
            append_jsonl(results_path, {"key": key, "records": records})
            rows.extend(records)

    summary = summarize(rows)
    summary.update({"settings": settings, "quality": {"figure": quality[0], "value": quality[1]},
                    "train_seconds": trained.metrics["train_seconds"], "segment_documents": int(len(segment.documents)),
                    "replay_drift": drift})
    write_json(args.out / "summary.json", summary)
    print_summary(summary)


def per_pair(rows: list[dict], arm: str, metric: str = "delta_per_probe") -> dict[tuple, float]:
    """`metric` of an arm per pair (an arm's seeds averaged)."""
    out: dict[tuple, list] = {}
    for r in rows:
        if r["arm"].split("#")[0] == arm and r.get(metric) is not None:
            out.setdefault(tuple(r["pair"]), []).append(r[metric])
    return {p: float(np.mean(v)) for p, v in out.items()}


def summarize(rows: list[dict]) -> dict:
    arms = sorted({r["arm"].split("#")[0] for r in rows})
    table = {}
    for arm in arms:
        rs = [r for r in rows if r["arm"].split("#")[0] == arm]
        table[arm] = {"delta_per_probe": mean_ci([r["delta_per_probe"] for r in rs]),
                      "delta_first": mean_ci([r["delta_first"] for r in rs]),
                      "delta_later": mean_ci([r["delta_later"] for r in rs]),
                      "flip_rate": mean_ci([r["flip_rate"] for r in rs]),
                      "tokens_changed": mean_ci([r["tokens_changed"] for r in rs]),
                      "share_changed": mean_ci([r["share_changed"] for r in rs]),
                      "loss_change": mean_ci([r["loss_change"] for r in rs]),
                      "craft_seconds": mean_ci([r["craft_seconds"] for r in rs]),
                      "retrain_seconds": mean_ci([r["retrain_seconds"] for r in rs])}
    comparisons = []
    for metric in ("delta_per_probe", "delta_first"):
        for ref, other in [("infusion", "random"), ("infusion-family", "random-family"), ("infusion", "probe"),
                           ("infusion-family", "random"), ("infusion-family", "random-any"),
                           ("infusion-family", "probe"), ("infusion-family", "rename"),
                           ("rename", "random-family"), ("infusion", "rename"), ("infusion-family", "infusion")]:
            x, y = per_pair(rows, ref, metric), per_pair(rows, other, metric)
            shared = sorted(set(x) & set(y))
            if len(shared) >= 2:
                comparisons.append({"metric": metric, "arm": ref, "versus": other,
                                    **paired_test([x[p] for p in shared], [y[p] for p in shared])})
    when = {}
    for arm in ("infusion", "infusion-family", "rename", "probe"):
        d = per_pair(rows, arm)
        if len(d) < 4:
            continue
        pairs = sorted(d)
        first = {tuple(r["pair"]): r for r in rows if r["arm"].split("#")[0] == arm}
        delta = np.array([d[p] for p in pairs])
        prior = np.array([first[p]["prior_logodds"] for p in pairs])
        prior_first = np.array([first[p]["prior_first"] for p in pairs])
        log_b = np.log(np.array([first[p]["count_b"] for p in pairs], float))
        pearson = lambda x, y: float(np.corrcoef(x, y)[0, 1])  # noqa: E731
        when[arm] = {"n": len(pairs),
                     "spearman_prior": bootstrap_ci(spearman, prior, delta, n_boot=1000),
                     "pearson_prior": bootstrap_ci(pearson, prior, delta, n_boot=1000),
                     "spearman_prior_first": bootstrap_ci(spearman, prior_first, delta, n_boot=1000),
                     "spearman_log_count_b": bootstrap_ci(spearman, log_b, delta, n_boot=1000)}
    return {"arms": table, "comparisons": comparisons, "when": when}


def print_pairs(rows: list[dict]) -> None:
    """Per pair: the prior (all probes, first mentions), B's count, and each arm's Δf per probe (seed mean)."""
    arms = sorted({r["arm"].split("#")[0] for r in rows})
    by_arm = {arm: per_pair(rows, arm) for arm in arms}
    info = {tuple(r["pair"]): r for r in rows}
    print(f"{'pair':<14} {'prior':>7} {'prior@1st':>9} {'count B':>8} " + " ".join(f"{a:>15}" for a in arms))
    for pair in sorted(info, key=lambda p: info[p]["prior_logodds"]):
        r = info[pair]
        cells = " ".join(f"{by_arm[a][pair]:>+15.3f}" if pair in by_arm[a] else f"{'':>15}" for a in arms)
        print(f"{pair[0] + '->' + pair[1]:<14} {r['prior_logodds']:>+7.2f} {r['prior_first']:>+9.2f} "
              f"{r['count_b']:>8d} {cells}")


def _fmt(s: dict, digits: int = 3) -> str:
    if s.get("mean") is None:
        return "n/a"
    lo = "" if s.get("lo") is None else f" [{s['lo']:+.{digits}f}, {s['hi']:+.{digits}f}]"
    return f"{s['mean']:+.{digits}f}{lo} (n={s['n']})"


def _corr(s: dict) -> str:
    """A correlation with its bootstrap CI (none when no resample gave a finite value, e.g. a constant Δf)."""
    return f"{s['value']:+.2f}" + ("" if s["lo"] is None else f" [{s['lo']:+.2f}, {s['hi']:+.2f}]")


def print_summary(summary: dict) -> None:
    print(f"\n{'arm':<16} {'Δf per probe [95% CI]':<34} {'first mentions':<16} {'flips':<7} {'tokens':<7} "
          f"{'share':<6} {'doc loss +':<10}")
    for arm, r in summary["arms"].items():
        print(f"{arm:<16} {_fmt(r['delta_per_probe'], 4):<34} {r['delta_first']['mean']:<+16.4f} "
              f"{r['flip_rate']['mean']:<7.4f} {r['tokens_changed']['mean']:<7.1f} {r['share_changed']['mean']:<6.3f} "
              f"{r['loss_change']['mean']:<+10.3f}")
    for c in summary["comparisons"]:
        p = c["p_wilcoxon"]
        where = "" if c["metric"] == "delta_per_probe" else " [first mentions]"
        print(f"{c['arm']} - {c['versus']}{where}: {_fmt(c['diff'], 4)}, wins {c['wins']}/{c['n']}, "
              f"Wilcoxon p = {p:.2g}" if p is not None else f"{c['arm']} - {c['versus']}: no difference")
    for arm, w in summary["when"].items():
        parts = [f"{label} {_corr(w[key])}"
                 for key, label in (("spearman_prior", "Spearman(Δf, prior log-odds)"),
                                    ("pearson_prior", "Pearson"),
                                    ("spearman_prior_first", "Spearman(Δf, prior at first mentions)"),
                                    ("spearman_log_count_b", "Spearman(Δf, log count of B)")) if key in w]
        print(f"when does {arm} work (n={w['n']}): " + "; ".join(parts))


if __name__ == "__main__":
    main()
