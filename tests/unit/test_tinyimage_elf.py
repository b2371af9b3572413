"""ELF reading (module info, needed libraries), module load order and library closure."""

from __future__ import annotations

import struct

import pytest

from nubes.tinyimage.elf import ElfFormatError, module_dependencies, needed_libraries, read_modinfo
from nubes.tinyimage.errors import ImageBuildError
from nubes.tinyimage.modules import load_order, strip_module_signature
from nubes.tinyimage.rootfs import library_closure

SHT_PROGBITS, SHT_STRTAB, SHT_DYNAMIC = 1, 3, 6


def make_elf(sections: list[tuple[str, int, bytes, int]]) -> bytes:
    """A minimal ELF64 LSB file with SECTIONS (name, type, data, link), plus .shstrtab."""
    names = b"\0"
    name_offsets = []
    for name, *_ in [*sections, (".shstrtab", 0, b"", 0)]:
        name_offsets.append(len(names))
        names += name.encode() + b"\0"
    body = b""
    placed = []
    for _, kind, data, link in sections:
        placed.append((64 + len(body), len(data), kind, link))
        body += data
    placed.append((64 + len(body), len(names), SHT_STRTAB, 0))
    body += names
    section_offset = 64 + len(body)
    count = len(placed) + 1  # index 0 is the null section
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, section_offset, 0, 64, 0, 0, 64, count,
                          count - 1)  # fmt: skip
    table = b"\0" * 64
    for name_offset, (offset, size, kind, link) in zip(name_offsets, placed, strict=True):
        table += struct.pack("<IIQQQQIIQQ", name_offset, kind, 0, 0, offset, size, link, 0, 1, 0)
    return header + body + table


def make_module(depends: str) -> bytes:
    info = f"license=GPL\0depends={depends}\0name=test\0".encode()
    return make_elf([(".text", SHT_PROGBITS, b"\x90" * 8, 0), (".modinfo", SHT_PROGBITS, info, 0)])


def make_program(*needed: str) -> bytes:
    strings = b"\0"
    dynamic = b""
    for soname in needed:
        dynamic += struct.pack("<qQ", 1, len(strings))
        strings += soname.encode() + b"\0"
    dynamic += struct.pack("<qQ", 0, 0)
    # .dynstr is section 1 (after the null section), so .dynamic links to it.
    return make_elf([(".dynstr", SHT_STRTAB, strings, 0), (".dynamic", SHT_DYNAMIC, dynamic, 1)])


def test_a_modules_info_and_dependencies_are_read_from_its_modinfo_section() -> None:
    module = make_module("virtio_ring,virtio")
    assert read_modinfo(module)["license"] == ["GPL"]
    assert module_dependencies(module) == ["virtio_ring", "virtio"]
    assert module_dependencies(make_module("")) == []


def test_needed_libraries_come_from_the_dynamic_section() -> None:
    assert needed_libraries(make_program("libz.so.1", "libc.so.6")) == ["libz.so.1", "libc.so.6"]
    static = make_elf([(".text", SHT_PROGBITS, b"\x90", 0)])
    assert needed_libraries(static) == []


def test_files_that_are_not_elf64_are_refused() -> None:
    with pytest.raises(ElfFormatError):
        read_modinfo(b"#!/bin/sh\n")
    with pytest.raises(ElfFormatError, match="modinfo"):
        read_modinfo(make_program("libc.so.6"))


def test_modules_load_after_their_dependencies_each_once() -> None:
    graph = {
        "virtio_pci": ["virtio_ring", "virtio"],
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio_ring": [],
        "virtio": [],
        "virtio_rng": [],
    }
    order = load_order(["virtio_pci", "virtio-blk", "virtio-rng"], lambda name: graph[name])
    assert order == ["virtio", "virtio_ring", "virtio_pci", "virtio_blk", "virtio_rng"]


def test_a_module_dependency_cycle_is_an_error() -> None:
    with pytest.raises(ImageBuildError, match="cycle"):
        load_order(["a"], lambda name: {"a": ["b"], "b": ["a"]}[name])


def test_an_appended_module_signature_is_stripped() -> None:
    module = make_module("")
    signature = b"S" * 40
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(signature).to_bytes(4, "big")
    signed = module + signature + info + b"~Module signature appended~\n"
    assert strip_module_signature(signed) == module
    assert strip_module_signature(module) == module


def test_the_library_closure_follows_libraries_that_need_libraries() -> None:
    libraries = {
        "libtomcrypt.so.1": make_program("libtommath.so.1", "libc.so.6"),
        "libtommath.so.1": make_program("libc.so.6"),
        "libc.so.6": make_program("ld-linux-x86-64.so.2"),
        "ld-linux-x86-64.so.2": make_program(),
        "libunused.so.1": make_program(),
    }
    closure = library_closure([make_program("libtomcrypt.so.1"), b"#!/bin/sh\n"], libraries.get)
    assert set(closure) == set(libraries) - {"libunused.so.1"}


def test_a_library_missing_from_every_package_is_an_error() -> None:
    with pytest.raises(ImageBuildError, match=r"libgone\.so\.1"):
        library_closure([make_program("libgone.so.1")], lambda soname: None)
