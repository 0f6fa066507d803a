"""The head <-> node contract: qlimage/contract.py against what the node side (qlimage/node)
uses, and the node side's own rule: standard library only, nothing from the head."""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qlimage import contract
from qlimage.image import stage
from qlimage.node.runner import cluster, fetch, main, names, paths

NODE = Path(__file__).parent.parent / "qlimage/node"
INIT = NODE / "initrd/init"
UDHCPC = NODE / "initrd/udhcpc.script"
INIT_QLUSTAR = NODE / "init.qlustar"
LAUNCHER = NODE / "qlustar-runner"

# The kernel command-line keys each shell stage must read.
INITRD_KEYS = {
    contract.CMDLINE_HTTP,
    contract.CMDLINE_IMAGE,
    contract.CMDLINE_PATH,
    contract.CMDLINE_SUM,
    contract.CMDLINE_MCAST,
    contract.CMDLINE_BOOTIF,
    contract.CMDLINE_DEBUG,
    contract.CMDLINE_INITRD_SHELL,
}
INIT_QLUSTAR_KEYS = {contract.CMDLINE_DEBUG, contract.CMDLINE_EARLY_SHELL}


def mirrored() -> dict[str, object]:
    return {k: v for k, v in vars(names).items() if k.isupper() and not k.startswith("_")}


def cmdline_keys(script: str) -> set[str]:
    """The keys a shell stage takes from /proc/cmdline: the patterns of its case statement in
    the `for arg in $(cat /proc/cmdline)` loop (`key=*)` or a bare `flag)`)."""
    loop = re.search(r"for arg in \$\(cat /proc/cmdline\).*?\n\s*esac", script, re.S)
    assert loop, "no /proc/cmdline loop"
    return set(re.findall(r"^\s*([A-Za-z0-9_.-]+)(?:=\*)?\)", loop.group(0), re.M))


# --------------------------------------------------------------------------------------
# (a) the runner's mirror of the contract


def test_every_mirrored_name_equals_the_contract() -> None:
    assert mirrored(), "names.py mirrors nothing"
    for name, value in mirrored().items():
        assert hasattr(contract, name), f"names.{name} is not in qlimage/contract.py"
        assert getattr(contract, name) == value, name


def test_runner_paths_and_urls_follow_the_contract() -> None:
    assert paths.INIT_D_DIR == contract.INIT_D_DIR
    assert f"{contract.OPTIONS_DIR}/{contract.DISK_CONFIG}" == paths.DISK_CONFIG_FILE
    base, mac = "http://10.0.2.2:8470/qlustar", "52:54:00:AB:CD:EF"
    assert fetch.bundle_url(base + "/", mac) == f"{base}/{contract.bundle_path(mac)}"
    assert contract.bundle_path(mac) == "nodes/52-54-00-ab-cd-ef/bundle.json"
    assert contract.checksum_name(contract.BUNDLE_FILE) == "bundle.json.sha256"
    assert contract.image_path("demo") == "images/demo"
    assert contract.image_sum_file("demo") == "demo.img.sha256"
    assert contract.boot_path(contract.KERNEL_FILE) == "qlustar/boot/current/vmlinuz"
    sums = contract.cluster_path(contract.CLUSTER_SUMS)
    assert cluster.cluster_url(base + "/", contract.CLUSTER_SUMS) == f"{base}/{sums}"
    assert sums == "cluster/SHA256SUMS"
    assert set(contract.CMDLINE_KEYS) >= INITRD_KEYS | INIT_QLUSTAR_KEYS


def test_runner_takes_shared_names_from_names_py() -> None:
    """No other runner module spells a command-line key or a URL name itself."""
    shared = {
        contract.CMDLINE_HTTP,
        contract.CMDLINE_BOOTIF,
        contract.NODES_DIR,
        contract.BUNDLE_FILE,
        contract.CHECKSUM_SUFFIX,
        contract.CLUSTER_DIR,
        contract.CLUSTER_SUMS,
        *(name for pair in contract.CLUSTER_FILES for name in pair),
    }
    for path in sorted((NODE / "runner").glob("*.py")):
        if path.name == "names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in shared, f"{path.name}: {node.value!r}"


def test_head_installs_the_node_where_the_contract_says() -> None:
    files = stage.node_files()
    assert contract.RUNNER_PATH.lstrip("/") == stage.RUNNER
    assert contract.INIT_QLUSTAR_PATH.lstrip("/") == stage.INIT_QLUSTAR
    assert files[stage.RUNNER] == (LAUNCHER.read_bytes(), 0o755)
    assert files[stage.INIT_QLUSTAR] == (INIT_QLUSTAR.read_bytes(), 0o755)
    modules = sorted(p.name for p in (NODE / "runner").glob("*.py"))
    assert [p for p in files if p.startswith(stage.RUNNER_PACKAGE + "/")] == [
        f"{stage.RUNNER_PACKAGE}/{name}" for name in modules
    ]
    assert list(files) == sorted(files)
    assert all(mode in (0o644, 0o755) for _, mode in files.values())
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]
    assert stage.node_files_digest() == stage.node_files_digest()


def test_installed_launcher_runs_the_installed_package(tmp_path: Path) -> None:
    for rel, (data, mode) in stage.node_files().items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / stage.RUNNER), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: qlustar-runner")
    assert "--init-d-only" in proc.stdout
    assert not list(tmp_path.rglob("__pycache__"))


# --------------------------------------------------------------------------------------
# (b) the shell stages


