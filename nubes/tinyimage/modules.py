"""Kernel modules for the initrd: find them in the kernel package, order them for insmod.

Busybox's insmod loads one file and knows nothing of dependencies, so the builder
computes the load order from each module's `depends=` field (no depmod on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from nubes.tinyimage.elf import module_dependencies
from nubes.tinyimage.errors import ImageBuildError


def canonical_module_name(name: str) -> str:
    """Module names treat `-` and `_` alike (virtio-rng.ko is the module virtio_rng)."""
    return name.replace("-", "_")


def load_order(wanted: Iterable[str], dependencies_of: Callable[[str], list[str]]) -> list[str]:
    """WANTED and everything they depend on, each after its dependencies, no repeats.

    Raises ImageBuildError on a dependency cycle.
    """
    ordered: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = canonical_module_name(name)
        if name in done:
            return
        if name in visiting:
            raise ImageBuildError(f"kernel module dependency cycle through {name}")
        visiting.add(name)
        for dependency in sorted(dependencies_of(name)):
            visit(dependency)
        visiting.discard(name)
        done.add(name)
        ordered.append(name)

    for name in wanted:
        visit(name)
    return ordered


def index_modules(modules_directory: Path) -> dict[str, Path]:
    """Canonical module name -> .ko file, for every module under MODULES_DIRECTORY."""
    return {
        canonical_module_name(path.name.removesuffix(".ko")): path
        for path in sorted(modules_directory.rglob("*.ko"))
    }


def collect_modules(modules_directory: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """(name, content) of WANTED and their dependencies, in load order.

    Raises ImageBuildError when a module is not in the kernel package.
    """
    index = index_modules(modules_directory)
    contents: dict[str, bytes] = {}

    def content(name: str) -> bytes:
        if name not in contents:
            if name not in index:
                raise ImageBuildError(f"kernel module {name} is not in the kernel package")
            contents[name] = index[name].read_bytes()
        return contents[name]

    order = load_order(wanted, lambda name: module_dependencies(content(name)))
    return [(name, strip_module_signature(content(name))) for name in order]


_SIGNATURE_MARKER = b"~Module signature appended~\n"
_SIGNATURE_INFO_SIZE = 12  # struct module_signature


def strip_module_signature(data: bytes) -> bytes:
    """The module without its appended signature, which the guest kernel would check on
    every insmod (slow under TCG) but does not require; unsigned data comes back as is."""
    if not data.endswith(_SIGNATURE_MARKER):
        return data
    info_end = len(data) - len(_SIGNATURE_MARKER)
    info = data[info_end - _SIGNATURE_INFO_SIZE : info_end]
    signer_length, key_id_length = info[3], info[4]
    signature_length = int.from_bytes(info[8:12], "big")
    start = info_end - _SIGNATURE_INFO_SIZE - signature_length - signer_length - key_id_length
    if start <= 0:
        raise ImageBuildError("malformed module signature")
    return data[:start]
