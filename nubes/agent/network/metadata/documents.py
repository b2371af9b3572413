"""What the metadata service tells a VM, as pure functions of that VM's metadata.

`render(instance, path)` answers a GET of `path` in the OpenStack (`/openstack/...`), EC2
(`/<version>/meta-data/...`) and NoCloud (`/nocloud/...`) trees; the server adds HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from typing import Any, NamedTuple
from urllib.parse import unquote

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
BINARY = "application/octet-stream"

# cloud-init picks the newest of these that /openstack lists (helpers/openstack.py);
# the same names as Nova's nova/api/metadata/base.py.
OPENSTACK_FOLSOM = "2012-08-10"
OPENSTACK_GRIZZLY = "2013-04-04"
OPENSTACK_HAVANA = "2013-10-17"  # vendor_data.json
OPENSTACK_LIBERTY = "2015-10-15"  # network_data.json, project_id
OPENSTACK_NEWTON_ONE = "2016-06-30"  # devices
OPENSTACK_NEWTON_TWO = "2016-10-06"  # vendor_data2.json
OPENSTACK_OCATA = "2017-02-22"
OPENSTACK_ROCKY = "2018-08-27"
OPENSTACK_VERSIONS = (
    OPENSTACK_FOLSOM,
    OPENSTACK_GRIZZLY,
    OPENSTACK_HAVANA,
    OPENSTACK_LIBERTY,
    OPENSTACK_NEWTON_ONE,
    OPENSTACK_NEWTON_TWO,
    OPENSTACK_OCATA,
    OPENSTACK_ROCKY,
    "latest",
)
# cloud-init's DataSourceEc2 probes min_metadata_version 2009-04-04, then its
# extended_metadata_versions newest first (2021-03-23, 2018-09-24, 2016-09-02).
EC2_VERSIONS = ("2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23", "latest")

# Placeholders for what EC2 clients expect and nubes has no notion of.
AMI_ID = "ami-00000000"
INSTANCE_TYPE = "nubes.vm"
EMPTY_CLOUD_CONFIG = b"#cloud-config\n{}\n"


@dataclass(frozen=True)
class NicMetadata:
    """One port of the VM, as the guest should configure it."""

    port_id: str
    mac: str
    ipv4: IPv4Interface | None  # the address with its subnet's prefix
    gateway_v4: IPv4Address | None
    ipv6: IPv6Interface | None
    gateway_v6: IPv6Address | None
    mtu: int
    dhcp: bool  # False: the guest configures the addresses itself (IPAM manual)
    dns_nameservers: tuple[str, ...]
    floating_ipv4: IPv4Address | None


@dataclass(frozen=True)
class InstanceMetadata:
    """Everything the metadata service may tell one VM about itself."""

    instance_id: str
    name: str
    hostname: str
    project: str
    availability_zone: str
    public_keys: dict[str, str]  # key name -> OpenSSH public key line, in order
    user_data: bytes | None
    nics: tuple[NicMetadata, ...]
    launch_index: int = 0


class Document(NamedTuple):
    """An answer: HTTP status, content type and body."""

    status: int
    content_type: str
    body: bytes


NOT_FOUND = Document(404, TEXT, b"Not Found\n")


def text(value: str) -> Document:
    return Document(200, TEXT, value.encode())


def as_json(value: Any) -> Document:
    # UTF-8 as is: the tiny guest's awk reader turns \u escapes into "?".
    return Document(200, JSON, json.dumps(value, ensure_ascii=False).encode())


@dataclass
class Directory:
    """A node of a tree whose GET is a newline-separated listing of its entries.

    By default a sub-directory is listed with a trailing slash (how EC2 clients tell
    them from leaves); `listing` replaces the generated text where a tree differs."""

    entries: dict[str, Directory | Document] = field(default_factory=dict)
    listing: str | None = None

    def render(self) -> Document:
        if self.listing is not None:
            return text(self.listing)
        names = [f"{n}/" if isinstance(e, Directory) else n for n, e in self.entries.items()]
        return text("\n".join(names))

    def find(self, segments: list[str]) -> Document:
        node: Directory | Document = self
        for segment in segments:
            if not isinstance(node, Directory) or segment not in node.entries:
                return NOT_FOUND
            node = node.entries[segment]
        return node.render() if isinstance(node, Directory) else node


def split_path(path: str) -> list[str]:
    """The segments of a request target: query dropped, percent-escapes decoded, empty
    segments (doubled and trailing slashes) ignored, so `meta-data` and `meta-data/` are one."""
    path = path.partition("?")[0].partition("#")[0]
    return [segment for segment in unquote(path).split("/") if segment]


def is_token_path(path: str) -> bool:
    """Whether `path` is EC2's IMDSv2 token endpoint (the one path that takes PUT)."""
    return split_path(path) == ["latest", "api", "token"]