def test_initrd_init_reads_the_contract_keys_and_paths() -> None:
    script = INIT.read_text()
    keys = cmdline_keys(script)
    assert keys <= set(contract.CMDLINE_KEYS), keys - set(contract.CMDLINE_KEYS)
    assert keys >= INITRD_KEYS, INITRD_KEYS - keys
    assert f"/{contract.CURRENT}/{contract.GENERATION}" in script
    assert f"/{contract.NODES_DIR}/$MACDIR/{contract.CHROOT_FILE}" in script
    assert f"$GENDIR/{contract.image_file('$IMAGE')}" in script
    assert f"/newroot{contract.INIT_QLUSTAR_PATH}" in script
    assert f"switch_root /newroot {contract.INIT_QLUSTAR_PATH}" in script
    assert paths.NET_ENV_FILE in script


def test_initrd_passes_the_generation_it_read_to_the_multicast_seam() -> None:
    script = INIT.read_text()
    read = script.index(f'GEN=$(wget -q -O - "$HTTP/$IMGPATH/{contract.CURRENT}/')
    call = script.index('if fetch_multicast "$GEN"; then')
    assert read < call
    seam = script[script.index("fetch_multicast() {") : call]
    assert re.search(r'ql-mcast-client "\$MCAST" "\$IMAGE" "\$1" "\$IMG"', seam), seam


def test_udhcpc_script_writes_the_lease_the_runner_reads() -> None:
    script = UDHCPC.read_text()
    assert f"> {paths.NET_ENV_FILE}" in script
    assert 'echo "NIC=$interface"' in script  # identity.read_identity falls back to NIC


def test_init_qlustar_reads_the_contract_keys_and_calls_the_runner() -> None:
    script = INIT_QLUSTAR.read_text()
    keys = cmdline_keys(script)
    assert keys <= set(contract.CMDLINE_KEYS), keys - set(contract.CMDLINE_KEYS)
    assert keys >= INIT_QLUSTAR_KEYS, INIT_QLUSTAR_KEYS - keys
    assert f"RUNNER={contract.RUNNER_PATH}\n" in script
    assert f"[ $status -eq {main.EXIT_UNCONFIGURED} ]" in script
    assert '"$RUNNER" --init-d-only' in script
    # The runner owns the init.d rule: the script no longer walks the directory itself.
    assert contract.INIT_D_DIR + "/*" not in script


def test_init_d_only_runs_just_the_scripts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    init_d, log_dir = tmp_path / "init.d", tmp_path / "log"
    init_d.mkdir()
    for name, status in (("20-b", 3), ("10-a", 0)):
        script = init_d / name
        script.write_text(f'#!/bin/sh\necho "{name} ran"\nexit {status}\n')
        script.chmod(0o755)
    monkeypatch.setattr(paths, "INIT_D_DIR", str(init_d))
    monkeypatch.setattr(paths, "LOG_DIR", str(log_dir))
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet\n")

    def no_fetch(url: str) -> bytes:
        raise AssertionError(f"--init-d-only fetched {url}")

    argv = ["--init-d-only", "--cmdline", str(cmdline), "--net-env", str(tmp_path / "none")]
    assert main.main(argv, fetch=no_fetch) == main.EXIT_OK
    assert capsys.readouterr().out.splitlines() == [
        "qlustar: init.d 10-a started",
        "qlustar: init.d 10-a exited with status 0",
        "qlustar: init.d 20-b started",
        "qlustar: init.d 20-b exited with status 3",
    ]
    assert (log_dir / "init.d/10-a.log").read_text() == "10-a ran\n"
    assert stat.S_IMODE((log_dir / "init.d").stat().st_mode) == 0o755


# --------------------------------------------------------------------------------------
# (c) the node side is standard library only


def node_python_files() -> list[Path]:
    return [*sorted(NODE.rglob("*.py")), LAUNCHER]


@pytest.mark.parametrize("path", node_python_files(), ids=lambda p: str(p.relative_to(NODE)))
def test_node_code_imports_only_the_standard_library(path: Path) -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                assert top in allowed, f"{path.name}: import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Only within its own package: the runner package is installed on its own.
                assert node.level == 1, f"{path.name}: from {'.' * node.level}{node.module}"
            else:
                top = (node.module or "").split(".")[0]
                assert top in allowed and top != "qlimage", f"{path.name}: from {node.module}"


def test_node_tree_has_only_what_is_installed() -> None:
    """Every file below qlimage/node is either installed on the node or documents it."""
    files = {
        str(p.relative_to(NODE))
        for p in NODE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    runner = {f"runner/{p.name}" for p in (NODE / "runner").glob("*.py")}
    assert (
        files
        == {
            "__init__.py",
            "qlustar-runner",
            "init.qlustar",
            "initrd/init",
            "initrd/udhcpc.script",
            "initrd/ql-mcast-client",
        }
        | runner
    )


def test_multicast_client_reads_what_the_daemon_answers() -> None:
    """ql-mcast-client speaks ql-mcastd's protocol and reaches only busybox applets through
    `busybox` (the initrd links just the ones /init needs)."""
    from qlimage.image import initrd
    from qlimage.serve import mcastd

    script = (INIT.parent / "ql-mcast-client").read_text()
    assert "printf 'GET %s %s\\n'" in script
    assert "OK) ;;" in script and "NO) shift;" in script
    assert "[ $# -eq 5 ]" in script  # OK <group> <port> <session> <delay-ms>
    assert "busybox nc -w" in script and "busybox timeout" in script
    assert not re.search(r"\| *(head|tail)\b", script)  # not linked in the initrd
    assert len("GET " + "a" * 64 + " " + "a" * 64 + "\n") <= mcastd.MAX_LINE
    assert initrd.MCAST_CLIENT == "bin/ql-mcast-client"  # on /init's PATH
