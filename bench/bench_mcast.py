"""Multicast vs unicast image delivery: prints the scaling curve (never asserts on time).

A head namespace with a bridge (its egress limited with tc to --rate, the head's one link) and
N receiver namespaces on it. For each N: one ql-mcastd session (udp-sender) delivering the image
to N ql-mcast-clients, and N parallel HTTP downloads from nginx with the generated config. Wall
time and the bytes the head sent (tx of its bridge, `ip -s link`).

Run as root: .venv/bin/python bench/bench_mcast.py [--size-mb 100] [--rate 1000mbit] [--n 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from qlimage import contract  # noqa: E402
from qlimage.layout import Layout  # noqa: E402
from qlimage.serve import head  # noqa: E402
from qlimage.site import load_site  # noqa: E402

from helpers import write_site  # noqa: E402

HEAD = "10.0.2.2"  # the test site's head address
CLIENT = REPO / "qlimage/node/initrd/ql-mcast-client"
GEN = "0123456789abcdef"
LIMIT = 600.0  # seconds for any one run


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def tx_bytes(ns: str) -> int:
    return int(
        json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", "br0"))[0]["stats64"]["tx"][
            "bytes"
        ]
    )


def make_bed(tag: str, n: int, rate: str) -> tuple[str, list[str]]:
    hns, nodes = f"qlb-{tag}-h", [f"qlb-{tag}-{i}" for i in range(n)]
    sh("ip", "netns", "add", hns)
    sh("ip", "-n", hns, "link", "set", "lo", "up")
    sh("ip", "-n", hns, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", hns, "addr", "add", f"{HEAD}/24", "brd", "+", "dev", "br0")
    sh("ip", "-n", hns, "link", "set", "br0", "up")
    sh("ip", "-n", hns, "route", "add", "224.0.0.0/4", "dev", "br0")
    sh(
        "ip",
        "netns",
        "exec",
        hns,
        "tc",
        "qdisc",
        "add",
        "dev",
        "br0",
        "root",
        "tbf",
        "rate",
        rate,
        "burst",
        "1mb",
        "latency",
        "100ms",
    )
    for i, ns in enumerate(nodes):
        sh("ip", "netns", "add", ns)
        veth = f"qlb{tag}{i}"
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "netns", hns)
        sh("ip", "-n", hns, "link", "set", veth, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"10.0.2.{100 + i}/24", "brd", "+", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    return hns, nodes


def run_all(cmds: list[list[str]]) -> float:
    start = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cmds]
    for p in procs:
        out, _ = p.communicate(timeout=LIMIT)
        if p.returncode != 0:
            raise SystemExit(f"a receiver failed: {' '.join(p.args)}: {out.decode()[-300:]}")
    return time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mb", type=int, default=100)
    p.add_argument("--rate", default="1000mbit", help="tc limit of the head's bridge")
    p.add_argument("--bitrate", default="900m", help="udp-sender --max-bitrate")
    p.add_argument("--n", default="1,2,4,8,16")
    args = p.parse_args()
    counts = [int(x) for x in args.n.split(",")]
    with tempfile.TemporaryDirectory(prefix="qlbench.") as tmp:
        os.chmod(tmp, 0o755)  # nginx workers (www-data) read the image
        root = write_site(Path(tmp, "site"))
        toml = root / "site.toml"
        toml.write_text(
            toml.read_text().replace("[head]\n", '[head]\nadmin_networks = ["10.0.2.0/24"]\n', 1)
            + f'\n[multicast]\nwindow = 2\nmax_bitrate = "{args.bitrate}"\n'
        )
        site = load_site(root)
        layout = Layout(site)
        head.write_configs(head.configs(site))
        layout.head_run.mkdir(parents=True, exist_ok=True)
        gen = layout.image_root("demo") / GEN
        gen.mkdir(parents=True)
        (gen / contract.GENERATION).write_text(GEN + "\n")
        with open(gen / contract.image_file("demo"), "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(2**20))
        url = (
            f"{site.http_base}/{contract.QLUSTAR_DIR}/{contract.image_path('demo')}/{GEN}/demo.img"
        )
        tag = uuid.uuid4().hex[:5]
        hns, nodes = make_bed(tag, max(counts), args.rate)
        out = Path(tmp, "out")
        out.mkdir()
        try:
            nginx = subprocess.Popen(
                ["ip", "netns", "exec", hns, *head.nginx_args(layout), "-g", "daemon off;"]
            )
            mcastd = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    hns,
                    sys.executable,
                    "-m",
                    "qlimage.serve.mcastd",
                    "--config",
                    str(layout.head / "mcastd.json"),
                ],
                stderr=open(Path(tmp, "mcastd.log"), "w"),  # noqa: SIM115 (the daemon's log)
            )
            time.sleep(1.5)
            rows = []
            for n in counts:
                before = tx_bytes(hns)
                t_m = run_all(
                    [
                        [
                            "ip",
                            "netns",
                            "exec",
                            ns,
                            "/bin/busybox",
                            "sh",
                            str(CLIENT),
                            f"{HEAD}:5000",
                            "demo",
                            GEN,
                            str(out / f"m{i}"),
                        ]
                        for i, ns in enumerate(nodes[:n])
                    ]
                )
                b_m = tx_bytes(hns) - before
                before = tx_bytes(hns)
                t_h = run_all(
                    [
                        ["ip", "netns", "exec", ns, "curl", "-sf", "-o", str(out / f"h{i}"), url]
                        for i, ns in enumerate(nodes[:n])
                    ]
                )
                b_h = tx_bytes(hns) - before
                rows.append((n, t_m, b_m, t_h, b_h))
                for f in out.iterdir():
                    f.unlink()
            log = Path(tmp, "mcastd.log").read_text()
        finally:
            for proc in (nginx, mcastd):
                proc.terminate()
                proc.wait(timeout=20)
            for ns in [hns, *nodes]:
                subprocess.run(["ip", "netns", "del", ns], check=False)
    t1m, t1h = rows[0][1], rows[0][3]
    print(
        f"image {args.size_mb} MB, head link {args.rate}, udp-sender --max-bitrate {args.bitrate}, "
        "multicast join window 2 s (included in its time)"
    )
    print(
        f"{'N':>3} | {'mcast s':>8} {'T/T1':>5} {'head MB':>8} | "
        f"{'http s':>7} {'T/T1':>5} {'head MB':>8}"
    )
    for n, t_m, b_m, t_h, b_h in rows:
        print(
            f"{n:>3} | {t_m:8.2f} {t_m / t1m:5.2f} {b_m / 1e6:8.1f} | "
            f"{t_h:7.2f} {t_h / t1h:5.2f} {b_h / 1e6:8.1f}"
        )
    print("\nql-mcastd sessions:")
    print("\n".join(line for line in log.splitlines() if " session " in line))


if __name__ == "__main__":
    main()
