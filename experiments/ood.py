"""Out-of-distribution calibration: train on OBQA, test on ARC-C, ARC-E, MMLU chemistry and physics.

    python -m experiments.ood --profile cpu-small

``--datasets`` lists the test sets (the training set is ``--train``, OBQA by default). With the
in-distribution OBQA test set included as a reference column ("obqa").
"""
from __future__ import annotations

from melora_pyro.methods import METHODS

from . import common

TESTS = ("obqa", "arc-c", "arc-e", "mmlu-chem", "mmlu-phys")
NAME = "ood"


def render(results: common.Results, train_name: str, tests, methods) -> list[str]:
    lines = common.markdown_header(f"Out-of-distribution results (trained on {train_name})", results)
    for test in tests:
        rows = {m: common.collect(results.doc["runs"], train_name, m, test) for m in methods}
        if not any(rows.values()):
            continue
        label = "in distribution" if test == train_name else "out of distribution"
        lines += [f"## {train_name} -> {test} ({label})", ""] + common.metric_table(rows) + [""]
        figure = common.reliability_figures(results, train_name, test, methods, f"{train_name}-to-{test}")
        if figure:
            lines += [f"![reliability {test}]({figure})", ""]
    return lines + common.timing_lines(results)


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], METHODS, TESTS, NAME)
    p.add_argument("--train", default="obqa", help="training set (default obqa)")
    args = p.parse_args(argv)
    profile, results, bases = common.setup(args, NAME)
    train = common.load_split(args.train, "train", args.data_dir, profile.train_limit)
    tests = {t: common.load_split(t, "test", args.data_dir, profile.test_limit) for t in args.datasets}
    everything = [train, *tests.values()]
    bases.warm([ex for examples in everything for ex in examples],
               common.task_collate(bases.tokenizer, profile, everything)[0])
    print(f"{args.train}: {len(train)} train; tests " + ", ".join(f"{t} {len(x)}" for t, x in tests.items()), flush=True)
    for seed in profile.seeds:
        for method in args.methods:
            key = f"{args.train}/{method}/{seed}"
            if results.has(key):
                continue
            record = common.run_method(method, train, tests, profile, seed, bases, log=lambda s: print(s, flush=True),
                                       options=dict(args.method_option))
            results.add(key, record)
            common.write_markdown(results, render(results, args.train, args.datasets, args.methods))
    path = common.write_markdown(results, render(results, args.train, args.datasets, args.methods))
    print(path.read_text(encoding="utf-8"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
