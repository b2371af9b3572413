"""Builds the tiny guest image into a cache directory, or finds it there already built.

Phases: resolve package versions and the cache key (cheap, no download); return the
cached image when its manifest and files are intact; otherwise download, assemble and
publish atomically, so a failed build leaves nothing half-made behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from nubes.process import run_tool
from nubes.tinyimage import debian, recipe
from nubes.tinyimage.cpio import build_initramfs
from nubes.tinyimage.disk import convert_to_qcow2, make_ext4
from nubes.tinyimage.errors import ImageBuildError, PackageUnavailable
from nubes.tinyimage.initrd import initrd_entries
from nubes.tinyimage.manifest import (
    MANIFEST_FILE,
    Manifest,
    compute_cache_key,
    describe_file,
    image_version,
    sha256_of_file,
    verify_files,
)
from nubes.tinyimage.modules import collect_modules
from nubes.tinyimage.rootfs import library_closure, rootfs_entries, write_tree

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
DISK_FILE = "disk.qcow2"
LATEST_LINK = "latest"
DOWNLOADS_DIRECTORY = "debs"

# Files of this package that do not shape the image, so editing them keeps the cache.
_NOT_IN_CACHE_KEY = frozenset({"__init__.py"})

T = TypeVar("T")


@dataclass(frozen=True)
class BuildResult:
    """Where the image is, what it is, and whether this call had to build it."""

    manifest: Manifest
    directory: Path
    cache_hit: bool
    seconds: float

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE


def default_cache_directory(environ: dict[str, str] | None = None) -> Path:
    """$NUBES_CACHE_DIR/images/tiny, else ${XDG_CACHE_HOME:-~/.cache}/nubes/images/tiny."""
    env = dict(os.environ) if environ is None else environ
    if env.get("NUBES_CACHE_DIR"):
        return Path(env["NUBES_CACHE_DIR"]) / "images" / "tiny"
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "nubes" / "images" / "tiny"


def _package_root() -> Path:
    return Path(str(resources.files("nubes.tinyimage")))


def builder_file_digests() -> dict[str, str]:
    """sha256 of every builder module and guest file, by path inside the package."""
    root = _package_root()
    digests = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or "__pycache__" in relative or relative in _NOT_IN_CACHE_KEY:
            continue
        digests[relative] = sha256_of_file(path)
    return digests


def _guest_rootfs_files() -> dict[str, bytes]:
    tree = _package_root() / "guest" / "rootfs"
    return {
        path.relative_to(tree).as_posix(): path.read_bytes()
        for path in sorted(tree.rglob("*"))
        if path.is_file()
    }


def _retrying_after_apt_update(action: Callable[[], T]) -> T:
    """Runs ACTION; when apt lacks a package and we are root, refreshes apt's lists once."""
    try:
        return action()
    except PackageUnavailable:
        if os.geteuid() != 0:
            raise
        run_tool(["apt-get", "update", "-qq"])
        return action()


def resolve_package_versions() -> dict[str, str]:
    """Debian package -> version for every package of the image, kernel included."""

    def resolve() -> dict[str, str]:
        _, kernel = debian.kernel_package(recipe.KERNEL_META_PACKAGE)
        return debian.candidate_versions(recipe.all_packages(kernel))

    return _retrying_after_apt_update(resolve)


def image_cache_key(versions: dict[str, str]) -> str:
    return compute_cache_key(recipe.BUILDER_VERSION, versions, builder_file_digests())


def _cached(directory: Path, cache_key: str) -> Manifest | None:
    """The manifest of an intact cached image with this key, else None."""
    try:
        manifest = Manifest.model_validate_json((directory / MANIFEST_FILE).read_text())
    except (OSError, ValidationError):
        return None
    if manifest.cache_key != cache_key or verify_files(manifest, directory):
        return None
    return manifest


@contextmanager
def _locked(cache_directory: Path) -> Iterator[None]:
    """One build per cache directory at a time; a second caller waits, then hits the cache."""
    try:
        cache_directory.mkdir(parents=True, exist_ok=True)
        lock = (cache_directory / ".lock").open("w")
    except OSError as error:
        raise ImageBuildError(
            f"cannot use {cache_directory} as the image cache: {error.strerror}",
            hint="pass a writable --cache-dir or set NUBES_CACHE_DIR",
        ) from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _point_latest_at(cache_directory: Path, directory: Path) -> None:
    link = cache_directory / LATEST_LINK
    temporary = cache_directory / f".{LATEST_LINK}.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(directory.name)
    temporary.replace(link)


def build_tiny_image(cache_directory: Path) -> BuildResult:
    """The tiny image in CACHE_DIRECTORY: built now, or found intact from an earlier build.

    Raises ImageBuildError (PackageUnavailable when apt cannot provide a package).
    """
    started = time.monotonic()
    with _locked(cache_directory):
        versions = resolve_package_versions()
        cache_key = image_cache_key(versions)
        directory = cache_directory / cache_key[:16]
        manifest = _cached(directory, cache_key)
        hit = manifest is not None
        if manifest is None:
            manifest = _build(cache_directory, directory, versions, cache_key)
        _point_latest_at(cache_directory, directory)
    return BuildResult(manifest, directory, hit, time.monotonic() - started)


