"""Booting the tiny image under QEMU (TCG) on a namespace with dnsmasq: the guest contract."""

from __future__ import annotations

import json

import pytest

from tests.support.guest_lab import GUEST_IPV4, IPV6_PREFIX, GuestLab, SerialConsole

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 120
# A distinctive exit code, so a guest that only pretends to run user-data cannot pass.
USER_DATA_EXIT_CODE = 73
USER_DATA = f"""#!/bin/sh
echo "user-data ran as $(id -u)" > /root/user-data-proof
exit {USER_DATA_EXIT_CODE}
"""


def ec2_documents(bed: GuestLab, instance_id: str, hostname: str) -> dict[str, str]:
    return {
        "/latest/meta-data/instance-id": instance_id,
        "/latest/meta-data/hostname": f"{hostname}.nubes.internal",
        "/latest/meta-data/public-keys/": "0=test-key",
        "/latest/meta-data/public-keys/0/openssh-key": bed.public_key + "\n",
        "/latest/user-data": USER_DATA,
    }


def openstack_documents(bed: GuestLab, instance_id: str, hostname: str) -> dict[str, str]:
    meta_data = {
        "uuid": instance_id,
        "hostname": hostname,
        "name": hostname,
        "public_keys": {"test-key": bed.public_key + "\n"},
        "meta": {"role": "test"},
    }
    return {
        "/openstack/latest/meta_data.json": json.dumps(meta_data),
        "/openstack/latest/user_data": USER_DATA,
    }


def assert_guest_contract(
    bed: GuestLab, console: SerialConsole, *, instance_id: str, hostname: str, source: str
) -> None:
    """The serial lines, then a real SSH login with the injected key."""
    address, uptime = console.event_arguments("dhcp-bound", BOOT_TIMEOUT)
    assert address == GUEST_IPV4
    assert float(uptime) > 0
    assert console.event_arguments("metadata-ok", BOOT_TIMEOUT) == [instance_id]
    assert console.event_arguments("metadata-source", BOOT_TIMEOUT) == [source]
    console.wait_for("ssh-ready", BOOT_TIMEOUT)
    exit_code = console.event_arguments("user-data-exit", BOOT_TIMEOUT)
    assert exit_code == [str(USER_DATA_EXIT_CODE)]

    # SLAAC completes after DAD, independently of DHCPv4: give it a few seconds.
    login = bed.ssh(
        "hostname; cat /root/user-data-proof; for try in $(seq 50); do "
        "ip -6 addr show dev eth0 | grep -q 'inet6 2001:' && break; sleep 0.2; done; "
        "ip -6 addr show dev eth0"
    )
    assert login.returncode == 0, login.stderr
    lines = login.stdout.splitlines()
    assert lines[0] == hostname
    assert lines[1] == "user-data ran as 0"
    # SLAAC from dnsmasq's router advertisements, next to the DHCPv4 address.
    assert IPV6_PREFIX.rstrip(":") in login.stdout


@pytest.mark.parametrize("flavour", ["ec2", "openstack"])
def test_guest_boots_from_the_metadata_service(lab: GuestLab, flavour: str) -> None:
    instance_id = "i-0tiny0test" if flavour == "ec2" else "8d9c4ad2-39c4-4a3c-9a4e-0d2f3f5e7a11"
    hostname = f"tiny-{flavour}"
    documents = (ec2_documents if flavour == "ec2" else openstack_documents)(
        lab, instance_id, hostname
    )
    lab.start_dnsmasq()
    lab.start_metadata_responder(documents)
    console = lab.boot()
    assert_guest_contract(lab, console, instance_id=instance_id, hostname=hostname, source=flavour)


def test_guest_boots_from_a_nocloud_seed_without_metadata_service(lab: GuestLab) -> None:
    instance_id = "i-0nocloud01"
    meta_data = (
        f"instance-id: {instance_id}\n"
        "local-hostname: tiny-nocloud\n"
        f"public-keys:\n  - {lab.public_key}\n"
    )
    seed = lab.make_seed_iso(meta_data, USER_DATA)
    lab.start_dnsmasq()
    console = lab.boot(seed_iso=seed)
    assert_guest_contract(
        lab, console, instance_id=instance_id, hostname="tiny-nocloud", source="nocloud"
    )


def test_guest_refuses_a_key_it_was_not_given(lab: GuestLab) -> None:
    seed = lab.make_seed_iso("instance-id: i-0nocloud02\nlocal-hostname: tiny\n", None)
    lab.start_dnsmasq()
    console = lab.boot(seed_iso=seed)
    console.wait_for("ssh-ready", BOOT_TIMEOUT)
    assert console.event_arguments("user-data-skipped", BOOT_TIMEOUT) == ["none"]
    login = lab.ssh("true")
    assert login.returncode == 255
    assert "Permission denied" in login.stderr
