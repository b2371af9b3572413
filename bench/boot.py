"""Tiny guest boot benchmark: seconds from QEMU's start to `dhcp-bound` and `ssh-ready`.

    .venv/bin/python -m bench.boot [--runs 5] [--source metadata|nocloud] [--machine q35]
                                    [--cache-dir DIR] [--json]

Needs root (each run boots the tiny image under TCG in its own network namespace with
dnsmasq, like the integration tests). Builds the image first, or finds it in the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from nubes.tinyimage.builder import BuildResult, build_tiny_image, default_cache_directory
from tests.support.guest_lab import GuestLab

BOOT_TIMEOUT = 120
EVENTS = ("dhcp-bound", "ssh-ready")


def boot_once(image: BuildResult, source: str, machine: str) -> dict[str, float]:
    """One boot; seconds from QEMU's start to each event, and the guest's own uptime."""
    with GuestLab(image.manifest, image.directory) as lab:
        lab.start_dnsmasq()
        seed = None
        if source == "nocloud":
            seed = lab.make_seed_iso(
                f"instance-id: i-0bench0001\npublic-keys:\n  - {lab.public_key}\n", None
            )
        else:
            meta_data = {"uuid": "i-0bench0001", "public_keys": {"bench": lab.public_key}}
            lab.start_metadata_responder(
                {"/openstack/latest/meta_data.json": json.dumps(meta_data)}
            )
        console = lab.boot(seed_iso=seed, machine=machine)
        figures = {event: console.wait_for(event, BOOT_TIMEOUT).seconds for event in EVENTS}
        figures["guest-uptime-at-dhcp"] = float(console.event_arguments("dhcp-bound", 1)[1])
        return figures


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "median": round(statistics.median(run[key] for run in runs), 2),
            "min": round(min(run[key] for run in runs), 2),
            "max": round(max(run[key] for run in runs), 2),
        }
        for key in runs[0]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.boot", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--source", choices=["metadata", "nocloud"], default="metadata")
    parser.add_argument("--machine", default="q35")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)

    image = build_tiny_image(options.cache_dir or default_cache_directory())
    runs = []
    for number in range(1, options.runs + 1):
        run = boot_once(image, options.source, options.machine)
        runs.append(run)
        if not options.json:
            print(
                f"run {number}: dhcp-bound {run['dhcp-bound']:.2f} s, "
                f"ssh-ready {run['ssh-ready']:.2f} s",
                file=sys.stderr,
            )
    summary = summarize(runs)
    if options.json:
        print(json.dumps({"image": image.manifest.version, "runs": runs, "summary": summary}))
        return 0
    print(
        f"tiny guest boot under TCG ({options.machine}, metadata from {options.source}, "
        f"{options.runs} runs, image {image.manifest.version})"
    )
    print(f"{'from QEMU start to':<24}{'median':>8}{'min':>8}{'max':>8}")
    for key, figures in summary.items():
        print(f"{key:<24}{figures['median']:>8.2f}{figures['min']:>8.2f}{figures['max']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
