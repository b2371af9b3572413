"""Compute: QEMU command lines, processes, QMP sessions and cgroups."""
