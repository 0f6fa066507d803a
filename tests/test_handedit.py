"""`qlimage edit -s/-i IMAGE` (qlustar-image-edit): a scripted $SHELL edits the unpacked squashfs
or initrd; exit 0 publishes a hand-edited generation, exit 1 (or Ctrl-C) publishes nothing; the
edit survives a build with unchanged inputs and yields to a build from changed inputs; the QEMU
boot shows it, and `qlustar-image-reconfigure` undoes it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlimage import contract
from qlimage.image import publish
from qlimage.layout import Layout
from qlimage.serve import vm
from qlimage.site import load_site

from helpers import QLIMAGE, REPO, assert_refused, qlimage, served_listing

pytestmark = pytest.mark.tools

# The seed's command, as installed beside the interpreter running the tests.
RECONFIGURE = Path(sys.executable).parent / "qlustar-image-reconfigure"

MOTD = "edited by hand\n"
# A shell as the admin would use it: it edits the tree it starts in, then exits.
EDIT_SHELL = f"""#!/bin/sh
set -e
[ "$(pwd)" = "$QLIMAGE_EDIT_ROOT" ]
printf '{MOTD}' > etc/motd
mkdir -p opt/hand
echo marker > opt/hand/marker
"""


def shell_script(tmp_path: Path, body: str, name: str = "shell") -> str:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


def edit(
    site: Path, flag: str, shell: str, *, build: bool = False
) -> subprocess.CompletedProcess[str]:
    """`qlimage edit FLAG demo` with `shell` as $SHELL (--no-build unless `build`)."""
    env = dict(os.environ, SHELL=shell, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*QLIMAGE, "-C", str(site), "edit", flag, "demo", *([] if build else ["--no-build"])],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def image_root(site: Path) -> Path:
    return Layout(load_site(site)).image_root("demo")


def cat_in_image(img: Path, rel: str) -> bytes | None:
    proc = subprocess.run(
        ["unsquashfs", "-cat", str(img), rel], capture_output=True, timeout=60, check=False
    )
    return proc.stdout if proc.returncode == 0 else None


def no_edit_trees(site: Path) -> bool:
    return not list((site / "bootfiles").glob(".qlimage-tmp.edit.*"))


def test_squashfs_edit_publishes_a_hand_edited_generation(built_copy: Path, tmp_path: Path) -> None:
    # A copied site rebuilds everything once (doit's state names the template's paths): settle
    # it first, so that the rebuild that ends the edit is the plain build an admin's would be.
    qlimage("-C", str(built_copy), "build")
    root = image_root(built_copy)
    base = publish.current_name(root)
    proc = edit(built_copy, "-s", shell_script(tmp_path, EDIT_SHELL), build=True)
    assert "temporary" in proc.stderr and "qlustar-image-reconfigure demo" in proc.stderr
    gen = publish.current(root)
    assert gen is not None and gen.name != base and gen.name in proc.stdout
    assert publish.history(root)[-2:] == [base, gen.name]
    assert publish.is_verified(gen)  # what a node checks: the new checksum file matches
    img = gen / contract.image_file("demo")
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    assert (gen / contract.image_sum_file("demo")).read_text() == f"{digest}  demo.img\n"
    marker = json.loads((gen / contract.HAND_EDITED).read_text())
    assert marker == {"part": "squashfs", "base": base, "image": "demo"}
    assert cat_in_image(img, "etc/motd") == MOTD.encode()
    assert cat_in_image(img, "opt/hand/marker") == b"marker\n"
    # The rest of the image came through: the runner the pipeline installs is still there.
    assert cat_in_image(img, contract.RUNNER_PATH.lstrip("/"))
    assert no_edit_trees(built_copy)

    # A build with unchanged inputs keeps serving the edit ...
    qlimage("-C", str(built_copy), "build")
    assert publish.current_name(root) == gen.name
    # ... a change of the image's inputs rebuilds it from them, and the edit is gone.
    overlay = built_copy / "overlays/demo/copy/etc/issue.net"
    overlay.parent.mkdir(parents=True)
    overlay.write_text("from the inputs\n")
    qlimage("-C", str(built_copy), "build")
    rebuilt = publish.current(root)
    assert rebuilt is not None and rebuilt.name not in (base, gen.name)
    assert not (rebuilt / contract.HAND_EDITED).exists()
    img = rebuilt / contract.image_file("demo")
    assert cat_in_image(img, "etc/issue.net") == b"from the inputs\n"
    assert cat_in_image(img, "opt/hand/marker") is None
    assert cat_in_image(img, "etc/motd") != MOTD.encode()


def test_failing_shell_discards_the_edit(built_copy: Path, tmp_path: Path) -> None:
    before = served_listing(built_copy)
    shell = shell_script(tmp_path, EDIT_SHELL + "exit 1\n")
    proc = edit(built_copy, "-s", shell)
    assert "status 1" in proc.stderr and "nothing published" in proc.stderr
    assert served_listing(built_copy) == before
    assert no_edit_trees(built_copy)


@pytest.mark.parametrize("flag", ["-s", "-i"])
def test_an_unchanged_tree_repacks_to_the_same_bytes(
    built_copy: Path, tmp_path: Path, flag: str
) -> None:
    """Reproducible repacking: unpacked and packed again, the served bytes come back."""
    before = served_listing(built_copy)
    proc = edit(built_copy, flag, shell_script(tmp_path, "#!/bin/sh\nexit 0\n"))
    assert "nothing changed" in proc.stdout
    assert served_listing(built_copy) == before


def test_initrd_edit_is_shared_and_reset_by_reconfigure(built_copy: Path, tmp_path: Path) -> None:
    layout = Layout(load_site(built_copy))
    base = publish.current_name(layout.boot)
    kernel = (layout.boot_current / contract.KERNEL_FILE).read_bytes()
    shell = shell_script(tmp_path, "#!/bin/sh\necho by-hand > etc/qlustar/hand-edit\n")
    proc = edit(built_copy, "-i", shell)
    assert "shared by every image" in proc.stderr
    gen = publish.current(layout.boot)
    assert gen is not None and gen.name != base
    assert json.loads((gen / contract.HAND_EDITED).read_text()) == {
        "part": "initrd", "base": base, "image": "demo",
    }  # fmt: skip
    assert (gen / contract.KERNEL_FILE).read_bytes() == kernel
    archive = subprocess.run(
        ["gzip", "-dc", str(gen / contract.INITRD_FILE)], capture_output=True, check=True
    ).stdout
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert "etc/qlustar/hand-edit" in listing.split() and "init" in listing.split()

    out = qlimage("-C", str(built_copy), "reconfigure", "demo").stdout
    assert "initrd: hand edits reset" in out
    assert publish.current_name(layout.boot) == base
    assert not (layout.boot_current / contract.HAND_EDITED).exists()


def test_ctrl_c_in_the_shell_removes_the_tree(built_copy: Path, tmp_path: Path) -> None:
    before = served_listing(built_copy)
    started = tmp_path / "started"
    shell = shell_script(tmp_path, f"#!/bin/sh\ntouch {started}\nsleep 60\n")
    env = dict(os.environ, SHELL=shell, PYTHONPATH=str(REPO))
    # SIGINT as on a terminal: a suite started in the background by a shell without job
    # control inherits it ignored, and so would qlimage.
    with subprocess.Popen(
        [*QLIMAGE, "-C", str(built_copy), "edit", "-s", "demo", "--no-build"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:  # fmt: skip
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert started.exists(), proc.communicate(timeout=30)
        assert not no_edit_trees(built_copy)  # the tree is there while the shell runs
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert no_edit_trees(built_copy)
    assert served_listing(built_copy) == before


def test_unknown_image_is_refused(built_copy: Path) -> None:
    assert_refused(built_copy, "edit", "-s", "nosuch", names="unknown image 'nosuch'")
    assert_refused(built_copy, "edit", "-i", "nosuch", names="unknown image 'nosuch'")


@pytest.mark.boot
@pytest.mark.network
def test_squashfs_edit_boots_and_reconfigure_undoes_it(built_copy: Path, tmp_path: Path) -> None:
    """The edit adds an init.d script to the image; the runner runs the image's own init.d
    scripts, so the node's console shows it. `qlustar-image-reconfigure` then serves the image
    built from the inputs again, without the script."""
    script = "lib/qlustar/init.d/05-hand-edit"
    shell = shell_script(
        tmp_path,
        "#!/bin/sh\nset -e\necho 'hello from the hand edit' > etc/hand-edit\n"
        f"mkdir -p lib/qlustar/init.d\ncat > {script} <<'EOF'\n#!/bin/sh\n"
        'echo "qlustar-test: hand edit says $(cat /etc/hand-edit)" > /dev/console\nEOF\n'
        f"chmod 755 {script}\n",
    )
    root = image_root(built_copy)
    edit(built_copy, "-s", shell)
    edited = publish.current_name(root)
    result = vm.boot(
        load_site(built_copy),
        "beo-01",
        timeout=300,
        success=[
            r"qlustar-test: hand edit says hello from the hand edit",
            r"qlustar: handing over to ",
        ],
    )
    log = "\n".join(result.console)
    assert result.ok, f"{result.reason}\n{result.tail(60)}"
    sha = (Layout(load_site(built_copy)).image_sum("demo")).read_text().split()[0]
    assert f"sha256 ok ({sha})" in log  # the node verified the hand-edited generation

    proc = subprocess.run(
        [str(RECONFIGURE), "-C", str(built_copy), "demo"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert publish.current_name(root) != edited
    assert not (root / contract.CURRENT / contract.HAND_EDITED).exists()
    img = Layout(load_site(built_copy)).image("demo")
    assert cat_in_image(img, script) is None and cat_in_image(img, "etc/hand-edit") is None
