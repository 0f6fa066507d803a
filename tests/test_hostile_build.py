"""Bad inputs a build only meets while building (issue 8, class 3), the caches that must see
every edit (class 10) and the `qlimage doit` commands (class 11).

Every refusal is checked by helpers.assert_refused (status 2, one line on stderr naming the file,
no traceback, nothing served changed) and, here, also for doit's own failure report, which must
never appear. Cases found before any task and cases that fail inside a task come out alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from qlimage.errors import ConfigError, TaskCrashed
from qlimage.pool import packages
from qlimage.site import load_site
from qlimage.site.load import ValidationCache

from helpers import REPO, assert_refused, edit, qlimage, served_listing

pytestmark = [pytest.mark.tools, pytest.mark.network]

DOIT_NOISE = ("TaskFailed", "TaskError", "Command error", "#####", "Traceback", "taskid:")


def refused(root: Path, *args: str, names: str) -> subprocess.CompletedProcess[str]:
    proc = assert_refused(root, *args, names=names)
    for noise in DOIT_NOISE:
        assert noise not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def cached_deb(root: Path, pattern: str) -> Path:
    """A .deb the session's build downloaded (the archive cache the site uses)."""
    found = sorted((load_site(root).paths.cache / "debs").glob(pattern))
    assert found, pattern
    return found[-1]


def pool_deb(root: Path) -> Path:
    (deb,) = sorted((root / "modules/pool").glob("qlustar-module-core-*.deb"))
    return deb


def set_kernel(root: Path, line: str) -> None:
    with (root / "site.toml").open("a") as f:
        f.write(f"\n[kernel]\n{line}\n")


# --- the breakages: each takes the built copy's root --------------------------------------------


