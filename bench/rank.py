"""Does the advisor's ranking of sources hold? Scores on the train split against what a job reaches.

    python bench/rank.py [--targets digits-writer,textures,fashion] [--per-class 100] [--seeds 0]
                         [--out bench/results/rank.json]

Sources of really different quality for every target, each with its own preprocessing at the
recipe's size: EfficientNet-Lite0, Lite1, Lite2 (ImageNet), Lite0 from random weights, and Lite0
fully fine-tuned on another offline domain (`--domain`, fashion for the digits, digits otherwise).
Scores (models/transfer/transferability.py, models/transfer/logme.py) on the train split's pooled embedding: LogME,
SFDA (PCA to `scoring_dims`), k-NN cross-validated, and their mean rank (what the advisor ranks by).
Ground truth: the test accuracy a default job (`strategy: auto`, training/auto.py) reaches from
each source on the same splits. τw (weighted Kendall) per target and seed, and the mean.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.transfer import HOME, embeddings, predict, prepare_case  # noqa: E402  (sets a private BENTOML_HOME)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.transfer_data import load_target  # noqa: E402
from models.transfer.logme import logme  # noqa: E402
from models.transfer.transferability import knn_cv_score, rank_by_agreement, reduce, scoring_dims, sfda, weighted_kendall_tau  # noqa: E402
from training.auto import run_auto  # noqa: E402
from training.train import train  # noqa: E402

LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
DOMAIN_EPOCHS = 3


def domain_weights(domain: str, seed: int) -> Path:
    """Lite0 fully fine-tuned on another domain (100 images per class), saved as a state-dict file."""
    path = HOME / f"lite0-{domain}.pt"
    if path.is_file():
        return path
    root = Path(tempfile.mkdtemp(dir=HOME))
    config, splits, labels = prepare_case(load_target(domain, 100, seed), seed, root, "efficientnet_lite0")
    result = train(config.replace(strategy="full", epochs=DOMAIN_EPOCHS), splits, labels)
    torch.save(result.built.model.classifier.body.state_dict(), path)
    return path


def sources(domain_file: Path) -> dict[str, dict]:
    choices = {name: {"source": name} for name in LITES}
    choices["lite0-scratch"] = {"source": "efficientnet_lite0", "weights": "none"}
    choices[f"lite0-{domain_file.stem.split('-', 1)[1]}"] = {"source": "efficientnet_lite0", "weights": str(domain_file)}
    return choices


def score_source(config, splits, labels) -> dict[str, float]:
    train = splits["train"] + splits["val"]
    features = embeddings(config, labels, train).astype(np.float64)
    y = np.array([labels.index(s.label) for s in train])
    reduced = reduce(features, scoring_dims(len(y), len(labels)))
    return {"logme": float(logme(features, y)), "sfda": float(sfda(reduced, y)), "knn": float(knn_cv_score(features, y))}


def run_target(name: str, per_class: int, seed: int, domain: str) -> dict:
    target = load_target(name, per_class, seed)
    root = Path(tempfile.mkdtemp(dir=HOME))
    base, splits, labels = prepare_case(target, seed, root, "efficientnet_lite0")
    test_y = np.array([labels.index(s.label) for s in splits["test"]])
    scores, truth, seconds = {}, {}, {}
    for source, fields in sources(domain_weights(domain, seed)).items():
        config = base.replace(**fields, output_dir=str(root / source))
        started = time.monotonic()
        scores[source] = score_source(config, splits, labels)
        seconds[source] = {"advisor": time.monotonic() - started}
        started = time.monotonic()
        result = run_auto(config, splits, labels)
        truth[source] = float((predict(result.built.model, splits["test"], labels, result.built.preprocessing) == test_y).mean())
        seconds[source]["job"] = time.monotonic() - started
        print(json.dumps({"target": name, "seed": seed, "source": source, **scores[source], "truth": truth[source],
                          "chosen": result.strategy, **seconds[source]}), flush=True)
    methods = {m: {s: scores[s][m] for s in scores} for m in ("logme", "sfda", "knn")}
    agreement = {source: -rank for source, rank in rank_by_agreement(methods)}
    taus = {m: weighted_kendall_tau(v, truth) for m, v in {**methods, "mean-rank": agreement}.items()}
    return {"target": name, "seed": seed, "scores": scores, "truth": truth, "tau_w": taus, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="digits-writer,textures,fashion")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    runs = []
    for name in args.targets.split(","):
        domain = "fashion" if name.startswith("digits") else "digits-writer"
        for seed in (int(s) for s in args.seeds.split(",")):
            runs.append(run_target(name, args.per_class, seed, domain))
            print(json.dumps({"target": name, "seed": seed, "tau_w": runs[-1]["tau_w"]}), flush=True)
    methods = runs[0]["tau_w"].keys() if runs else []
    mean = {m: float(np.mean([r["tau_w"][m] for r in runs])) for m in methods}
    spread = {m: float(np.std([r["tau_w"][m] for r in runs])) for m in methods}
    print(json.dumps({"mean_tau_w": mean, "std_tau_w": spread, "loadavg": os.getloadavg()}))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "mean_tau_w": mean, "std_tau_w": spread,
                                              "loadavg_end": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
