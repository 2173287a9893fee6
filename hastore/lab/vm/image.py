"""The guest image: a Debian 12 kernel with drbd.ko and a whole root filesystem packed as an initramfs.

``ensure_image()`` returns an `Image` (kernel + initramfs paths), building it first when the cache has none for
the current inputs.  Cache: /var/cache/hastore-vm/<key>/ where key hashes everything the image is made of (the
package list from vagrant/provision.sh, the kernel package version, the guest init script, the inittab and
this module's build recipe version).  The rest of provision.sh is not part of the key: the guests run it from
the 9p share, so editing it needs no rebuild.  Nothing is installed on the host: the kernel package is fetched with
`apt-get download` and unpacked with `dpkg -x`; the root is made by mmdebstrap into a scratch directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE = Path("/var/cache/hastore-vm")
CHECKOUT = Path(__file__).resolve().parents[3]
PROVISION = CHECKOUT / "vagrant" / "provision.sh"
GUEST_INIT = Path(__file__).with_name("guest-init.sh")
RECIPE = 2  # bump when the build steps below change in a way the other inputs do not show
# The guest's PID 1 is busybox init: run the setup once, then keep the command server (from the 9p share, so it is
# the checkout's code) and a shell on the console alive.
INITTAB = """::sysinit:/etc/hastore-init
::respawn:/usr/bin/python3 /hastore/hastore/lab/vm/ctlserver.py
ttyS0::respawn:-/bin/bash
::ctrlaltdel:/bin/busybox reboot -f
"""
# The kernel modules the guest loads (virtio, 9p, DRBD); their dependencies come along.  The other 300 MB of
# modules would only cost RAM, since the whole root lives in it.
MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_console", "9pnet_virtio", "9p", "drbd",
           "crc32c_generic", "crc32c-intel", "ext4", "nfsd", "nfsv3")
# Files of the root the lab never uses; the root must stay well under half the guest's RAM (the tmpfs it unpacks
# into).  MariaDB runs on /data/mysql, so its own datadir and tools other than server, client, admin and
# install-db stay out, and so does perl (only perl-base is needed).
PRUNE = ("var/lib/mysql/*", "var/lib/apt/lists/*", "var/cache/apt/*", "usr/bin/aria_*", "usr/bin/myisam*",
         "usr/bin/mariadb-binlog", "usr/bin/mariadb-slap", "usr/bin/mariadb-dump", "usr/bin/mariadb-import",
         "usr/bin/mariadb-check", "usr/bin/mariadb-show", "usr/bin/mariadb-upgrade", "usr/bin/mariadb-plugin",
         "usr/bin/mariadb-conv", "usr/bin/mariadb-tzinfo-to-sql", "usr/bin/mariadb-waitpid",
         "usr/bin/mariadbd-safe-helper", "usr/bin/innochecksum", "usr/bin/perror", "usr/bin/replace",
         "usr/bin/resolve_stack_dump", "usr/bin/perl5.*", "usr/lib/x86_64-linux-gnu/perl",
         "usr/lib/x86_64-linux-gnu/libperl.so*", "usr/share/perl", "usr/lib/libgalera*",
         "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/ensurepip",
         "usr/lib/python3.11/idlelib", "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/config-*")
KERNEL_PKG = re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$")


class ImageError(RuntimeError):
    """The image could not be built; the message names the step and its output."""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


def packages() -> list[str]:
    """The guest package list, as vagrant/provision.sh prints it."""
    out = _run(["bash", str(PROVISION), "package-list"]).stdout
    return out.split()


def newest_kernel() -> tuple[str, str]:
    """(package name, package version) of the newest Debian 6.1 amd64 kernel apt knows."""
    names = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"]).stdout
    found = [m for line in names.splitlines() if (m := KERNEL_PKG.match(line.split(" ", 1)[0]))]
    if not found:
        raise ImageError("apt knows no linux-image-6.1.0-*-amd64 (run apt-get update)")
    pkg = "linux-image-" + max(found, key=lambda m: int(m.group(2))).group(1)
    policy = _run(["apt-cache", "policy", pkg]).stdout
    version = re.search(r"Candidate:\s*(\S+)", policy)
    return pkg, version.group(1) if version else "unknown"


def cache_key(pkgs: list[str], kernel: tuple[str, str]) -> str:
    h = hashlib.sha256()
    for part in (str(RECIPE), " ".join(sorted(pkgs)), f"{kernel[0]}={kernel[1]}", GUEST_INIT.read_text(),
                 INITTAB, " ".join(MODULES), " ".join(PRUNE)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def ensure_image(cache: Path = CACHE) -> Image:
    """The cached image for the current inputs, built first if missing (concurrent callers wait for one build)."""
    pkgs, kernel = packages(), newest_kernel()
    key = cache_key(pkgs, kernel)
    d = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "image.json").exists():
            t0 = time.monotonic()
            build(d, pkgs, kernel)
            log.info("built guest image %s in %.1f s", d, time.monotonic() - t0)
    meta = json.loads((d / "image.json").read_text())
    return Image(d / "vmlinuz", d / "initrd.img", meta["kernel_version"], key)


def build(d: Path, pkgs: list[str], kernel: tuple[str, str]) -> None:
    """Build the image into directory d (replaced atomically: a half-built image is never used)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}-", dir=d.parent))
    try:
        version = _unpack_kernel(tmp, kernel[0])
        root = tmp / "root"
        _debootstrap(root, pkgs)
        _install_modules(tmp / "kernel", root, version)
        _install_init(root)
        _prune(root)
        _pack(root, tmp / "initrd.img")
        shutil.copy(tmp / "kernel" / "boot" / f"vmlinuz-{version}", tmp / "vmlinuz")
        shutil.rmtree(root)
        shutil.rmtree(tmp / "kernel")
        (tmp / "image.json").write_text(json.dumps({"kernel_version": version, "kernel_package": kernel,
                                                    "packages": pkgs}))
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _unpack_kernel(tmp: Path, pkg: str) -> str:
    dl = tmp / "deb"
    dl.mkdir()
    _run(["apt-get", "download", "-q", pkg], cwd=dl)
    deb = next(dl.glob("*.deb"))
    _run(["dpkg", "-x", str(deb), str(tmp / "kernel")])
    deb.unlink()
    dl.rmdir()
    return pkg.removeprefix("linux-image-")


