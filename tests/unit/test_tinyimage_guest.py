"""The guest's metadata parsers (awk), disk hotplug reports, boot order and the root
filesystem's layout.

The awk programs run in the guest under busybox awk; here they run under the host's
awk, which speaks the same POSIX language (the boot tests cover busybox itself); so does
disk-event under the host's sh (the hotplug tests cover it in the guest).
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
GUEST_SCRIPTS = GUEST / "rootfs" / "usr" / "lib" / "nubes"
BOOT_SCRIPT = GUEST_SCRIPTS / "boot"
DISK_EVENT = GUEST_SCRIPTS / "disk-event"


def run_awk(program: str, text: str) -> list[tuple[str, str]]:
    output = subprocess.run(
        ["awk", "-f", str(GUEST_SCRIPTS / program)],
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
    assert {
        "usr/lib/nubes/shutdown",
        "usr/lib/nubes/disk-event",
        "etc/acpi/power-button",
    } <= scripts
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
    guest_files = {
        path.relative_to(GUEST.parent).as_posix() for path in GUEST.rglob("*") if path.is_file()
    }
    assert {"guest/rootfs/usr/lib/nubes/disk-event", "guest/initrd-init"} <= guest_files
    assert guest_files <= set(digests)
    assert "builder.py" in digests
    assert not any("__pycache__" in path for path in digests)


def test_the_boot_script_says_booted_once_the_power_button_and_disk_listener_run() -> None:
    # `booted` promises the compute tests that system_powerdown and hotplug now work.
    top_level = [line for line in BOOT_SCRIPT.read_text().splitlines() if line[:1].isalpha()]
    steps = [
        "mount_filesystems",
        "start_disk_listener",
        "start_power_button_listener",
        'say "booted $(uptime_seconds)"',
        "if read_nocloud_seed || read_metadata_service; then",
    ]
    assert [top_level.index(step) for step in steps] == sorted(
        top_level.index(step) for step in steps
    )


def run_disk_event(tmp_path: Path, environment: dict[str, str], serial: bytes | None) -> str:
    """disk-event under the host's sh, its `say` going to stdout and /sys/block to a
    directory of ours that holds the disk's serial file."""
    common = tmp_path / "common.sh"
    common.write_text('say() { echo "nubes-guest: $*"; }\n')
    block = tmp_path / "block"
    name = environment.get("DEVNAME", "")
    (block / name).mkdir(parents=True, exist_ok=True)
    if serial is not None:
        (block / name / "serial").write_bytes(serial)
    script = DISK_EVENT.read_text()
    assert ". /usr/lib/nubes/common.sh\n" in script
    assert '"/sys/block/$name/serial"' in script
    script = script.replace(". /usr/lib/nubes/common.sh", f". {common}")
    script = script.replace("/sys/block/", f"{block}/")
    completed = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout


DISK = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "vdb"}


@pytest.mark.parametrize(
    ("environment", "serial", "expected"),
    [
        ({**DISK, "ACTION": "add"}, b"vol-test", "nubes-guest: disk-added vdb vol-test\n"),
        ({**DISK, "ACTION": "add"}, b"", "nubes-guest: disk-added vdb -\n"),
        ({**DISK, "ACTION": "add"}, None, "nubes-guest: disk-added vdb -\n"),
        ({**DISK, "ACTION": "add"}, b"a b\tc\n", "nubes-guest: disk-added vdb a_b_c\n"),
        ({**DISK, "ACTION": "remove"}, None, "nubes-guest: disk-removed vdb\n"),
        ({**DISK, "ACTION": "change"}, b"x", ""),
        ({**DISK, "ACTION": "add", "DEVTYPE": "partition", "DEVNAME": "vdb1"}, b"x", ""),
        ({**DISK, "ACTION": "add", "DEVNAME": "loop0"}, b"x", ""),
        ({"ACTION": "add", "SUBSYSTEM": "pci", "DEVNAME": ""}, None, ""),
    ],
    ids=[
        "added",
        "added-empty-serial",
        "added-no-serial-file",
        "added-serial-with-spaces",
        "removed",
        "changed-is-ignored",
        "partition-is-ignored",
        "loop-disk-is-ignored",
        "pci-device-is-ignored",
    ],
)
def test_disk_events_report_virtio_disks_coming_and_going(
    tmp_path: Path, environment: dict[str, str], serial: bytes | None, expected: str
) -> None:
    assert run_disk_event(tmp_path, environment, serial) == expected
