"""Head-node scale benchmark (issue 13). Prints figures and ratios against the goals, asserts
nothing.

  1. no-op `qlimage build` on bench_pipeline's site (10 images) at 1,000 / 5,000 / 10,000 /
     20,000 nodes (goals: <= 0.2 s at 1,000, <= 0.3 s at 10,000); one site grows between the
     points, so each point costs only the new nodes' bundles
  2. one node edited at 10,000 nodes (renamed, address changed, option changed): the build's
     time, best of three (goal <= 0.5 s), and which tasks it ran (goal: that node's bundle,
     and the link and config files that name it)

Run: .venv/bin/python bench/bench_scale.py [--nodes 1000 5000 10000 20000] [--edit-at 10000]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import ENV, write_site

IMAGES = 10
NOOP_GOALS = {1000: 0.2, 10000: 0.3}
EDIT_GOAL = 0.5
# Each one-node edit is timed this many times (an odd number: the edit stays), as the no-op is
# timed five times: one build on a shared machine varies by a tenth of a second.
EDIT_RUNS = 3
# A build may stamp only inputs older than this margin (qlimage.tasks.stamp.MARGIN_NS).
MARGIN = 2.1


def qlimage_build(root: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "qlimage", "-C", str(root), "build"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    took = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"build failed:\n{proc.stdout[-2000:]}\n{proc.stderr}")
    return took, proc.stdout


def executed(out: str) -> list[str]:
    return re.findall(r"^\.  (\S+)", out, re.M)


def noop_time(root: Path, runs: int = 5) -> float:
    """Best of `runs` no-op builds, after the build that stamps the site."""
    time.sleep(MARGIN)
    qlimage_build(root)
    times = []
    for _ in range(runs):
        took, out = qlimage_build(root)
        if executed(out):
            raise SystemExit(f"a no-op build ran tasks: {executed(out)}")
        times.append(took)
    return min(times)


def goal_note(took: float, goal: float | None) -> str:
    return f"goal <= {goal:.1f} s, {took / goal:.2f} of it" if goal else ""


def edit_nodes(root: Path, old: str, new: str) -> None:
    path = root / "nodes.d/cluster.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def one_node_edits(root: Path) -> None:
    """Rename, readdress and reconfigure node n0007: time and tasks of each build."""
    edits = [
        ("rename", 'name = "n0007"', 'name = "r0007"'),
        ("address change", '"10.0.1.7"', '"10.0.200.7"'),
        (
            "option change",
            'name = "r0007"',
            'name = "r0007"\noptions.opensm = true',
        ),
    ]
    print(f"one node edited (best of {EDIT_RUNS}: the edit, its undo, the edit again):")
    for what, old, new in edits:
        times, tasks = [], []
        for run in range(EDIT_RUNS):
            time.sleep(MARGIN)  # so that the build before may stamp: the edit's build trusts it
            qlimage_build(root)
            edit_nodes(root, *((old, new) if run % 2 == 0 else (new, old)))
            took, out = qlimage_build(root)
            times.append(took)
            tasks = tasks or executed(out)
        took = min(times)
        each = " ".join(f"{t:.2f}" for t in times)
        print(f"  {what:<15} {took:7.2f} s   ({goal_note(took, EDIT_GOAL)}; runs: {each})")
        print(f"  {'':<15} ran: {' '.join(sorted(tasks))}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    ap.add_argument("--edit-at", type=int, default=10000)
    args = ap.parse_args()
    counts = sorted(args.nodes)
    with tempfile.TemporaryDirectory(prefix="qlimage-scale.") as tmp:
        root = Path(tmp) / "site"
        write_site(root, IMAGES, counts[0])
        took, _ = qlimage_build(root)
        print(f"site: {IMAGES} images; first full build at {counts[0]} nodes: {took:.1f} s")
        print("no-op build:")
        for n in counts:
            nodes_file = root / "nodes.d/cluster.toml"
            grown = root.parent / "grown"
            write_site(grown, IMAGES, n)
            nodes_file.write_text((grown / "nodes.d/cluster.toml").read_text())
            subprocess.run(["rm", "-rf", str(grown)], check=True)
            grow, _ = qlimage_build(root)
            noop = noop_time(root)
            print(
                f"  {n:6d} nodes  {noop:6.3f} s   {goal_note(noop, NOOP_GOALS.get(n))}"
                f"   (growing to it: {grow:.1f} s)",
                flush=True,
            )
            if n == args.edit_at:
                one_node_edits(root)
                edit_nodes(root, 'name = "r0007"\noptions.opensm = true', 'name = "n0007"')
                edit_nodes(root, '"10.0.200.7"', '"10.0.1.7"')


if __name__ == "__main__":
    main()