def truncated_module_deb(root: Path) -> str:
    deb = pool_deb(root)
    data = deb.read_bytes()
    deb.unlink()  # a new file: the built copy's hard links stay intact
    deb.write_bytes(data[: len(data) // 3])
    return deb.name


def garbage_module_deb(root: Path) -> str:
    deb = root / "modules/pool/qlustar-module-extra-bookworm_11.0.0_amd64.deb"
    deb.write_bytes(b"!<arch>\ngarbage\n")
    return deb.name


def garbage_kernel_deb(root: Path) -> str:
    (root / "kernel.deb").write_bytes(b"this is not a Debian package\n")
    set_kernel(root, 'deb = "kernel.deb"')
    return "kernel.deb"


def empty_kernel_deb(root: Path) -> str:
    (root / "kernel.deb").write_bytes(b"")
    set_kernel(root, 'deb = "kernel.deb"')
    return "kernel.deb"


def missing_kernel_deb(root: Path) -> str:
    set_kernel(root, 'deb = "no-such-kernel.deb"')
    return "no-such-kernel.deb"


def kernel_deb_is_a_directory(root: Path) -> str:
    (root / "kernel.deb").mkdir()
    set_kernel(root, 'deb = "kernel.deb"')
    return "kernel.deb"


def truncated_kernel_deb(root: Path) -> str:
    """Its control data reads fine (checked before the build); dpkg-deb fails in the task."""
    real = cached_deb(root, "linux-image-[0-9]*.deb")
    with real.open("rb") as f:
        (root / "kernel.deb").write_bytes(f.read(1 << 20))
    set_kernel(root, 'deb = "kernel.deb"')
    return "kernel.deb"


def kernel_deb_without_a_kernel(root: Path) -> str:
    shutil.copy(cached_deb(root, "busybox-static_*.deb"), root / "notakernel.deb")
    set_kernel(root, 'deb = "notakernel.deb"')
    return "notakernel.deb"


def missing_kernel_package(root: Path) -> str:
    set_kernel(root, 'package = "linux-image-qlimage-missing"')
    return "linux-image-qlimage-missing"


def kernel_package_that_is_no_kernel(root: Path) -> str:
    """In the archive (the check before the build passes), but depends on no kernel."""
    set_kernel(root, 'package = "busybox-static"')
    return "busybox-static"


def compressor_level_mksquashfs_refuses(root: Path) -> str:
    # The schema allows 1..22 (zstd's range); gzip stops at 9. Whether the site check or
    # mksquashfs in the task refuses it, the one line names the level.
    with (root / "site.toml").open("a") as f:
        f.write('\n[squashfs]\ncompressor = "gzip"\nlevel = 15\n')
    return "level"


def recipe_package_missing_from_archive(root: Path) -> str:
    edit(
        root / "modules/core/recipe.toml",
        'packages = ["busybox-static",',
        'packages = ["qlimage-no-such-package", "busybox-static",',
    )
    return "qlimage-no-such-package"


BREAKAGES: list[Callable[[Path], str]] = [
    truncated_module_deb,
    garbage_module_deb,
    garbage_kernel_deb,
    empty_kernel_deb,
    missing_kernel_deb,
    kernel_deb_is_a_directory,
    truncated_kernel_deb,
    kernel_deb_without_a_kernel,
    missing_kernel_package,
    kernel_package_that_is_no_kernel,
    compressor_level_mksquashfs_refuses,
    recipe_package_missing_from_archive,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.__name__)
def test_build_refuses(built_copy: Path, breakage: Callable[[Path], str]) -> None:
    names = breakage(built_copy)
    refused(built_copy, names=names)


@pytest.mark.parametrize(
    "breakage",
    [garbage_kernel_deb, missing_kernel_deb, missing_kernel_package, garbage_module_deb],
    ids=lambda b: b.__name__,
)
def test_validate_refuses_what_the_build_refuses_before_any_task(
    built_copy: Path, breakage: Callable[[Path], str]
) -> None:
    names = breakage(built_copy)
    refused(built_copy, "validate", names=names)


# --- failures the CLI can only meet in-process (a file that goes away mid-build, a bug) ----------


def add_extra_module(root: Path) -> Path:
    """A second module .deb in the pool (built by dpkg-deb), used by the image."""
    tree = root.parent / "extra-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        "Package: qlustar-module-extra-bookworm\nVersion: 11.0.0\nArchitecture: amd64\n"
        "Maintainer: test <test@example.org>\nDescription: extra module\n"
    )
    (tree / "etc").mkdir()
    (tree / "etc/extra").write_text("extra\n")
    deb = root / "modules/pool/qlustar-module-extra-bookworm_11.0.0_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    edit(root / "images.d/demo.toml", 'modules = ["core"]', 'modules = ["core", "extra"]')
    return deb


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`qlimage ARGV` in this process (so a test can reach into the build), with its output."""
    import contextlib
    import io

    from qlimage.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as e:
            return int(e.code or 0), out.getvalue(), err.getvalue()
    raise AssertionError("main() returned")


def test_build_refuses_module_deb_deleted_between_plan_and_task(
    built_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlimage.tasks import run

    deb = add_extra_module(built_copy)
    planned = run.planned_tasks

    def plan_then_delete(site: object) -> object:
        tasks = planned(site)  # type: ignore[arg-type]
        deb.unlink()
        return tasks

    monkeypatch.setattr(run, "planned_tasks", plan_then_delete)
    before = served_listing(built_copy)
    status, out, err = run_cli("-C", str(built_copy), "build")
    assert status == 2, (out, err)
    assert err.splitlines() == [err.strip()] and deb.name in err and "stage:demo" in err, err
    assert not any(noise in out + err for noise in DOIT_NOISE), out + err
    assert served_listing(built_copy) == before


def test_a_bug_inside_a_task_is_an_internal_error(
    built_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlimage.pool import recipes

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug in a task")

    qlimage("-C", str(built_copy), "doit", "forget", "module:core")  # so that it runs
    monkeypatch.setattr(recipes, "build_module", broken)
    before = served_listing(built_copy)
    status, out, err = run_cli("-C", str(built_copy), "build")
    assert status == 70, (out, err)
    assert err.startswith("qlimage: internal error: ") and len(err.splitlines()) == 1, err
    assert "module:core" in err and "a bug in a task" in err
    assert not any(noise in out + err for noise in DOIT_NOISE), out + err
    with pytest.raises(TaskCrashed):  # --debug re-raises, after the task's own traceback
        run_cli("--debug", "-C", str(built_copy), "build")
    assert served_listing(built_copy) == before


def test_debug_shows_the_traceback_of_a_bug_inside_a_task(
    built_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlimage.cli import main
    from qlimage.pool import recipes

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug in a task")

    qlimage("-C", str(built_copy), "doit", "forget", "module:core")  # so that it runs
    monkeypatch.setattr(recipes, "build_module", broken)
    with pytest.raises(TaskCrashed):
        main(["--debug", "-C", str(built_copy), "build"])
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug in a task" in err and "broken" in err


def test_debug_shows_the_failed_tools_details(built_copy: Path) -> None:
    truncated_kernel_deb(built_copy)
    proc = qlimage("--debug", "-C", str(built_copy), "build", check=False)
    assert proc.returncode == 2
    assert "  command: " in proc.stderr and "dpkg-deb" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("qlimage: kernel: dpkg-deb failed")


def test_plain_doit_reports_a_task_failure_in_one_line(built_copy: Path) -> None:
    truncated_kernel_deb(built_copy)
    doit = Path(sys.executable).parent / "doit"  # installed with doit into the venv
    proc = subprocess.run(
        [str(doit), "-f", str(REPO / "dodo.py"), "-d", str(built_copy)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlimage: kernel: "), proc.stderr
    assert "kernel.deb" in lines[0]
    assert not any(noise in proc.stdout + proc.stderr for noise in DOIT_NOISE)


def test_a_no_op_build_does_not_read_the_archive(built_copy: Path) -> None:
    """The kernel package is looked up before the build only when the kernel task is due."""
    from qlimage.tasks.check import kernel_due

    site = load_site(built_copy)
    assert not kernel_due(site)
    set_kernel(built_copy, 'package = "linux-image-qlimage-missing"')
    assert kernel_due(load_site(built_copy))


# --- caches that must see every edit (class 10) --------------------------------------------------


def same_length_edit(path: Path, old: str, new: str) -> None:
    """Replace `old` by `new` (same length) and set the file's mtime back, as cp -p would."""
    assert len(old) == len(new)
    st = path.stat()
    edit(path, old, new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_validation_cache_sees_an_invalid_edit_with_the_old_mtime(built_copy: Path) -> None:
    nodes = built_copy / "nodes.d/cluster.toml"
    same_length_edit(nodes, 'mac = "52:54:00:12:34:57"', 'mac = "52:54:00:12:34:ZZ"')
    refused(built_copy, "validate", names="nodes.d/cluster.toml")


def test_validation_cache_sees_a_valid_edit_with_the_old_mtime(built_copy: Path) -> None:
    nodes = built_copy / "nodes.d/cluster.toml"
    assert load_site(built_copy).host("beo-02").mac == "52:54:00:12:34:57"
    same_length_edit(nodes, 'mac = "52:54:00:12:34:57"', 'mac = "52:54:00:12:34:58"')
    assert load_site(built_copy).host("beo-02").mac == "52:54:00:12:34:58"


def test_validation_cache_hits_when_nothing_changed(built_copy: Path) -> None:
    site = load_site(built_copy)
    cache = ValidationCache(site.paths.bootfiles / ".validated.json")
    nodes = built_copy / "nodes.d/cluster.toml"
    assert cache.entries[str(nodes)][0] == ValidationCache.key(nodes, "nodes")


def test_validation_cache_validates_only_the_edited_host(
    built_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlimage.site import load as site_load

    load_site(built_copy)  # every host valid, and remembered
    nodes = built_copy / "nodes.d/cluster.toml"
    validated: list[object] = []
    real = site_load.validate

    def counting(data: object, schema_name: str, where: str) -> list[str]:
        validated.append(data)
        return real(data, schema_name, where)

    monkeypatch.setattr(site_load, "validate", counting)
    edit(nodes, 'mac = "52:54:00:12:34:57"', 'mac = "52:54:00:12:34:58"')
    assert load_site(built_copy).host("beo-02").mac == "52:54:00:12:34:58"
    hosts = [d["hosts"] for d in validated if isinstance(d, dict) and d.get("hosts")]
    assert [[h["name"] for h in hs] for hs in hosts] == [["beo-02"]]

    # An invalid edit is reported at the host's own place in the file, as a full check would.
    edit(nodes, 'mac = "52:54:00:12:34:58"', 'mac = "52:54:00:12:34:ZZ"')
    with pytest.raises(ConfigError) as e:
        load_site(built_copy)
    raw = tomllib.loads(nodes.read_text())
    index = [h["name"] for h in raw["hosts"]].index("beo-02")
    full = real(raw, "nodes", "nodes.d/cluster.toml")  # what validating the whole file says
    assert full and e.value.problems == full, e.value.problems
    assert full[0].startswith(f"nodes.d/cluster.toml: .hosts[{index}].mac: ")


def build_module_deb(tree: Path, version: str, out: Path) -> None:
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: qlustar-module-cachetest-bookworm\nVersion: {version}\n"
        "Architecture: amd64\nMaintainer: test <test@example.org>\nDescription: test\n"
    )
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Znone", "-b", str(tree), str(out)],
        check=True,
        capture_output=True,
        env=env,
    )


def test_control_cache_sees_a_same_size_rewrite_with_the_old_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a.deb", tmp_path / "b.deb"
    build_module_deb(tmp_path / "tree", "11.0.1", first)
    build_module_deb(tmp_path / "tree", "11.0.2", second)
    assert first.stat().st_size == second.stat().st_size
    pool = tmp_path / "pool"
    pool.mkdir()
    deb = pool / "qlustar-module-cachetest-bookworm_11_amd64.deb"
    shutil.copy(first, deb)
    cache = tmp_path / "control.json"
    monkeypatch.setattr(packages, "_control_cache", {})
    assert packages.read_control(deb)["Version"] == "11.0.1"
    packages.save_control_cache(cache)

    st = deb.stat()
    deb.write_bytes(second.read_bytes())  # in place: same inode, same size
    os.utime(deb, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(packages, "_control_cache", {})  # a new process
    packages.load_control_cache(cache)
    assert packages.read_control(deb)["Version"] == "11.0.2"


def test_control_cache_hits_when_nothing_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = tmp_path / "qlustar-module-cachetest-bookworm_11_amd64.deb"
    build_module_deb(tmp_path / "tree", "11.0.1", deb)
    cache = tmp_path / "control.json"
    monkeypatch.setattr(packages, "_control_cache", {})
    packages.read_control(deb)
    packages.save_control_cache(cache)
    monkeypatch.setattr(packages, "_control_cache", {})
    packages.load_control_cache(cache)

    def unread(path: Path) -> dict[str, str]:
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(packages, "parse_control", unread)
    assert packages.read_control(deb)["Version"] == "11.0.1"


# --- qlimage doit (class 11) ---------------------------------------------------------------------


def test_doit_forget_and_ignore(built_copy: Path) -> None:
    site = str(built_copy)
    proc = qlimage("-C", site, "doit", "forget", "ipxe")
    assert (proc.stdout, proc.stderr) == ("forgetting ipxe\n", ""), proc
    # doit info exits 1 for a task that is not up to date: forgotten, the ipxe task is not.
    info = qlimage("-C", site, "doit", "info", "ipxe", check=False)
    assert info.returncode == 1 and "status     : run" in info.stdout, info
    proc = qlimage("-C", site, "doit", "ignore", "ipxe")
    assert (proc.stdout, proc.stderr) == ("ignoring ipxe\n", ""), proc
    out = qlimage("-C", site, "build").stdout
    assert "!! ipxe" in out, out  # ignored, so not run
    qlimage("-C", site, "doit", "forget", "ipxe")
    out = qlimage("-C", site, "build").stdout
    assert ".  ipxe" in out, out  # forgotten and no longer ignored: it runs again
    assert "status     : up-to-date" in qlimage("-C", site, "doit", "info", "ipxe").stdout


def test_doit_info_and_list(built_copy: Path) -> None:
    qlimage("-C", str(built_copy), "build")  # the copy's state names the original's files
    info = qlimage("-C", str(built_copy), "doit", "info", "squashfs:demo")
    assert "squashfs:demo" in info.stdout and "status     : up-to-date" in info.stdout, info
    listed = qlimage("-C", str(built_copy), "doit", "list").stdout
    assert {"kernel", "squashfs", "stage"} <= {line.split()[0] for line in listed.splitlines()}


def test_doit_forget_of_an_unknown_task_is_a_user_error(built_copy: Path) -> None:
    proc = qlimage("-C", str(built_copy), "doit", "forget", "no-such-task", check=False)
    assert proc.returncode == 2 and "no-such-task" in proc.stderr, proc
    assert "Traceback" not in proc.stderr
