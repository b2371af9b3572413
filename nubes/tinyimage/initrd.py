"""The initrd's content: a static busybox, the stage-1 /init, and the modules it loads."""

from __future__ import annotations

from nubes.tinyimage.cpio import CpioEntry


def initrd_entries(
    busybox: bytes,
    init_script: bytes,
    modules: list[tuple[str, bytes]],
    applets: tuple[str, ...],
) -> list[CpioEntry]:
    """Everything in the initrd; `modules` are (name, content) in load order."""
    entries = [
        CpioEntry.file("init", init_script, 0o755),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        # The kernel opens /dev/console for /init before anything mounts devtmpfs.
        CpioEntry.directory("dev"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.directory("proc"),
        CpioEntry.directory("sys"),
        CpioEntry.directory("newroot"),
        CpioEntry.file("etc/modules", "".join(f"{name}\n" for name, _ in modules).encode()),
    ]
    entries += [CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in applets]
    entries += [CpioEntry.file(f"lib/modules/{name}.ko", data) for name, data in modules]
    return entries