def render(instance: InstanceMetadata, path: str) -> Document:
    """The answer to a GET of `path` by `instance` (NOT_FOUND for an unknown path)."""
    segments = split_path(path)
    if not segments:
        return text("\n".join(EC2_VERSIONS))
    head, rest = segments[0], segments[1:]
    if head == "openstack":
        return render_openstack(instance, rest)
    if head == "nocloud":
        return render_nocloud(instance, rest)
    if head in EC2_VERSIONS:
        return ec2_version_tree(instance).find(rest)
    return NOT_FOUND


# -- OpenStack ------------------------------------------------------------------------------


def render_openstack(instance: InstanceMetadata, segments: list[str]) -> Document:
    """`/openstack/<segments>`: the versions, a version's files, or one file."""
    if not segments:
        return text("\n".join(OPENSTACK_VERSIONS))
    version = segments[0]
    if version not in OPENSTACK_VERSIONS:
        return NOT_FOUND
    files = openstack_files(instance, version)
    if len(segments) == 1:
        return text("\n".join(files))
    if len(segments) == 2 and segments[1] in files:
        return files[segments[1]]()
    return NOT_FOUND


def _since(version: str, first: str) -> bool:
    # Dates in ISO form compare as strings; "latest" has every feature.
    return version == "latest" or version >= first


def openstack_files(instance: InstanceMetadata, version: str) -> dict[str, Callable[[], Document]]:
    """The files of one OpenStack version, as Nova offers them, rendered when asked."""
    files: dict[str, Callable[[], Document]] = {
        "meta_data.json": lambda: as_json(openstack_meta_data(instance, version)),
    }
    user_data = instance.user_data
    if user_data is not None:
        files["user_data"] = lambda: Document(200, BINARY, user_data)
    if _since(version, OPENSTACK_HAVANA):
        files["vendor_data.json"] = lambda: as_json({})
    if _since(version, OPENSTACK_LIBERTY):
        files["network_data.json"] = lambda: as_json(openstack_network_data(instance))
    if _since(version, OPENSTACK_NEWTON_TWO):
        files["vendor_data2.json"] = lambda: as_json({})
    return files


def openstack_meta_data(instance: InstanceMetadata, version: str = "latest") -> dict[str, Any]:
    """meta_data.json: identity, keys (both of Nova's forms) and placement."""
    document: dict[str, Any] = {
        "uuid": instance.instance_id,
        "name": instance.name,
        "hostname": instance.hostname,
        "launch_index": instance.launch_index,
        "availability_zone": instance.availability_zone,
        "public_keys": dict(instance.public_keys),
        "keys": [
            {"name": name, "type": "ssh", "data": key} for name, key in instance.public_keys.items()
        ],
        "meta": {},
    }
    if _since(version, OPENSTACK_LIBERTY):
        document["project_id"] = instance.project
    if _since(version, OPENSTACK_NEWTON_ONE):
        document["devices"] = []
    return document


def link_id(nic: NicMetadata) -> str:
    """The link's id in network_data.json: like Nova's tap name, from the port id."""
    return "tap" + nic.port_id.rpartition("-")[2]


