"""The metadata documents of a VM with two NICs (one DHCP, one static, both dual-stack),
two keys and binary user-data: every tree cloud-init and the tiny guest read, and 404s."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path
from typing import Any

import pytest

from nubes.agent.network.metadata.documents import (
    BINARY,
    EC2_VERSIONS,
    JSON,
    NOT_FOUND,
    OPENSTACK_VERSIONS,
    TEXT,
    InstanceMetadata,
    NicMetadata,
    is_token_path,
    render,
    split_path,
    yaml_document,
)

GUEST_SCRIPTS = Path(__file__).resolve().parents[2] / "nubes/tinyimage/guest/rootfs/usr/lib/nubes"
USER_DATA = b"#!/bin/sh\n\x00\xff\xfe binary \r\n tail"
DHCP_NIC = NicMetadata(
    port_id="port-aaaaaaaaaa",
    mac="fa:16:3e:00:00:01",
    ipv4=IPv4Interface("198.18.1.5/24"),
    gateway_v4=IPv4Address("198.18.1.1"),
    ipv6=IPv6Interface("2001:db8:1::5/64"),
    gateway_v6=IPv6Address("2001:db8:1::1"),
    mtu=1450,
    dhcp=True,
    dns_nameservers=("198.18.0.53",),
    floating_ipv4=IPv4Address("198.19.0.9"),
)
STATIC_NIC = NicMetadata(
    port_id="port-bbbbbbbbbb",
    mac="fa:16:3e:00:00:02",
    ipv4=IPv4Interface("198.18.2.5/24"),
    gateway_v4=IPv4Address("198.18.2.1"),
    ipv6=IPv6Interface("2001:db8:2::5/64"),
    gateway_v6=IPv6Address("2001:db8:2::1"),
    mtu=1400,
    dhcp=False,
    dns_nameservers=("198.18.0.53", "2001:db8::53"),
    floating_ipv4=None,
)
VM = InstanceMetadata(
    instance_id="i-abcdefghij",
    name="web server",
    hostname="web-server",
    project="proj-1",
    availability_zone="zone-a",
    public_keys={"laptop": "ssh-ed25519 AAAA laptop", "ci": "ssh-rsa BBBB ci@x"},
    user_data=USER_DATA,
    nics=(DHCP_NIC, STATIC_NIC),
    launch_index=2,
)
BARE = dataclasses.replace(VM, public_keys={}, user_data=None, nics=())


def body(path: str, instance: InstanceMetadata = VM) -> str:
    document = render(instance, path)
    assert document.status == 200, path
    return document.body.decode()


def lines(path: str, instance: InstanceMetadata = VM) -> list[str]:
    return body(path, instance).split("\n")


def as_json(path: str, instance: InstanceMetadata = VM) -> Any:
    document = render(instance, path)
    assert (document.status, document.content_type) == (200, JSON), path
    return json.loads(document.body)


# -- OpenStack ------------------------------------------------------------------------------


def test_openstack_lists_every_version_cloud_init_knows_and_latest() -> None:
    assert lines("/openstack") == list(OPENSTACK_VERSIONS)
    assert lines("/openstack/") == lines("/openstack")
    for version in ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30"):
        assert version in lines("/openstack")
    assert {"2017-02-22", "2018-08-27", "latest"} <= set(lines("/openstack"))


def test_openstack_version_directory_lists_its_files_by_version() -> None:
    assert lines("/openstack/latest/") == [
        "meta_data.json",
        "user_data",
        "vendor_data.json",
        "network_data.json",
        "vendor_data2.json",
    ]
    # Folsom had neither vendor data nor network_data.json: Nova answers 404 there too.
    assert lines("/openstack/2012-08-10") == ["meta_data.json", "user_data"]
    assert render(VM, "/openstack/2012-08-10/network_data.json") == NOT_FOUND
    assert "user_data" not in lines("/openstack/latest", BARE)


def test_openstack_meta_data_names_the_instance_and_both_key_forms() -> None:
    meta = as_json("/openstack/latest/meta_data.json")
    assert meta["uuid"] == "i-abcdefghij"
    assert (meta["name"], meta["hostname"]) == ("web server", "web-server")
    assert (meta["project_id"], meta["availability_zone"]) == ("proj-1", "zone-a")
    assert meta["launch_index"] == 2
    assert meta["meta"] == {}
    assert list(meta["public_keys"].items()) == [
        ("laptop", "ssh-ed25519 AAAA laptop"),
        ("ci", "ssh-rsa BBBB ci@x"),
    ]
    assert meta["keys"] == [
        {"name": "laptop", "type": "ssh", "data": "ssh-ed25519 AAAA laptop"},
        {"name": "ci", "type": "ssh", "data": "ssh-rsa BBBB ci@x"},
    ]
    assert as_json("/openstack/2018-08-27/meta_data.json") == meta
    assert "project_id" not in as_json("/openstack/2013-04-04/meta_data.json")


def test_openstack_user_data_comes_back_byte_exact_and_404_when_none() -> None:
    document = render(VM, "/openstack/latest/user_data")
    assert (document.status, document.content_type, document.body) == (200, BINARY, USER_DATA)
    assert render(BARE, "/openstack/latest/user_data") == NOT_FOUND


def test_openstack_vendor_data_is_an_empty_object() -> None:
    assert as_json("/openstack/latest/vendor_data.json") == {}
    assert as_json("/openstack/latest/vendor_data2.json") == {}


def test_network_data_has_a_phy_link_per_nic_with_mac_and_mtu() -> None:
    links = as_json("/openstack/latest/network_data.json")["links"]
    assert links == [
        {
            "id": "tapaaaaaaaaaa",
            "vif_id": "port-aaaaaaaaaa",
            "type": "phy",
            "mtu": 1450,
            "ethernet_mac_address": "fa:16:3e:00:00:01",
        },
        {
            "id": "tapbbbbbbbbbb",
            "vif_id": "port-bbbbbbbbbb",
            "type": "phy",
            "mtu": 1400,
            "ethernet_mac_address": "fa:16:3e:00:00:02",
        },
    ]


def test_network_data_says_dhcp_and_slaac_for_a_dhcp_nic() -> None:
    networks = as_json("/openstack/latest/network_data.json")["networks"]
    on_first = [n for n in networks if n["link"] == "tapaaaaaaaaaa"]
    assert [n["type"] for n in on_first] == ["ipv4_dhcp", "ipv6_slaac"]
    assert all("ip_address" not in n for n in on_first)


def test_network_data_gives_static_addresses_routes_and_dns_for_a_manual_nic() -> None:
    networks = as_json("/openstack/latest/network_data.json")["networks"]
    v4, v6 = [n for n in networks if n["link"] == "tapbbbbbbbbbb"]
    dns = [{"type": "dns", "address": "198.18.0.53"}, {"type": "dns", "address": "2001:db8::53"}]
    assert v4 == {
        "id": "network2",
        "link": "tapbbbbbbbbbb",
        "network_id": "port-bbbbbbbbbb",
        "type": "ipv4",
        "ip_address": "198.18.2.5",
        "netmask": "255.255.255.0",
        "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "198.18.2.1"}],
        "services": dns,
    }
    assert v6["type"] == "ipv6"
    assert (v6["ip_address"], v6["netmask"]) == ("2001:db8:2::5", "ffff:ffff:ffff:ffff::")
    assert v6["routes"] == [{"network": "::", "netmask": "::", "gateway": "2001:db8:2::1"}]
    services = as_json("/openstack/latest/network_data.json")["services"]
    assert services == dns  # every NIC's servers, once each


def test_network_data_of_a_static_nic_without_gateway_has_no_route() -> None:
    nic = dataclasses.replace(STATIC_NIC, gateway_v4=None, ipv6=None, gateway_v6=None)
    networks = as_json("/openstack/latest/network_data.json", dataclasses.replace(VM, nics=(nic,)))
    assert [(n["type"], n["routes"]) for n in networks["networks"]] == [("ipv4", [])]


def test_tiny_guest_reads_identity_and_keys_from_meta_data_json() -> None:
    # The guest's own parser, on the very bytes the server sends.
    flat = subprocess.run(
        ["awk", "-f", str(GUEST_SCRIPTS / "jsonflat.awk")],
        input=render(VM, "/openstack/latest/meta_data.json").body,
        capture_output=True,
        check=True,
    ).stdout.decode()
    pairs = [tuple(line.split("\t", 1)) for line in flat.splitlines()]
    assert next(v for k, v in pairs if k == "uuid") == "i-abcdefghij"
    assert next(v for k, v in pairs if k == "hostname") == "web-server"
    assert [v for k, v in pairs if k.startswith("public_keys.")] == [
        "ssh-ed25519 AAAA laptop",
        "ssh-rsa BBBB ci@x",
    ]


# -- EC2 ------------------------------------------------------------------------------------


def test_root_lists_the_ec2_versions_cloud_init_probes() -> None:
    assert lines("/") == list(EC2_VERSIONS)
    assert {"2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23", "latest"} <= set(lines("/"))


@pytest.mark.parametrize("version", EC2_VERSIONS)
def test_every_ec2_version_answers_the_same_tree(version: str) -> None:
    assert body(f"/{version}/meta-data/instance-id") == "i-abcdefghij"
    assert lines(f"/{version}") == ["dynamic", "meta-data", "user-data"]


def test_ec2_meta_data_listing_names_only_entries_that_answer() -> None:
    listing = lines("/latest/meta-data/")
    assert "public-keys/" in listing
    assert "network/" in listing
    assert "placement/" in listing
    for entry in listing:
        assert render(VM, f"/latest/meta-data/{entry}").status == 200, entry


def test_ec2_leaves() -> None:
    expected = {
        "instance-id": "i-abcdefghij",
        "hostname": "web-server",
        "local-hostname": "web-server",
        "local-ipv4": "198.18.1.5",
        "public-ipv4": "198.19.0.9",
        "mac": "fa:16:3e:00:00:01",
        "ami-launch-index": "2",
        "placement/availability-zone": "zone-a",
    }
    for leaf, value in expected.items():
        assert body(f"/latest/meta-data/{leaf}") == value, leaf
    assert body("/latest/meta-data/ami-id").startswith("ami-")
    assert body("/latest/meta-data/instance-type")


def test_ec2_public_ipv4_only_when_floating() -> None:
    unfloated = dataclasses.replace(VM, nics=(STATIC_NIC,))
    assert "public-ipv4" not in lines("/latest/meta-data/", unfloated)
    assert render(unfloated, "/latest/meta-data/public-ipv4") == NOT_FOUND


def test_ec2_public_keys_index_then_openssh_key() -> None:
    assert lines("/latest/meta-data/public-keys/") == ["0=laptop", "1=ci"]
    assert lines("/latest/meta-data/public-keys/1/") == ["openssh-key"]
    assert body("/latest/meta-data/public-keys/0/openssh-key") == "ssh-ed25519 AAAA laptop"
    assert body("/latest/meta-data/public-keys/1/openssh-key") == "ssh-rsa BBBB ci@x"
    assert render(VM, "/latest/meta-data/public-keys/2/openssh-key") == NOT_FOUND
    assert "public-keys/" not in lines("/latest/meta-data/", BARE)


def test_ec2_interfaces_by_mac() -> None:
    assert lines("/latest/meta-data/network/interfaces/macs/") == [
        "fa:16:3e:00:00:01/",
        "fa:16:3e:00:00:02/",
    ]
    first = "/latest/meta-data/network/interfaces/macs/fa:16:3e:00:00:01"
    assert body(f"{first}/mac") == "fa:16:3e:00:00:01"
    assert body(f"{first}/local-ipv4s") == "198.18.1.5"
    assert body(f"{first}/ipv6s") == "2001:db8:1::5"
    assert body(f"{first}/public-ipv4s") == "198.19.0.9"
    assert body(f"{first}/device-number") == "0"
    assert body(f"{first}/subnet-ipv4-cidr-block") == "198.18.1.0/24"
    assert body(f"{first}/ipv4-associations/198.19.0.9") == "198.18.1.5"
    second = "/latest/meta-data/network/interfaces/macs/fa:16:3e:00:00:02"
    assert body(f"{second}/device-number") == "1"
    assert "public-ipv4s" not in lines(f"{second}/")
    # A client that escapes the colons reaches the same leaf.
    escaped = "/latest/meta-data/network/interfaces/macs/fa%3A16%3A3e%3A00%3A00%3A02/mac"
    assert body(escaped) == "fa:16:3e:00:00:02"


def test_ec2_user_data_byte_exact_and_404_when_none() -> None:
    document = render(VM, "/latest/user-data")
    assert (document.status, document.content_type, document.body) == (200, BINARY, USER_DATA)
    assert render(VM, "/2009-04-04/user-data").body == USER_DATA
    assert render(BARE, "/latest/user-data") == NOT_FOUND
    assert "user-data" not in lines("/latest/", BARE)


def test_ec2_identity_document() -> None:
    assert lines("/latest/dynamic/") == ["instance-identity/"]
    assert lines("/latest/dynamic/instance-identity") == ["document"]
    document = as_json("/latest/dynamic/instance-identity/document")
    assert document["instanceId"] == "i-abcdefghij"
    assert document["availabilityZone"] == "zone-a"
    assert document["privateIp"] == "198.18.1.5"
    assert document["accountId"] == "proj-1"


def test_a_vm_without_nics_still_has_a_consistent_tree() -> None:
    listing = lines("/latest/meta-data/", BARE)
    assert "mac" not in listing
    assert "local-ipv4" not in listing
    for entry in listing:
        assert render(BARE, f"/latest/meta-data/{entry}").status == 200, entry
    assert as_json("/openstack/latest/network_data.json", BARE) == {
        "links": [],
        "networks": [],
        "services": [],
    }


# -- NoCloud --------------------------------------------------------------------------------


def test_nocloud_meta_data_yaml() -> None:
    assert body("/nocloud/meta-data") == (
        'instance-id: "i-abcdefghij"\n'
        'local-hostname: "web-server"\n'
        'availability-zone: "zone-a"\n'
        "public-keys:\n"
        '  - "ssh-ed25519 AAAA laptop"\n'
        '  - "ssh-rsa BBBB ci@x"\n'
    )
    assert "public-keys" not in body("/nocloud/meta-data", BARE)


def test_nocloud_user_data_byte_exact_or_empty_cloud_config() -> None:
    assert render(VM, "/nocloud/user-data").body == USER_DATA
    empty = render(BARE, "/nocloud/user-data")
    assert (empty.status, empty.body) == (200, b"#cloud-config\n{}\n")
    assert body("/nocloud/vendor-data") == "#cloud-config\n{}\n"
    assert lines("/nocloud/") == ["meta-data", "user-data", "vendor-data", "network-config"]


def test_nocloud_network_config_matches_nics_by_mac() -> None:
    assert body("/nocloud/network-config") == (
        "version: 2\n"
        "ethernets:\n"
        "  nic0:\n"
        "    match:\n"
        '      macaddress: "fa:16:3e:00:00:01"\n'
        "    mtu: 1450\n"
        "    dhcp4: true\n"
        "    accept-ra: true\n"
        "  nic1:\n"
        "    match:\n"
        '      macaddress: "fa:16:3e:00:00:02"\n'
        "    mtu: 1400\n"
        "    dhcp4: false\n"
        "    addresses:\n"
        '      - "198.18.2.5/24"\n'
        '      - "2001:db8:2::5/64"\n'
        '    gateway4: "198.18.2.1"\n'
        '    gateway6: "2001:db8:2::1"\n'
        "    nameservers:\n"
        "      addresses:\n"
        '        - "198.18.0.53"\n'
        '        - "2001:db8::53"\n'
    )


def test_yaml_strings_are_quoted_so_any_value_stays_a_string() -> None:
    assert yaml_document({"a": 'x: "y"\nz', "b": [], "c": {}, "d": "yes"}) == (
        'a: "x: \\"y\\"\\nz"\nb: []\nc: {}\nd: "yes"\n'
    )


def test_tiny_guest_yaml_reader_reads_nocloud_meta_data() -> None:
    pairs = subprocess.run(
        ["awk", "-f", str(GUEST_SCRIPTS / "yamlkeys.awk")],
        input=render(VM, "/nocloud/meta-data").body,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "instance-id\ti-abcdefghij\n" in pairs
    assert "public-keys\tssh-rsa BBBB ci@x\n" in pairs


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/openstack/2011-01-01/meta_data.json",
        "/openstack/latest/nope",
        "/openstack/latest/meta_data.json/extra",
        "/2020-01-01/meta-data/instance-id",
        "/latest/meta-data/nope",
        "/latest/meta-data/instance-id/extra",
        "/nocloud/nope",
        "/latest/api/token",
    ],
)
def test_unknown_paths_are_404(path: str) -> None:
    assert render(VM, path) == NOT_FOUND
    assert NOT_FOUND.content_type == TEXT


def test_paths_ignore_query_doubled_and_trailing_slashes() -> None:
    assert split_path("//latest//meta-data/?x=1") == ["latest", "meta-data"]
    assert body("/latest/meta-data/instance-id?foo=bar") == "i-abcdefghij"
    assert body("/latest/meta-data/instance-id/") == "i-abcdefghij"


def test_token_path() -> None:
    assert is_token_path("/latest/api/token")
    assert not is_token_path("/2021-03-23/api/token")
    assert not is_token_path("/latest/meta-data/")
