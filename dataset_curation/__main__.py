"""Command line: build a data dir, or merge the outputs of sharded build jobs.

    python -m dataset_curation build --recipe builtin --out data/builtin-8k
    python -m dataset_curation build --recipe installed --out data/installed-32k --vocab_size 32000
    python -m dataset_curation build --recipe files --input my_texts/ --out data/mine --vocab_size 4096
    python -m dataset_curation build --recipe builtin --out data/big --shard 0/4      # one of 4 jobs
    python -m dataset_curation merge --out data/big --num_shards 4                    # after all 4 finished
    python -m dataset_curation build ... --set threshold=0.8 --set min_words=20      # any stage parameter
"""

from __future__ import annotations

import argparse
import ast
import sys

from dataset_curation.pipeline import RECIPES, CurationError, build, merge
from dataset_curation.sources import SourceError


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataset_curation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("build", "merge"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="data dir to write (data/NAME)")
        p.add_argument("--vocab_size", type=int, default=8192)
        p.add_argument("--num_proc", type=int, default=2)
        p.add_argument("--target_tokens", type=int, default=None)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a stage parameter, e.g. threshold=0.8, val_fraction=0.02, min_words=20")
        p.add_argument("--quiet", action="store_true")
        if name == "build":
            p.add_argument("--recipe", choices=RECIPES, default="builtin")
            p.add_argument("--input", default=None, help="files recipe: a .txt/.jsonl/.parquet file or a folder")
            p.add_argument("--max_files", type=int, default=None, help="builtin recipe: read only the first N files")
            p.add_argument("--shard", default=None, help="i/N: run job i of N (then `merge`)")
        else:
            p.add_argument("--num_shards", type=int, required=True)
    args = ap.parse_args(argv)
    params = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        params[k.strip()] = _value(v.strip())
    common = dict(vocab_size=args.vocab_size, num_proc=args.num_proc, target_tokens=args.target_tokens,
                  progress=not args.quiet)
    try:
        if args.command == "build":
            if args.input is not None:
                params["input"] = args.input
            if args.max_files is not None:
                params["max_files"] = args.max_files
            path = build(args.recipe, args.out, shard=args.shard, **common, **params)
        else:
            path = merge(args.out, args.num_shards, **common, **params)
    except (CurationError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