def openstack_network_data(instance: InstanceMetadata) -> dict[str, Any]:
    """network_data.json: one "phy" link per NIC, its networks (DHCP/SLAAC or static
    addresses with a default route), and the DNS servers."""
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    nameservers: list[str] = []
    for nic in instance.nics:
        link = link_id(nic)
        links.append(
            {
                "id": link,
                "vif_id": nic.port_id,
                "type": "phy",
                "mtu": nic.mtu,
                "ethernet_mac_address": nic.mac,
            }
        )
        dns = [{"type": "dns", "address": address} for address in nic.dns_nameservers]
        nameservers += [a for a in nic.dns_nameservers if a not in nameservers]
        common = {"link": link, "network_id": nic.port_id}
        if nic.ipv4 is not None:
            network: dict[str, Any] = {"id": f"network{len(networks)}", **common}
            if nic.dhcp:
                network["type"] = "ipv4_dhcp"
            else:
                network.update(
                    type="ipv4",
                    ip_address=str(nic.ipv4.ip),
                    netmask=str(nic.ipv4.netmask),
                    routes=_default_route(nic.gateway_v4, str(IPv4Address(0))),
                    services=dns,
                )
            networks.append(network)
        if nic.ipv6 is not None:
            network = {"id": f"network{len(networks)}", **common}
            if nic.dhcp:
                network["type"] = "ipv6_slaac"
            else:
                network.update(
                    type="ipv6",
                    ip_address=str(nic.ipv6.ip),
                    netmask=str(nic.ipv6.netmask),
                    routes=_default_route(nic.gateway_v6, "::"),
                    services=dns,
                )
            networks.append(network)
    return {
        "links": links,
        "networks": networks,
        "services": [{"type": "dns", "address": address} for address in nameservers],
    }


def _default_route(gateway: IPv4Address | IPv6Address | None, any_: str) -> list[dict[str, str]]:
    if gateway is None:
        return []
    return [{"network": any_, "netmask": any_, "gateway": str(gateway)}]


# -- EC2 ------------------------------------------------------------------------------------


def ec2_version_tree(instance: InstanceMetadata) -> Directory:
    """`/<version>/`: meta-data, user-data (when there is some) and the identity document."""
    entries: dict[str, Directory | Document] = {
        "dynamic": Directory(
            {"instance-identity": Directory({"document": as_json(identity_document(instance))})}
        ),
        "meta-data": ec2_meta_data(instance),
    }
    if instance.user_data is not None:
        entries["user-data"] = Document(200, BINARY, instance.user_data)
    # EC2 lists this level without trailing slashes.
    return Directory(entries, listing="\n".join(entries))


def _primary(instance: InstanceMetadata) -> NicMetadata | None:
    return instance.nics[0] if instance.nics else None


def ec2_meta_data(instance: InstanceMetadata) -> Directory:
    """`meta-data/`. cloud-init fetches every entry a listing names, so each one answers."""
    primary = _primary(instance)
    entries: dict[str, Directory | Document] = {
        "ami-id": text(AMI_ID),
        "ami-launch-index": text(str(instance.launch_index)),
        "ami-manifest-path": text("(unknown)"),
        "block-device-mapping": Directory({"ami": text("vda"), "root": text("/dev/vda")}),
        "hostname": text(instance.hostname),
        "instance-action": text("none"),
        "instance-id": text(instance.instance_id),
        "instance-type": text(INSTANCE_TYPE),
        "local-hostname": text(instance.hostname),
    }
    if primary is not None and primary.ipv4 is not None:
        entries["local-ipv4"] = text(str(primary.ipv4.ip))
    if primary is not None:
        entries["mac"] = text(primary.mac)
    macs: dict[str, Directory | Document] = {
        nic.mac: _ec2_interface(instance, index, nic) for index, nic in enumerate(instance.nics)
    }
    entries["network"] = Directory({"interfaces": Directory({"macs": Directory(macs)})})
    entries["placement"] = Directory({"availability-zone": text(instance.availability_zone)})
    if primary is not None and primary.floating_ipv4 is not None:
        entries["public-ipv4"] = text(str(primary.floating_ipv4))
    if instance.public_keys:
        keys = list(instance.public_keys.items())
        entries["public-keys"] = Directory(
            {str(i): Directory({"openssh-key": text(key)}) for i, (_, key) in enumerate(keys)},
            # "0=name": cloud-init and the tiny guest then read 0/openssh-key.
            listing="\n".join(f"{i}={_one_line(name)}" for i, (name, _) in enumerate(keys)),
        )
    entries["reservation-id"] = text("r-" + instance.instance_id.rpartition("-")[2])
    return Directory(entries)


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def _ec2_interface(instance: InstanceMetadata, index: int, nic: NicMetadata) -> Directory:
    entries: dict[str, Directory | Document] = {
        "device-number": text(str(index)),
        "interface-id": text(nic.port_id),
    }
    if nic.floating_ipv4 is not None and nic.ipv4 is not None:
        entries["ipv4-associations"] = Directory({str(nic.floating_ipv4): text(str(nic.ipv4.ip))})
    if nic.ipv6 is not None:
        entries["ipv6s"] = text(str(nic.ipv6.ip))
    entries["local-hostname"] = text(instance.hostname)
    if nic.ipv4 is not None:
        entries["local-ipv4s"] = text(str(nic.ipv4.ip))
    entries["mac"] = text(nic.mac)
    if nic.floating_ipv4 is not None:
        entries["public-ipv4s"] = text(str(nic.floating_ipv4))
    if nic.ipv4 is not None:
        entries["subnet-ipv4-cidr-block"] = text(str(nic.ipv4.network))
    if nic.ipv6 is not None:
        entries["subnet-ipv6-cidr-blocks"] = text(str(nic.ipv6.network))
    return Directory(entries)


