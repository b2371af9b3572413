"""Just enough ELF reading for the builder: a module's `.modinfo` and a binary's DT_NEEDED.

The host may have neither kmod nor binutils, and the builder must not depend on the
host's tools reading foreign files; ELF64 little-endian (x86_64) is all it meets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_SHT_DYNAMIC = 6
_DT_NULL = 0
_DT_NEEDED = 1


class ElfFormatError(ValueError):
    """The bytes are not an ELF64 little-endian file the builder can read."""


@dataclass(frozen=True)
class _Section:
    name: str
    kind: int
    offset: int
    size: int
    link: int


def _sections(data: bytes) -> list[_Section]:
    if data[:4] != _ELF_MAGIC:
        raise ElfFormatError("not an ELF file")
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ElfFormatError("only ELF64 little-endian files are supported")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for index in range(shnum):
        base = shoff + index * shentsize
        name_offset, kind = struct.unpack_from("<II", data, base)
        offset, size, link = struct.unpack_from("<QQI", data, base + 0x18)
        raw.append((name_offset, kind, offset, size, link))
    if shstrndx >= len(raw):
        raise ElfFormatError("section name table index out of range")
    names_offset = raw[shstrndx][2]
    sections = []
    for name_offset, kind, offset, size, link in raw:
        start = names_offset + name_offset
        name = data[start : data.index(b"\0", start)].decode("ascii", "replace")
        sections.append(_Section(name, kind, offset, size, link))
    return sections


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """The `key=value` strings of a kernel module's `.modinfo` section, grouped by key.

    Raises ElfFormatError when the file is not ELF64 or has no `.modinfo` section.
    """
    for section in _sections(data):
        if section.name == ".modinfo":
            blob = data[section.offset : section.offset + section.size]
            info: dict[str, list[str]] = {}
            for entry in blob.split(b"\0"):
                key, sep, value = entry.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ElfFormatError("no .modinfo section: not a kernel module")


def module_dependencies(data: bytes) -> list[str]:
    """Names of the modules this module needs loaded first (its `depends=` field)."""
    values = read_modinfo(data).get("depends", [""])
    return [name for name in ",".join(values).split(",") if name]


def needed_libraries(data: bytes) -> list[str]:
    """Sonames a dynamically linked binary or library asks for (DT_NEEDED), in order.

    A static binary has no dynamic section and needs nothing.
    """
    sections = _sections(data)
    for section in sections:
        if section.kind != _SHT_DYNAMIC:
            continue
        strings = sections[section.link]
        needed = []
        for base in range(section.offset, section.offset + section.size, 16):
            tag, value = struct.unpack_from("<qQ", data, base)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                start = strings.offset + value
                needed.append(data[start : data.index(b"\0", start)].decode("ascii"))
        return needed
    return []


def is_elf(data: bytes) -> bool:
    """Whether the bytes start like an ELF file."""
    return data[:4] == _ELF_MAGIC
