"""The smallest guest a test can run by the hundred: a "kernel" that halts at once, and a
small qcow2 disk, registered as an image. QEMU loads it as a Linux bzImage, so it passes
the image checks, and its whole code is `cli; hlt; jmp back`: it idles with no CPU.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from nubes.agent.storage.images import import_image
from nubes.model.image import ImageRecord
from nubes.store.base import Store

SECTOR = 512
SETUP_SECTORS = 1  # the real-mode setup after the boot sector: where the code lives
CODE_OFFSET = 0x280  # past the setup header of protocol 2.02
HALT_CODE = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp short back to the hlt


def halt_kernel() -> bytes:
    """A bzImage whose setup code halts the CPU: QEMU's Linux loader jumps to the setup
    at offset 0x200, which jumps over the header to `cli; hlt`.

    The layout is the boot protocol's (Documentation/arch/x86/boot.rst): setup_sects at
    0x1f1, the 0xAA55 boot flag at 0x1fe, a short jump at 0x200, "HdrS" and the protocol
    version at 0x202, loadflags (LOADED_HIGH) at 0x211; then one sector of "kernel".
    """
    image = bytearray((1 + SETUP_SECTORS) * SECTOR + SECTOR)
    image[0x1F1] = SETUP_SECTORS
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = bytes([0xEB, CODE_OFFSET - 0x202])  # jmp short to the code
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x0202)
    image[0x211] = 0x01  # LOADED_HIGH: the protected-mode part at 1 MiB
    image[CODE_OFFSET : CODE_OFFSET + len(HALT_CODE)] = HALT_CODE
    return bytes(image)


def build_halt_files(directory: Path) -> tuple[Path, Path]:
    """Writes the halting kernel and a 16 MiB qcow2 disk under `directory`.

    Raises:
        subprocess.CalledProcessError: qemu-img failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    kernel = directory / "halt.bzImage"
    kernel.write_bytes(halt_kernel())
    disk = directory / "halt.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
        check=True,
        capture_output=True,
    )
    return kernel, disk


async def register_halt_image(
    store: Store, image_dir: Path, work_dir: Path, name: str = "halt"
) -> ImageRecord:
    """Builds the halting image in `work_dir` and imports it into `image_dir` (the image
    store of the hosts that run it) as a public image named `name`.

    Raises:
        subprocess.CalledProcessError: qemu-img failed.
        NubesError: the import refused it (see import_image).
    """
    kernel, disk = build_halt_files(work_dir)
    return await import_image(
        store, image_dir, str(disk), name=name, kernel=str(kernel), cmdline="halt", public=True
    )