def identity_document(instance: InstanceMetadata) -> dict[str, Any]:
    """`dynamic/instance-identity/document`, with EC2's field names."""
    primary = _primary(instance)
    zone = instance.availability_zone
    return {
        "accountId": instance.project,
        "architecture": "x86_64",
        "availabilityZone": zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": AMI_ID,
        "instanceId": instance.instance_id,
        "instanceType": INSTANCE_TYPE,
        "kernelId": None,
        "ramdiskId": None,
        "privateIp": str(primary.ipv4.ip) if primary and primary.ipv4 else None,
        "region": zone,
        "version": "2017-09-30",
    }


# -- NoCloud --------------------------------------------------------------------------------


def render_nocloud(instance: InstanceMetadata, segments: list[str]) -> Document:
    """`/nocloud/...`, for `ds=nocloud-net;s=http://169.254.169.254/nocloud/`."""
    # cloud-init wants the user-data file even when there is nothing in it.
    user_data = instance.user_data if instance.user_data is not None else EMPTY_CLOUD_CONFIG
    files: dict[str, Callable[[], Document]] = {
        "meta-data": lambda: text(yaml_document(nocloud_meta_data(instance))),
        "user-data": lambda: Document(200, BINARY, user_data),
        "vendor-data": lambda: Document(200, TEXT, EMPTY_CLOUD_CONFIG),
        "network-config": lambda: text(yaml_document(nocloud_network_config(instance))),
    }
    if not segments:
        return text("\n".join(files))
    if len(segments) == 1 and segments[0] in files:
        return files[segments[0]]()
    return NOT_FOUND


def nocloud_meta_data(instance: InstanceMetadata) -> dict[str, Any]:
    document: dict[str, Any] = {
        "instance-id": instance.instance_id,
        "local-hostname": instance.hostname,
        "availability-zone": instance.availability_zone,
    }
    if instance.public_keys:
        document["public-keys"] = list(instance.public_keys.values())
    return document


def nocloud_network_config(instance: InstanceMetadata) -> dict[str, Any]:
    """Network config version 2, NICs matched by MAC without set-name (cloud-init then
    keeps the guest's own interface names)."""
    ethernets: dict[str, Any] = {}
    for index, nic in enumerate(instance.nics):
        config: dict[str, Any] = {"match": {"macaddress": nic.mac}, "mtu": nic.mtu}
        if nic.dhcp:
            config["dhcp4"] = nic.ipv4 is not None
            if nic.ipv6 is not None:
                config["accept-ra"] = True
        else:
            config["dhcp4"] = False
            config["addresses"] = [str(a) for a in (nic.ipv4, nic.ipv6) if a is not None]
            # gateway4/6 rather than routes: cloud-init 22.4 (Debian 12) reads a v2
            # route to ::/0 as ::/64, and cannot read "to: default" at all.
            if nic.ipv4 is not None and nic.gateway_v4 is not None:
                config["gateway4"] = str(nic.gateway_v4)
            if nic.ipv6 is not None and nic.gateway_v6 is not None:
                config["gateway6"] = str(nic.gateway_v6)
            if nic.dns_nameservers:
                config["nameservers"] = {"addresses": list(nic.dns_nameservers)}
        ethernets[f"nic{index}"] = config
    return {"version": 2, "ethernets": ethernets}


def yaml_document(value: dict[str, Any]) -> str:
    """Block-style YAML of dicts, lists, strings, numbers and booleans. Strings are
    double-quoted JSON strings, which YAML reads as the same string whatever they hold."""
    return "\n".join(_yaml_lines(value, 0)) + "\n"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _yaml_lines(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_yaml_inline(item)}")
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines += nested[1:]
            else:
                lines.append(f"{pad}- {_yaml_inline(item)}")
    return lines


def _yaml_inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _yaml_scalar(value)