def _debootstrap(root: Path, pkgs: list[str]) -> None:
    excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale", "info")]
    _run(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory", "--quiet", *excludes,
          f"--include={','.join(pkgs)}", "bookworm", str(root)], timeout=900)


def _install_modules(kernel: Path, root: Path, version: str) -> None:
    """Copy MODULES and what they depend on (modinfo's depends field) into the root, then depmod there."""
    src = kernel / "lib" / "modules" / version
    dst = root / "lib" / "modules" / version
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in src.rglob("*.ko")}
    todo, done = [m.replace("-", "_") for m in MODULES], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        if name not in by_name:
            raise ImageError(f"kernel {version} has no module {name}")
        done.add(name)
        path = by_name[name]
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        deps = _run(["modinfo", "-F", "depends", str(path)]).stdout.strip()
        todo += [d.replace("-", "_") for d in deps.split(",") if d]
    for f in src.glob("modules.*"):
        shutil.copy(f, dst / f.name)
    _run(["chroot", str(root), "/sbin/depmod", "-a", version])


def _install_init(root: Path) -> None:
    shutil.copy(GUEST_INIT, root / "etc" / "hastore-init")
    (root / "etc" / "hastore-init").chmod(0o755)
    (root / "etc" / "inittab").write_text(INITTAB)
    init = root / "init"  # busybox acts as init only when argv[0] says so: this script makes sure
    init.write_text("#!/bin/sh\nexec /bin/busybox init\n")
    init.chmod(0o755)
    for d in ("hastore", "data"):
        (root / d).mkdir(exist_ok=True)


def _prune(root: Path) -> None:
    for pattern in PRUNE:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _pack(root: Path, out: Path) -> None:
    """The root as a zstd-compressed newc cpio archive (the kernel unpacks it into its tmpfs rootfs)."""
    with open(out, "wb") as f:
        find = subprocess.Popen(["find", ".", "-print0"], cwd=root, stdout=subprocess.PIPE)
        cpio = subprocess.Popen(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root, stdin=find.stdout,
                                stdout=subprocess.PIPE)
        find.stdout.close()
        zstd = subprocess.Popen(["zstd", "-q", "-T0", "-6"], stdin=cpio.stdout, stdout=f)
        cpio.stdout.close()
        rcs = (zstd.wait(), cpio.wait(), find.wait())
    if any(rcs):
        raise ImageError(f"packing the initramfs failed (find, cpio, zstd exit {rcs[::-1]})")


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ImageError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if r.returncode != 0:
        raise ImageError(f"`{' '.join(argv)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r
