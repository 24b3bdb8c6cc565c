"""Zero-shot cloze scoring of a base model on every benchmark, with all three normalisations.

    python -m experiments.zero_shot --data-dir ../shared/data [--model smollm2-135m] [--resume]

One pass per split computes the summed continuation log-likelihoods
(``melora_pyro.scoring.choice_loglikelihoods``); the ``char`` and ``token`` normalisations divide
them by the lengths the packer reports, so the three columns come from one forward per question.
Validation splits (ARC, OBQA dev) are scored too: the default normalisation is chosen on them, never
on test. Writes ``<out>.json`` (every probability) and ``<out>.md`` (ACC / ECE / NLL / Brier with 95%
bootstrap CIs of ACC), rewritten after each split; ``--resume`` keeps finished splits. Each table
cell is also what ``melora-pyro train --method zero-shot --normalization N`` prints.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from melora_pyro import data
from melora_pyro._atomic import atomic_write_text
from melora_pyro.cloze import template_for
from melora_pyro.metrics import accuracy, bootstrap_ci, summarize
from melora_pyro.models import default_cache_dir, load_base_model
from melora_pyro.prefix_cache import PrefixCachedLM, cache_path
from melora_pyro.packing import pack_example
from melora_pyro.readouts import NORMALIZATIONS, ClozeReadout
from melora_pyro.scoring import choice_loglikelihoods

from . import out_file

SPLITS = (("arc-e", "validation"), ("arc-e", "test"), ("arc-c", "test"), ("obqa", "test"), ("wg-s", "test"),
          ("boolq", "test"), ("arc-c", "validation"), ("obqa", "validation"))


def score_split(lm, tokenizer, dataset: str, split: str, data_dir, max_length: int, batch_size: int) -> dict:
    examples = [data.without_repeated_choices(ex) for ex in data.load_examples(dataset, split, data_dir)]
    start = time.time()
    sums = choice_loglikelihoods(lm, tokenizer, examples, "sum", batch_size=batch_size, template=dataset,
                                 max_length=max_length, progress=True)
    packed = [pack_example(tokenizer, ex, template_for(dataset), max_length) for ex in examples]
    K = sums.shape[1]
    tokens = torch.tensor([list(p.choice_tokens) + [0] * (K - len(p.choice_tokens)) for p in packed])
    chars = torch.tensor([list(p.choice_chars) + [0] * (K - len(p.choice_chars)) for p in packed])
    labels = torch.tensor([ex.label for ex in examples])
    record = {"n": len(examples), "seconds": time.time() - start, "labels": labels.tolist(),
              "num_choices": [len(ex.choices) for ex in examples], "by_norm": {}}
    for norm in NORMALIZATIONS:
        probs = ClozeReadout(norm).normalize(sums, tokens, chars).softmax(-1)
        metrics = summarize(probs, labels)
        metrics["acc_ci"] = bootstrap_ci(accuracy, probs, labels)
        record["by_norm"][norm] = {"metrics": metrics, "probs": probs.tolist()}
    return record


def markdown(doc: dict) -> str:
    lines = [f"# Zero-shot cloze scoring: {doc['model']}", "",
             f"Command: `{doc['command']}`", "",
             "Context / continuation as lm-evaluation-harness's task YAMLs (README, section Scoring); "
             "`sum` = its `acc`, `char` = its `acc_norm`, `token` = per-token mean. 95% bootstrap CI of ACC "
             "(1,000 resamples of questions). WinoGrande is scored on its dev set (the BLoB protocol's test); "
             f"{data.BOOLQ_OFFLINE_NOTE}", "",
             "| dataset | split | n | norm | ACC (%) | ACC 95% CI | ECE (%) | NLL | Brier | chance (%) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, rec in doc["splits"].items():
        dataset, split = key.split("/")
        chance = float((1.0 / torch.tensor(rec["num_choices"], dtype=torch.float)).mean())
        for norm, cell in rec["by_norm"].items():
            m = cell["metrics"]
            lo, hi = m["acc_ci"]
            lines.append(f"| {dataset} | {split} | {rec['n']} | {norm} | {100 * m['acc']:.1f} | "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {100 * m['ece']:.1f} | {m['nll']:.4f} | "
                         f"{m['brier']:.4f} | {100 * chance:.1f} |")
    seconds = sum(r["seconds"] for r in doc["splits"].values())
    lines += ["", f"Scoring time: {seconds / 60:.1f} min on this machine ({doc['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", default="results/zero_shot_cloze")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--splits", nargs="+", default=[f"{d}/{s}" for d, s in SPLITS],
                        help="dataset/split pairs, e.g. arc-e/test")
    parser.add_argument("--machine", default="2 CPU cores")
    parser.add_argument("--cache-top-layers", type=int, default=2,
                        help="keep the states below the top N decoder layers in the shared on-disk prefix cache "
                             "(the one `melora-pyro train --adapt-top-layers N` reads), 0: no cache")
    parser.add_argument("--resume", action="store_true", help="keep the splits already in <out>.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    command = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    doc = {"model": args.model, "command": f"python -m experiments.zero_shot {command}",
           "machine": args.machine, "splits": {}}
    if args.resume and out_file(out, ".json").is_file():
        doc["splits"] = json.loads(out_file(out, ".json").read_text())["splits"]
    lm, tokenizer = load_base_model(args.model)
    cache_file = None
    if args.cache_top_layers:
        split = lm.config.num_hidden_layers - args.cache_top_layers
        lm = PrefixCachedLM(lm, split)
        cache_file = cache_path(default_cache_dir(), args.model, "float32", split)
        lm.load(cache_file)
    for key in args.splits:
        if key in doc["splits"]:
            continue
        dataset, split = key.split("/")
        print(f"{key} ...", flush=True)
        doc["splits"][key] = score_split(lm, tokenizer, dataset, split, args.data_dir, args.max_length,
                                         args.batch_size)
        if cache_file is not None:
            lm.save(cache_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_file(out, ".json"), json.dumps(doc))
        atomic_write_text(out_file(out, ".md"), markdown(doc))
        print({n: round(c["metrics"]["acc"], 4) for n, c in doc["splits"][key]["by_norm"].items()}, flush=True)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
