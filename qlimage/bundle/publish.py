"""Publishing a node's files: its bundle, the bundle's checksum and the chroot line the initrd
reads, as one generation directory qlustar/nodes/.<mac>.<digest>/ that the link
qlustar/nodes/<mac> switches to with one rename. So a node sees the old set or the new set,
never a bundle with another bundle's checksum; and a node that left the inventory loses its
link and its files in the same build (`prune_nodes`)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qlimage import contract
from qlimage.atomic import TMP_PREFIX, clamp_one, symlink, write_bytes, write_text
from qlimage.bundle.render import BundleInputs, bundle_json, render_bundle, warn_private_files
from qlimage.errors import ConfigError, QlimageError
from qlimage.image.publish import discard, fault_point, fsync_tree
from qlimage.layout import Layout
from qlimage.site import Host, Site
from qlimage.tasks import stamp


def chroot_line(site: Site, host: Host) -> str:
    chroot = site.host_chroot(host)
    return contract.chroot_line(chroot.name, chroot.source) if chroot else ""


def node_files(site: Site, host: Host) -> dict[str, bytes]:
    """{file name in the node's directory: bytes}."""
    data = bundle_json(render_bundle(site, host))
    digest = hashlib.sha256(data).hexdigest()
    return {
        contract.BUNDLE_FILE: data,
        contract.checksum_name(contract.BUNDLE_FILE): contract.checksum_line(
            digest, contract.BUNDLE_FILE
        ).encode(),
        contract.CHROOT_FILE: chroot_line(site, host).encode(),
    }


def generation_name(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()[:16]


def is_complete(gen: Path, files: dict[str, bytes]) -> bool:
    try:
        return sorted(p.name for p in gen.iterdir()) == sorted(files) and all(
            (gen / n).read_bytes() == data for n, data in files.items()
        )
    except OSError:
        return False


def publish_node(site: Site, host: Host, older: list[Path]) -> Path:
    """Render the node's files, write them as a new generation and switch the node's link to
    it with one rename; then delete its `older` generations. Returns the generation served."""
    layout = Layout(site)
    files = node_files(site, host)
    warn_private_files(site, host)  # a Root FS file not world-readable: say it travels anyway
    gen = layout.node_generation(host, generation_name(files))
    if not is_complete(gen, files):
        write_generation(gen, files)
    fault_point("node-generation-renamed")
    link_node(layout.node_dir(host), gen.name)
    fault_point("node-linked")
    for old in older:
        if old != gen:
            discard(old, "node-discard-renamed")
    return gen


# What the bundle task served, per node directory: [its input key, the generation, the
# generation's stat key]. Build state kept beside doit's (Layout.bundle_table).
Served = dict[str, list[Any]]
TABLE_FORMAT = 1


class NodeBundles:
    """Every node's bundle, published by one doit task: 10,000 tasks cost doit seconds per
    build just to load and check, and a build after a one-node edit should cost that node.

    A node is due when its input key (render.BundleInputs) is not the one it was served with,
    or its link does not lead to the generation served then, as it was then (a link retargeted
    or removed, a file added to or deleted from the generation: the directory's stat key).
    The table is rewritten after the due nodes are published, so a killed build leaves the old
    entries, and their nodes are due again (and publish the same bytes)."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.layout = Layout(site)
        self.published: list[str] = []
        self._due: list[tuple[Host, str]] | None = None
        self.moved: list[str] = []
        self.written: set[str] = set()  # the node directories this build wrote (names)
        self.table: Served = {}
        # Each host's node directory name, in the hosts' order: asked for three times a build.
        self.names = [node_name(h) for h in site.hosts]

    def outputs(self) -> list[str]:
        """A file of every node's served directory, for the build stamp's view of the outputs
        (a node directory's key changes with its link or its generation)."""
        nodes = str(self.layout.nodes())
        return [f"{nodes}/{name}/{contract.BUNDLE_FILE}" for name in self.names]

    def settled(self) -> list[str]:
        """The served directories (as `outputs` names them) of the nodes this build left
        alone, when the stamp trusted the outputs: as the stamped build left them (for
        stamp.write)."""
        if not stamp.outputs_trusted():
            return []
        nodes = str(self.layout.nodes())
        return [f"{nodes}/{name}" for name in self.names if name not in self.written]

    def read_table(self) -> Served:
        try:
            doc = json.loads(self.layout.bundle_table.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
            return {}
        nodes = doc.get("nodes")
        return nodes if isinstance(nodes, dict) else {}

    def due(self) -> list[tuple[Host, str]]:
        """(host, its input key) of every node to publish; computed once per build. A node
        whose generation is as served but whose directory's stat key is not (a copied or
        restored site) is noted in `moved`, for the task to record again, not to publish."""
        if self._due is None:
            inputs = BundleInputs(self.site)
            self.table = self.read_table()
            nodes = str(self.layout.nodes())
            # Outputs as the stamped build left them: each node is served as its entry says.
            trusted = stamp.outputs_trusted()
            self._due = []
            for host, name in zip(self.site.hosts, self.names, strict=True):
                key = inputs.key(host)
                entry = self.table.get(name)
                served = (
                    entry is not None
                    and entry[0] == key
                    and (trusted or served_as(f"{nodes}/{name}", entry))
                )
                if served is None:
                    self.moved.append(name)
                elif not served:
                    self._due.append((host, key))
        return self._due

    def served_generations(self) -> dict[str, list[Path]]:
        """The generations of the nodes to publish, from the table alone: with the outputs
        as the stamped build left them, each node has the one generation its entry names (a
        build that failed to remove another wrote no stamp). Instead of listing 20,000
        entries of nodes/."""
        nodes = self.layout.nodes()
        return {
            name: [nodes / self.table[name][1]]
            for name in self.written
            if name in self.table and generation_of(self.table[name][1], name)
        }

    def up_to_date(self, task: Any, values: dict[str, Any]) -> bool:
        return not self.due() and not self.moved

    def publish(self) -> None:
        """Publish the due nodes, each on its own: a node that fails is reported together with
        every other that does, and the rest are served."""
        due = self.due()
        self.written = {node_name(h) for h, _ in due} | set(self.moved)
        older = (
            self.served_generations()
            if stamp.outputs_trusted()
            else generations_by_node(self.layout.nodes(), self.written)
        )
        problems = []
        for host, key in due:
            name = node_name(host)
            try:
                gen = publish_node(self.site, host, older.get(name, []))
            except ConfigError as e:
                problems += [f"{host.name}: {line}" for line in e.problems]
                continue
            except QlimageError as e:
                problems.append(f"{host.name}: {e}")
                continue
            self.table[name] = [key, gen.name, list(dir_key(gen))]
            self.published.append(host.name)
        for name in self.moved:
            self.table[name][2] = list(dir_key(self.layout.nodes() / name))
        if due or self.moved:
            wanted = set(self.names)
            table = {n: e for n, e in sorted(self.table.items()) if n in wanted}
            doc = {"format": TABLE_FORMAT, "nodes": table}
            write_text(self.layout.bundle_table, json.dumps(doc, separators=(",", ":")))
        if problems:
            raise ConfigError(problems)


def node_name(host: Host) -> str:
    """The node's directory name below nodes/ (Layout.node_dir's, without a Path per host)."""
    return host.mac.replace(":", "-").lower()


def dir_key(path: Path | str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


# What a node's generation holds (node_files).
GENERATION_FILES = sorted(
    [contract.BUNDLE_FILE, contract.checksum_name(contract.BUNDLE_FILE), contract.CHROOT_FILE]
)


def served_as(link: str, entry: list[Any]) -> bool | None:
    """Whether the node's link leads to the generation `entry` names, unchanged since; None
    when it does and the generation holds its files, but its directory is not the one served
    (its stat key differs: the site was copied or restored from a backup)."""
    try:
        if os.readlink(link) != entry[1]:
            return False
        if list(dir_key(link)) == entry[2]:
            return True
        return None if sorted(os.listdir(link)) == GENERATION_FILES else False
    except (OSError, IndexError):
        return False


def generations_by_node(nodes: Path, wanted: set[str]) -> dict[str, list[Path]]:
    """{node directory name: its generations} of the `wanted` nodes, from one listing of
    nodes/ (a glob per node would read the directory of every node once per node)."""
    out: dict[str, list[Path]] = {}
    try:
        names = os.listdir(nodes)
    except FileNotFoundError:
        return out
    for name in names:
        # Cheap test first: nodes/ holds two entries per node, and few nodes are wanted.
        mac = name[1:].partition(".")[0]
        if mac in wanted and generation_mac(name) == mac:
            out.setdefault(mac, []).append(nodes / name)
    return out


def generation_of(gen: Any, node: str) -> bool:
    """Whether `gen` (read from the table) names a generation of the node directory `node`:
    nothing else is ever discarded as one."""
    return isinstance(gen, str) and "/" not in gen and generation_mac(gen) == node


def generation_mac(name: str) -> str | None:
    """`.52-54-00-12-34-56.<digest>` -> the node directory name it belongs to."""
    if not name.startswith(".") or name.startswith(TMP_PREFIX) or name.count(".") != 2:
        return None
    return name.split(".")[1]


def write_generation(gen: Path, files: dict[str, bytes]) -> None:
    gen.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}node.", dir=gen.parent))
    try:
        os.chmod(work, 0o755)
        for file, data in files.items():
            write_bytes(work / file, data)
        fsync_tree(work)
        discard(gen)  # a broken leftover of the same name
        os.rename(work, gen)
        clamp_one(gen)  # here, not by clamp_served_dirs: it skips trusted node generations
    finally:
        if work.exists():
            discard(work)


def link_node(link: Path, target: str) -> None:
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_dir() and not link.is_symlink():
        # A node directory of an older layout: a real directory cannot be swapped for a link
        # by a rename, so it goes first (the node briefly gets a 404 and retries).
        discard(link)
    symlink(link, target)


def prune_nodes(layout: Layout, macs: list[str]) -> None:
    """Remove the link and the generations of every node directory not in `macs` (node_dir
    names): a machine booting with a MAC that left the inventory gets nothing, not the old
    node's identity and keys. Links go first, so nothing half deleted is ever served."""
    wanted = set(macs)
    nodes = layout.nodes()
    if not nodes.is_dir():
        return
    entries = sorted(nodes.iterdir())
    for entry in entries:
        if entry.name.startswith(".") or entry.name in wanted:
            continue
        if entry.is_symlink():
            entry.unlink()
        else:
            discard(entry)
        fault_point("node-unlinked")
    for entry in entries:
        mac = generation_mac(entry.name)
        if mac is not None and mac not in wanted:
            discard(entry)
