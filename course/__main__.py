"""python -m course status | checks | report"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from course import check
from course.status import TASKS, format_status, status

CHECKS = tuple(c for _, checks in TASKS.values() for c in checks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m course", description="Course progress and self-checks")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="which tasks are done, from your data dir, run dir and self-check log")
    s.add_argument("--data_dir", default="data/builtin-8k", help="your data dir (task 1)")
    s.add_argument("--out_dir", default="out/my_run", help="the run dir your own loop wrote (tasks 4 and 5)")
    s.add_argument("--target_tokens", type=int, default=1_000_000,
                   help="tokens the data dir must hold (the GPU project's target is 100000000)")
    s.add_argument("--log", default=None, help="self-check log (default: $COURSE_LOG or out/course/checks.jsonl)")
    s.add_argument("--config", default="configs/my_run.yaml", help="your week-18 config (task 3)")
    s.add_argument("--bench_dir", default="out/bench",
                   help="where your `python -m efficient_training.bench` run wrote bench_*.json (task 3; the "
                        "committed efficient_training/bench_results/ is the course's recorded run, not yours)")
    s.add_argument("--device", default="auto", help="where task 4's validation loss is recomputed: auto | cpu | cuda")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--require_all", action="store_true", help="exit with 1 unless all five tasks are done")
    sub.add_parser("checks", help="list the self-checks and what each expects of your function")
    r = sub.add_parser("report", help="write RUN/report.md: curves, metrics vs baselines, samples, config")
    r.add_argument("--out_dir", default="out/tiny", help="the run dir to report on")
    a = p.parse_args(argv)
    if a.cmd == "status":
        rows = status(a.data_dir, a.out_dir, a.target_tokens, a.log, a.config, a.bench_dir, a.device)
        print(json.dumps(rows, indent=2) if a.json else format_status(rows, a.log))
        return 1 if a.require_all and not all(r["done"] for r in rows) else 0
    if a.cmd == "report":
        from course.report import ReportError, write_report
        from course.status import resolve

        try:
            print(f"wrote {write_report(resolve(a.out_dir))}")
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    for name in CHECKS:
        fn = getattr(check, name, None)
        if fn is None:
            print(f"check.{name}: not available yet")
            continue
        doc = inspect.getdoc(fn) or ""
        print(f"check.{name}: " + doc.replace("\n", "\n    ") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
