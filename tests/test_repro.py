"""`qlimage repro-check`: the tree comparer, the input copy, user errors and a real double build."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import pytest

from qlimage import cli
from qlimage.commands import repro_check
from qlimage.errors import QlimageError
from qlimage.site import load_site
from qlimage.tasks import repro

from helpers import REPO, write_site


def tree(root: Path, files: dict[str, str | bytes], modes: dict[str, int] | None = None) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str) and data.startswith("->"):
            os.symlink(data[2:].strip(), path)
        else:
            path.write_bytes(data.encode() if isinstance(data, str) else data)
            os.chmod(path, 0o644)
    for rel, mode in (modes or {}).items():
        os.chmod(root / rel, mode)
    return root


def test_comparer_names_a_differing_file(tmp_path: Path) -> None:
    common: dict[str, str | bytes] = {
        "out/same.txt": "same\n",
        "out/gen/1111/image.img": b"\0image",
        "out/other/keep": "keep\n",
    }
    a = tree(
        tmp_path / "a",
        {
            **common,
            "out/changed.txt": "one\ntwo\nthree\n",
            "out/run.sh": "#!/bin/sh\n",
            "out/link": "-> target-1",
            "out/only-a": "a\n",
            "out/gen/current": "-> 1111",
        },
    )
    b = tree(
        tmp_path / "b",
        {
            **{k.replace("1111", "2222"): v for k, v in common.items()},
            "out/changed.txt": "one\nTWO\nthree\n",
            "out/run.sh": "#!/bin/sh\n",
            "out/link": "-> target-2",
            "out/only-b": "b\n",
            "out/gen/current": "-> 2222",
        },
        modes={"out/run.sh": 0o700, "out/other": 0o700},
    )
    os.chmod(a / "out/run.sh", 0o755)
    os.chmod(a / "out/other", 0o755)

    result = repro.compare_trees(a, b, ["out"])

    lines = [d.line() for d in result.differences]
    assert [d.path for d in result.differences] == [
        "out/changed.txt",
        "out/gen/current",  # the generation's name differs, its content does not
        "out/link",
        "out/only-a",
        "out/only-b",
        "out/other/",
        "out/run.sh",
    ], lines
    by_path = {d.path: d for d in result.differences}
    assert by_path["out/changed.txt"].content
    assert by_path["out/changed.txt"].line().startswith("differs: out/changed.txt (content: ")
    assert by_path["out/gen/current"].line() == "differs: out/gen/current (link 1111 vs 2222)"
    assert by_path["out/link"].line() == "differs: out/link (link target-1 vs target-2)"
    assert by_path["out/only-a"].line() == "only in a: out/only-a"
    assert by_path["out/only-b"].line() == "only in b: out/only-b"
    assert by_path["out/other/"].line() == "differs: out/other/ (mode 0755 vs 0700)"
    assert by_path["out/run.sh"].line() == "differs: out/run.sh (mode 0755 vs 0700)"
    assert not by_path["out/run.sh"].content
    same = [label for label, _ in result.same_files]
    # The generation behind `current` is compared under the link's name, not its own.
    assert same == ["out/gen/current/image.img", "out/other/keep", "out/same.txt"]

    out: list[str] = []
    repro.report(result, diffoscope=True, out=out.append)
    text = "\n".join(out)
    assert "same: out/gen/current/image.img (sha256 " in text
    assert out[-1] == "different: 7 path(s) differ, 3 files are identical"
    diffoscope = [line for line in out if line.startswith("diffoscope")]
    if shutil.which("diffoscope") is None:
        assert diffoscope == [
            "diffoscope: not installed, no details (apt-get install diffoscope-minimal)"
        ]
    else:
        # diffoscope runs on content differences only: once, for changed.txt, and its report
        # (indented) follows.
        assert diffoscope == ["diffoscope out/changed.txt:"]
        details = out[out.index("diffoscope out/changed.txt:") + 1 : -1]
        assert all(line.startswith("    ") for line in details), details
        assert "    -two" in details and "    +TWO" in details, text


def test_comparer_reports_identical_trees(tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {"x/f": "f\n", "x/d/g": "g\n", "x/l": "-> d/g"}
    a, b = tree(tmp_path / "a", files), tree(tmp_path / "b", files)
    result = repro.compare_trees(a, b, ["x"])
    out: list[str] = []
    repro.report(result, diffoscope=True, out=out.append)
    assert result.identical
    assert out[-1] == "identical: 3 files (and 2 directories)"
    assert "same: x/l -> d/g" in out


def test_diffoscope_output_is_cut(tmp_path: Path) -> None:
    if shutil.which("diffoscope") is None:
        pytest.fail("diffoscope is not installed (scripts/setup.sh installs diffoscope-minimal)")
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("".join(f"line {i}\n" for i in range(200)))
    b.write_text("".join(f"LINE {i}\n" for i in range(200)))
    lines = repro.run_diffoscope(a, b, lines=10)
    assert len(lines) == 11 and lines[-1].startswith("... (") and lines[-1].endswith("more lines)")


def test_copy_keeps_inputs_and_leaves_out_outputs(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    pool = site / "modules/pool"
    pool.mkdir()
    (pool / "qlustar-module-core-bookworm_11.0.2_amd64.deb").write_text("built by the recipe")
    (pool / "qlustar-module-extra-bookworm_1.0_amd64.deb").write_text("an input")
    (pool / ".qlimage-tmp.module.x").mkdir()
    secret = site / "overlays/demo/copy/etc/secret"
    secret.parent.mkdir(parents=True)
    secret.write_text("s\n")
    os.chmod(secret, 0o600)
    os.utime(secret, (1_000_000_000, 1_000_000_000))
    for junk in ("bootfiles/qlustar", ".git/objects", ".venv/bin", "__pycache__"):
        (site / junk).mkdir(parents=True)
    (site / "images.d/z").write_text("z")
    os.symlink("z", site / "images.d/link")

    plan = repro.copy_plan(load_site(site))
    repro.copy_inputs(site, tmp_path / "a", plan)
    repro.copy_inputs(site, tmp_path / "b", plan, reverse=True)

    for copy in (tmp_path / "a", tmp_path / "b"):
        assert sorted(p.name for p in (copy / "modules/pool").iterdir()) == [
            "qlustar-module-extra-bookworm_1.0_amd64.deb"
        ]
        for junk in ("bootfiles", ".git", ".venv", "__pycache__"):
            assert not (copy / junk).exists()
        st = (copy / "overlays/demo/copy/etc/secret").stat()
        assert (st.st_mode & 0o7777, st.st_mtime) == (0o600, 1_000_000_000)
        assert os.readlink(copy / "images.d/link") == "z"
        assert (copy / "modules/core/recipe.toml").read_bytes() == (
            site / "modules/core/recipe.toml"
        ).read_bytes()
    assert repro.compare_trees(tmp_path / "a", tmp_path / "b").identical


def test_outputs_outside_the_site_are_a_user_error(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    toml = site / "site.toml"
    toml.write_text(toml.read_text() + f'\n[paths]\nbootfiles = "{tmp_path / "boot"}"\n')
    with pytest.raises(QlimageError, match=r"paths\.bootfiles = .* does not move"):
        repro.repro_check(site, out=lambda line: None, workdir=tmp_path)
    assert not (tmp_path / "boot").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # the temporary copies are gone


def test_register_adds_the_subcommand_to_the_qlimage_parser() -> None:
    parser = cli.parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "repro-check" in subparsers.choices
    args = parser.parse_args(["-C", "site", "repro-check", "--keep", "--no-diffoscope"])
    assert (args.keep, args.diffoscope, args.func) == (True, False, repro_check.run)
    assert parser.parse_args(["repro-check"]).diffoscope is True


def demo_site(dest: Path) -> Path:
    """The repository's demo site (its inputs only: the outputs and the pool are rebuilt)."""
    dest.mkdir()
    for name in ("site.toml", "images.d", "nodes.d", "overlays", "rootfs", "modules", "chroots"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, ignore=shutil.ignore_patterns("pool"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.boot  # builds the whole demo site twice
@pytest.mark.tools
@pytest.mark.network
def test_demo_site_builds_identically_twice(tmp_path: Path) -> None:
    site = demo_site(tmp_path / "site")
    out: list[str] = []
    started = time.monotonic()
    status = repro.repro_check(site, out=out.append, workdir=tmp_path)
    seconds = time.monotonic() - started
    text = "\n".join(out)
    print(text, f"\nrepro-check took {seconds:.1f} s")
    assert status == 0, text
    assert out[-1].startswith("identical: "), text
    same = {line.split()[1] for line in out if line.startswith("same: ")}
    for label in (
        "bootfiles/qlustar/images/demo/current/demo.img",
        "bootfiles/qlustar/images/demo/current/demo.img.sha256",
        "bootfiles/qlustar/images/demo/current/modules.json",
        "bootfiles/qlustar/images/demo/current",
        "bootfiles/qlustar/boot/current/initrd.img",
        "bootfiles/qlustar/boot/current/vmlinuz",
        "bootfiles/pxelinux.cfg/default",
        "bootfiles/pxelinux.cfg/demo",
        "bootfiles/qlustar/nodes/52-54-00-12-34-56/bundle.json",
        "bootfiles/tftpboot/pxelinux.0",
        "bootfiles/tftpboot/ldlinux.c32",
        "modules/pool/qlustar-module-core-bookworm_11.0.2_amd64.deb",
    ):
        assert label in same, text
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no --keep: nothing left behind
