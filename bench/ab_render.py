"""A/B of the dispatch scenario (3: provider 0 ms, batch 500, 1,000 in flight) between two source trees on one stack.

`python -m bench.ab_render --old /path/to/old/checkout --runs 3 --backlog 30000`: one PostgreSQL and API (this tree's
schema), then alternately a worker from the old tree and one from this tree drains the same size of backlog; runs
alternate so that a noisy shared machine disturbs both sides alike. Used for docs/benchmarks.md, "Render isolation".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.run import ROOT, Stack, backlog, drain, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--old", required=True, help="a checkout of the code before the change")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=30_000)
    args = parser.parse_args()
    stack = Stack(Path(tempfile.mkdtemp(prefix="dispatcher-ab-")))
    trees = {"old": Path(args.old).resolve(), "new": ROOT}
    results: dict[str, list[dict]] = {"old": [], "new": []}

    def start_worker(tree: Path, **env: str) -> subprocess.Popen[bytes]:
        environment = stack.env(**env)
        environment["PYTHONPATH"] = str(tree)
        stack.worker = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "worker"],
            env=environment,
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=(stack.work / "worker.log").open("ab"),
        )
        return stack.worker

    try:
        stack.start_api()
        for run in range(args.runs):
            for side in ("old", "new") if run % 2 == 0 else ("new", "old"):
                backlog(stack, args.backlog, f"ab{run}{side}-")
                stack.start_worker = lambda tree=trees[side], **env: start_worker(tree, **env)  # type: ignore[method-assign]
                out = drain(stack, args.backlog, DISPATCHER_BATCH_SIZE="500", DISPATCHER_MAX_IN_FLIGHT="1000")
                results[side].append(out)
                log(f"run {run} {side}: {out}")
    finally:
        stack.close()
    summary = {
        side: {
            "per_s": [r["per_s"] for r in rs],
            "median_per_s": statistics.median(r["per_s"] for r in rs),
            "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in rs),
        }
        for side, rs in results.items()
    }
    summary["ratio_new_over_old"] = round(summary["new"]["median_per_s"] / summary["old"]["median_per_s"], 3)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
