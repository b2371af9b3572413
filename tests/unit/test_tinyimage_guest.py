"""The guest's metadata parsers (awk) and the root filesystem's layout.

The awk programs run in the guest under busybox awk; here they run under the host's
awk, which speaks the same POSIX language (the boot tests cover busybox itself).
"""

from __future__ import annotations

import json
import stat
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from nubes.tinyimage.builder import builder_file_digests, default_cache_directory
from nubes.tinyimage.rootfs import rootfs_entries

GUEST = Path(str(resources.files("nubes.tinyimage"))) / "guest"


def run_awk(program: str, text: str) -> list[tuple[str, str]]:
    output = subprocess.run(
        ["awk", "-f", str(GUEST / "rootfs" / "usr" / "lib" / "nubes" / program)],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(line.split("\t", 1)) for line in output.splitlines()]  # type: ignore[misc]


def test_openstack_meta_data_is_flattened_to_paths_and_values() -> None:
    document = {
        "uuid": "8d9c4ad2-39c4",
        "hostname": "vm-1",
        "public_keys": {"k1": "ssh-ed25519 AAAA one\n", "k2": 'ssh-rsa BBBB "two"'},
        "keys": [{"data": "ssh-ed25519 CCCC", "type": "ssh"}],
        "launch_index": 0,
        "meta": {"empty": {}, "list": [], "flag": True, "nothing": None},
    }
    pairs = run_awk("jsonflat.awk", json.dumps(document, indent=1))
    assert ("uuid", "8d9c4ad2-39c4") in pairs
    assert ("hostname", "vm-1") in pairs
    assert ("public_keys.k1", "ssh-ed25519 AAAA one") in pairs
    assert ("public_keys.k2", 'ssh-rsa BBBB "two"') in pairs
    assert ("keys.0.data", "ssh-ed25519 CCCC") in pairs
    assert ("launch_index", "0") in pairs
    assert ("meta.flag", "true") in pairs
    assert ("meta.nothing", "null") in pairs


def test_nocloud_meta_data_and_cloud_config_keys_are_read() -> None:
    meta_data = (
        "# NoCloud meta-data\n"
        "instance-id: 'i-0abc'\n"
        'local-hostname: "vm-2"\n'
        "public-keys:\n"
        "  - ssh-ed25519 AAAA one\n"
        "- ssh-ed25519 BBBB two\n"
        "other: x\n"
    )
    pairs = run_awk("yamlkeys.awk", meta_data)
    assert pairs == [
        ("instance-id", "i-0abc"),
        ("local-hostname", "vm-2"),
        ("public-keys", "ssh-ed25519 AAAA one"),
        ("public-keys", "ssh-ed25519 BBBB two"),
        ("other", "x"),
    ]
    cloud_config = "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 CCCC\n"
    assert run_awk("yamlkeys.awk", cloud_config) == [("ssh_authorized_keys", "ssh-ed25519 CCCC")]


def test_the_root_filesystem_has_busybox_applets_init_and_private_secrets() -> None:
    entries = rootfs_entries(
        {"bin/busybox": b"B", "bin/dropbear": b"D"},
        {"libc.so.6": b"C"},
        ["sh", "init", "dropbear", "busybox"],
        {"etc/shadow": b"root:*:", "usr/lib/nubes/boot": b"#!/bin/sh\n", "etc/passwd": b"r"},
    )
    by_path = {entry.path: entry for entry in entries}
    assert by_path["bin/sh"].data == b"busybox"
    assert stat.S_ISLNK(by_path["bin/sh"].mode)
    assert by_path["sbin"].data == b"bin"  # so /sbin/init is busybox init
    assert stat.S_ISREG(by_path["bin/dropbear"].mode)  # the program wins over an applet
    assert stat.S_IMODE(by_path["etc/shadow"].mode) == 0o600
    assert stat.S_IMODE(by_path["usr/lib/nubes/boot"].mode) == 0o755
    assert stat.S_IMODE(by_path["root/.ssh"].mode) == 0o700
    assert by_path["lib/x86_64-linux-gnu/libc.so.6"].data == b"C"
    assert len(by_path) == len(entries)


def test_every_guest_script_is_executable_in_the_root_filesystem() -> None:
    # init, acpid and udhcpc exec these directly: a script left 0644 fails only in the guest.
    tree = GUEST / "rootfs"
    guest_files = {
        path.relative_to(tree).as_posix(): path.read_bytes()
        for path in tree.rglob("*")
        if path.is_file()
    }
    scripts = {path for path, data in guest_files.items() if data.startswith(b"#!")}
    assert {"usr/lib/nubes/shutdown", "etc/acpi/power-button"} <= scripts
    entries = rootfs_entries({}, {}, [], guest_files)
    modes = {entry.path: oct(stat.S_IMODE(entry.mode)) for entry in entries}
    assert {path: modes[path] for path in scripts} == dict.fromkeys(scripts, oct(0o755))


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"NUBES_CACHE_DIR": "/srv/nc", "HOME": "/h"}, "/srv/nc/images/tiny"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/nubes/images/tiny"),
        ({"HOME": "/h"}, "/h/.cache/nubes/images/tiny"),
    ],
)
def test_the_default_cache_directory_follows_the_environment(
    environ: dict[str, str], expected: str
) -> None:
    assert default_cache_directory(environ) == Path(expected)


def test_guest_files_and_builder_code_shape_the_cache_key() -> None:
    digests = builder_file_digests()
    assert "guest/rootfs/usr/lib/nubes/boot" in digests
    assert "guest/initrd-init" in digests
    assert "builder.py" in digests
    assert not any("__pycache__" in path for path in digests)