def _build(
    cache_directory: Path, directory: Path, versions: dict[str, str], cache_key: str
) -> Manifest:
    downloads = cache_directory / DOWNLOADS_DIRECTORY
    debs = _retrying_after_apt_update(lambda: debian.download(versions, downloads))
    with tempfile.TemporaryDirectory(dir=cache_directory, prefix=".build-") as scratch:
        work = Path(scratch)
        output = work / "image"
        output.mkdir()
        packages = {
            name: debian.extract(deb, work / "packages" / name) for name, deb in debs.items()
        }
        kernel_release = _write_kernel(packages, versions, output / KERNEL_FILE)
        _write_initrd(packages, versions, kernel_release, output / INITRD_FILE)
        virtual_size = _write_disk(packages, work, output / DISK_FILE)
        manifest = Manifest(
            name=recipe.IMAGE_NAME,
            version=image_version(recipe.BUILDER_VERSION, cache_key),
            format="qcow2",
            architecture=recipe.ARCHITECTURE,
            disk=describe_file(output / DISK_FILE),
            kernel=describe_file(output / KERNEL_FILE),
            initrd=describe_file(output / INITRD_FILE),
            cmdline=recipe.KERNEL_COMMAND_LINE,
            root_fs_uuid=recipe.ROOT_FS_UUID,
            disk_virtual_size=virtual_size,
            kernel_release=kernel_release,
            packages=dict(sorted(versions.items())),
            builder_version=recipe.BUILDER_VERSION,
            cache_key=cache_key,
            source_date_epoch=recipe.SOURCE_DATE_EPOCH,
        )
        (output / MANIFEST_FILE).write_text(manifest.to_json())
        if directory.exists():
            shutil.rmtree(directory)
        output.rename(directory)
    _prune_downloads(downloads, debs.values())
    return manifest


def _kernel_package(versions: dict[str, str]) -> str:
    return next(name for name in versions if name.startswith("linux-image-"))


def _write_kernel(packages: dict[str, Path], versions: dict[str, str], target: Path) -> str:
    boot = packages[_kernel_package(versions)] / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one vmlinuz in the kernel package, found {kernels}")
    shutil.copyfile(kernels[0], target)
    return kernels[0].name.removeprefix("vmlinuz-")


def _write_initrd(
    packages: dict[str, Path], versions: dict[str, str], kernel_release: str, target: Path
) -> None:
    modules_directory = packages[_kernel_package(versions)] / "lib" / "modules" / kernel_release
    modules = collect_modules(modules_directory, recipe.INITRD_MODULES)
    busybox = (packages[recipe.BUSYBOX_PACKAGE] / "bin" / "busybox").read_bytes()
    init_script = (_package_root() / "guest" / "initrd-init").read_bytes()
    entries = initrd_entries(busybox, init_script, modules, recipe.INITRD_APPLETS)
    target.write_bytes(build_initramfs(entries, recipe.SOURCE_DATE_EPOCH))


def _library_finder(packages: dict[str, Path]) -> Callable[[str], bytes | None]:
    roots = [packages[name] for name in recipe.LIBRARY_PACKAGES]

    def find(soname: str) -> bytes | None:
        for root in roots:
            for directory in recipe.LIBRARY_DIRECTORIES:
                candidate = root / directory / soname
                if candidate.is_symlink() and os.readlink(candidate).startswith("/"):
                    candidate = root / os.readlink(candidate).lstrip("/")
                if candidate.is_file():
                    return candidate.read_bytes()
        return None

    return find


def _busybox_applets(busybox: Path) -> list[str]:
    # Debian's busybox is a host-architecture binary: asking it is the only exact list.
    return [name for name in run_tool([str(busybox), "--list"]).split() if "/" not in name]


def _write_disk(packages: dict[str, Path], work: Path, target: Path) -> int:
    programs = {
        program.target: (packages[program.package] / program.source).read_bytes()
        for program in recipe.ROOTFS_PROGRAMS
    }
    libraries = library_closure(programs.values(), _library_finder(packages))
    applets = _busybox_applets(packages[recipe.BUSYBOX_PACKAGE] / "bin" / "busybox")
    tree = work / "rootfs"
    tree.mkdir()
    write_tree(
        rootfs_entries(programs, libraries, applets, _guest_rootfs_files()),
        tree,
        recipe.SOURCE_DATE_EPOCH,
    )
    raw = work / "root.ext4"
    make_ext4(
        tree,
        raw,
        size_mib=recipe.ROOT_FS_SIZE_MIB,
        uuid=recipe.ROOT_FS_UUID,
        label=recipe.ROOT_FS_LABEL,
        epoch=recipe.SOURCE_DATE_EPOCH,
        mke2fs_config=_package_root() / "guest" / "mke2fs.conf",
    )
    return convert_to_qcow2(raw, target)


def _prune_downloads(downloads: Path, keep: Iterable[Path]) -> None:
    kept = {path.name for path in keep}
    for deb in downloads.glob("*.deb"):
        if deb.name not in kept:
            deb.unlink()
