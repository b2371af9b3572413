"""What the tiny guest image is made of: Debian packages, kernel modules, files, boot line.

Pure data and the small rules on it; the builder reads this and does the work. Anything
changed here changes the cache key, because this module is part of the builder's content.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_NAME = "nubes-tiny"
BUILDER_VERSION = "1"
ARCHITECTURE = "x86_64"

# Every timestamp inside the image (files, cpio entries, ext4 inodes and superblock).
SOURCE_DATE_EPOCH = 1_700_000_000

# The root filesystem's UUID and directory hash seed: fixed so that builds are
# reproducible and the kernel command line can name the root disk.
ROOT_FS_UUID = "6e756265-732d-7469-6e79-2d726f6f7466"
ROOT_FS_LABEL = "nubes-root"
ROOT_FS_SIZE_MIB = 256

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# One static busybox for initrd and root filesystem: built with SH_STANDALONE, its shell
# runs applets without exec'ing /bin/*, which makes the boot scripts much faster under TCG.
BUSYBOX_PACKAGE = "busybox-static"
ROOTFS_PROGRAM_PACKAGES = ("dropbear-bin",)
# Shared libraries the root filesystem's programs may need; the builder copies only
# the sonames that the programs actually ask for (DT_NEEDED closure).
LIBRARY_PACKAGES = ("libc6", "libcrypt1", "libtomcrypt1", "libtommath1", "libgmp10", "zlib1g")
LIBRARY_DIRECTORIES = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
DYNAMIC_LOADER = "ld-linux-x86-64.so.2"

# Loaded by the initrd, dependencies first: disks and NICs (virtio PCI), a virtio-scsi
# CD-ROM, the filesystems a NoCloud seed may use, virtio-rng for entropy, and the ACPI
# power button with the event device acpid reads it from (both modules in Debian's kernel).
INITRD_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_scsi",
    "virtio_rng",
    "sr_mod",
    "isofs",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "button",
    "evdev",
)

# Busybox applets the initrd's /init uses; each becomes a symlink to the static busybox.
INITRD_APPLETS = (
    "sh",
    "mount",
    "umount",
    "insmod",
    "findfs",
    "switch_root",
    "poweroff",
    "usleep",
    "cat",
    "echo",
    "mkdir",
)

# `quiet` and no waits: the kernel's console output slows a TCG boot noticeably; skipping
# the crypto self-tests saves about 0.4 s of TCG time; no legacy UART or i8042 probing.
KERNEL_COMMAND_LINE = (
    f"console=ttyS0 root=UUID={ROOT_FS_UUID} rw quiet panic=-1 "
    "8250.nr_uarts=1 i8042.noaux i8042.nokbd tsc=reliable no_timer_check cryptomgr.notests"
)


@dataclass(frozen=True)
class ProgramFile:
    """A file taken from a package into the root filesystem."""

    package: str
    source: str  # path inside the package
    target: str  # path inside the root filesystem
    mode: int = 0o755


ROOTFS_PROGRAMS = (
    ProgramFile(BUSYBOX_PACKAGE, "bin/busybox", "bin/busybox"),
    ProgramFile("dropbear-bin", "usr/sbin/dropbear", "bin/dropbear"),
    ProgramFile("dropbear-bin", "usr/bin/dropbearkey", "bin/dropbearkey"),
)


def all_packages(kernel_package: str) -> tuple[str, ...]:
    """Every Debian package the image is made from, given the resolved kernel package."""
    return (
        kernel_package,
        BUSYBOX_PACKAGE,
        *ROOTFS_PROGRAM_PACKAGES,
        *LIBRARY_PACKAGES,
    )
