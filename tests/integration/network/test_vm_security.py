"""Security groups and anti-spoofing on running VMs: rules allow and deny exactly what
they say (ping, SSH, another TCP port, remote groups, egress), changes reach a running
VM within seconds, and a guest that lies about its address or MAC, or serves DHCP, gets
nothing onto its subnet (tcpdump on its tap shows what it sent, on the bridge what got in).

A guest cannot send a router advertisement: its busybox has no tool that crafts one
(no raw-socket applet, no radvd); the firewall datapath tests cover RAs with crafted frames.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from nubes.agent.network.names import bridge_name, tap_name
from nubes.model.network import PortRecord
from nubes.store.keys import Kind
from tests.support.network_lab import (
    BOOT_TIMEOUT,
    OPEN,
    SSH_ONLY,
    Capture,
    NetLab,
    SubnetNamespace,
    boot,
    in_netns,
    ping,
    tcp_answers,
    until,
)

pytestmark = pytest.mark.integration

META = "http://169.254.169.254/openstack/latest/meta_data.json"
# Serves "web-<hostname>" on ports 8080 and 8081 (busybox httpd daemonizes).
WEB_SERVERS = (
    "#!/bin/sh\nmkdir -p /srv/www\necho web-$(hostname) > /srv/www/index.html\n"
    "httpd -p 8080 -h /srv/www\nhttpd -p 8081 -h /srv/www\n"
)


def tcp(port: int, **remote: str) -> dict[str, Any]:
    return {"direction": "ingress", "protocol": "tcp", "port_min": port, "port_max": port, **remote}


async def wait_booted(net: NetLab, vm_id: str, port: PortRecord, *, web: bool = False) -> None:
    lines = [f"dhcp-bound {port.spec.ipv4[0]} ", f"metadata-ok {vm_id}", "ssh-ready"]
    for line in [*lines, "user-data-exit 0"] if web else lines:
        await net.lab.wait_serial(vm_id, line, timeout=BOOT_TIMEOUT)


def guest_probes(net: NetLab, netns: str, address: object, probes: dict[str, str]) -> set[str]:
    """Runs shell `probes` in the guest at the same time; the names of those that succeeded."""
    script = " ".join(
        f"( {command} >/dev/null 2>&1 && echo {name} ) &" for name, command in probes.items()
    )
    login = net.ssh(netns, address, f"{script} wait")
    assert login.returncode == 0, login.stderr
    return set(login.stdout.split())


def web(address: object, port: int = 8080, *, seconds: int = 3) -> str:
    return f"timeout {seconds} wget -q -O - http://{address}:{port}/ | grep -q web-"


def ssh_banner(address: object) -> str:
    return f"timeout 3 nc {address} 22 </dev/null | grep -q SSH-"


async def test_security_groups_allow_and_deny_exactly_what_their_rules_say(net: NetLab) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.50.0/24")
    gateway = "198.18.50.1"  # the VPC namespace's address on the subnet
    clients = await net.security_group(SSH_ONLY, name="clients")
    others = await net.security_group(
        [
            tcp(22),
            {"direction": "egress", "protocol": "icmp"},
            {"direction": "egress", "protocol": "tcp", "port_min": 8080, "port_max": 8080},
        ],
        name="others",
    )
    servers = await net.security_group(
        [
            tcp(22),
            {"direction": "ingress", "protocol": "icmp", "remote_cidr": f"{gateway}/32"},
            tcp(8080, remote_group=clients),
            {"direction": "egress"},
        ],
        name="servers",
    )
    port_t = await net.port(subnet, security_groups=[servers])
    port_m = await net.port(subnet, security_groups=[clients])
    port_n = await net.port(subnet, security_groups=[others])
    vm_t = await boot(net, "target", [port_t], user_data=WEB_SERVERS)
    vm_m = await boot(net, "member", [port_m])
    vm_n = await boot(net, "stranger", [port_n])
    await wait_booted(net, vm_t, port_t, web=True)
    await wait_booted(net, vm_m, port_m)
    await wait_booted(net, vm_n, port_n)
    netns = net.vpc_netns(vpc)
    t, m, n = port_t.spec.ipv4[0], port_m.spec.ipv4[0], port_n.spec.ipv4[0]

    # Both web servers run: the target reaches them itself.
    local = guest_probes(net, netns, t, {"8080": web("127.0.0.1"), "8081": web("127.0.0.1", 8081)})
    assert local == {"8080", "8081"}
    # From the namespace (the gateway address): SSH (we got in) and ping, no web.
    assert await asyncio.to_thread(ping, netns, t, count=2, wait=2.0)
    assert not await asyncio.to_thread(tcp_answers, netns, t, 8080)
    assert not await asyncio.to_thread(tcp_answers, netns, t, 8081)
    # A member of "clients": port 8080 only (no ping, no 8081); its egress is open.
    probes = {
        "web8080": web(t),
        "web8081": web(t, 8081),
        "ping": f"ping -c 1 -W 2 {t}",
        "ssh-stranger": ssh_banner(n),
        "ping-gateway": f"ping -c 1 -W 2 {gateway}",
    }
    assert guest_probes(net, netns, m, probes) == {"web8080", "ssh-stranger", "ping-gateway"}
    # Not a member: no 8080 either; its own egress allows icmp and tcp/8080 only, so the
    # member's SSH server (open to anyone) is out of its reach.
    probes = {
        "web8080": web(t),
        "ping": f"ping -c 1 -W 2 {t}",
        "ssh-member": ssh_banner(m),
        "ping-gateway": f"ping -c 1 -W 2 {gateway}",
    }
    assert guest_probes(net, netns, n, probes) == {"ping-gateway"}


async def test_rule_and_membership_changes_reach_a_running_vm_within_seconds(
    net: NetLab,
) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.51.0/24")
    servers = await net.security_group(SSH_ONLY, name="servers")
    others = await net.security_group(SSH_ONLY, name="others")
    clients = await net.security_group(SSH_ONLY, name="clients")
    port_t = await net.port(subnet, security_groups=[servers])
    port_m = await net.port(subnet, security_groups=[others])
    vm_t = await boot(net, "target", [port_t], user_data=WEB_SERVERS)
    vm_m = await boot(net, "member", [port_m])
    await wait_booted(net, vm_t, port_t, web=True)
    await wait_booted(net, vm_m, port_m)
    netns = net.vpc_netns(vpc)
    t, m = port_t.spec.ipv4[0], port_m.spec.ipv4[0]
    timings: dict[str, float] = {}

    async def changed(what: str, rules: list[dict[str, Any]], check: Any, want: bool) -> None:
        await net.set_rules(servers, rules, name="servers")
        seconds = await until(lambda: check() == want, timeout=10.0, interval=0.1)
        assert seconds is not None, f"{what}: not applied within 10 s"
        timings[what] = seconds

    def pings() -> bool:
        # Two tries, so that one lost packet does not read as "denied".
        return ping(netns, t, wait=0.5) or ping(netns, t, wait=0.5)

    def serves() -> bool:
        return tcp_answers(netns, t, 8080, wait=1.0)

    assert not pings()
    assert not serves()
    await changed(
        "add icmp", [*SSH_ONLY, {"direction": "ingress", "protocol": "icmp"}], pings, True
    )
    await changed("remove icmp", SSH_ONLY, pings, False)
    await changed("add tcp/8080", [*SSH_ONLY, tcp(8080)], serves, True)
    await changed("remove tcp/8080", SSH_ONLY, serves, False)

    # A remote-group rule follows the group's membership.
    await net.set_rules(servers, [*SSH_ONLY, tcp(8080, remote_group=clients)], name="servers")

    def member_gets_web() -> bool:
        return net.ssh(netns, m, f"{web(t, seconds=1)} && echo yes").stdout.split() == ["yes"]

    assert await until(lambda: not member_gets_web(), timeout=5.0) is not None

    async def membership(what: str, groups: list[str], want: bool) -> None:
        def change(document: dict[str, Any]) -> None:
            document["spec"]["security_groups"] = groups

        await net.lab.update(Kind.PORT, port_m.id, change)
        seconds = await until(lambda: member_gets_web() == want, timeout=15.0, interval=0.1)
        assert seconds is not None, f"{what}: not applied within 15 s"
        timings[what] = seconds

    await membership("join clients", [others, clients], True)
    await membership("leave clients", [others], False)
    print("\nsecurity group changes seen after (s, upper bounds):")
    for what, seconds in timings.items():
        print(f"  {what:16} {seconds:.2f}")
    # Each probe of the member runs over a fresh SSH login (about 1 s under TCG).
    assert max(timings.values()) < 5.0, timings


async def test_a_guest_using_another_vms_address_gets_nothing_through_nor_its_metadata(
    net: NetLab,
) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.52.0/24")
    gateway = "198.18.52.1"
    group = await net.security_group(OPEN)
    port_a = await net.port(subnet, security_groups=[group])
    port_b = await net.port(subnet, security_groups=[group])
    vm_a = await boot(net, "liar", [port_a])
    vm_b = await boot(net, "victim", [port_b])
    await wait_booted(net, vm_a, port_a)
    await wait_booted(net, vm_b, port_b)
    netns = net.vpc_netns(vpc)
    a, b, mac_a = port_a.spec.ipv4[0], port_b.spec.ipv4[0], port_a.spec.mac
    # Frames from the liar's MAC with any IPv4/ARP source other than its own.
    lies = f"ether src {mac_a} and (arp or ip) and not src host {a} and not src host 0.0.0.0"
    # The liar takes the victim's address: gratuitous ARP for it, a ping from it, and a
    # metadata request from it (a route to 169.254.169.254 with the victim's source).
    attack = (
        f"ip addr add {b}/32 dev eth0; arping -U -c 2 -I eth0 -s {b} {b}; "
        f"ping -c 2 -W 1 -I {b} {gateway}; "
        f"ip route replace 169.254.169.254/32 via {gateway} dev eth0 src {b}; "
        f"timeout 4 wget -q -O - {META}; rc=$?; echo; echo wget-exit $rc; "
        f"ip route replace 169.254.169.254/32 via {gateway} dev eth0; "
        f"ip addr del {b}/32 dev eth0; "
        f"timeout 4 wget -q -O - {META}; rc=$?; echo; echo wget-exit $rc"
    )
    with (
        Capture(netns, tap_name(port_a.id), lies) as sent,
        Capture(netns, bridge_name(subnet.id), lies) as bridged,
        Capture(netns, tap_name(port_b.id), lies) as to_victim,
    ):
        login = await asyncio.to_thread(net.ssh, netns, a, attack)
        await asyncio.sleep(0.5)
        frames_sent, frames_bridged, frames_to_victim = (
            sent.stop(),
            bridged.stop(),
            to_victim.stop(),
        )
    assert login.returncode == 0, login.stderr
    spoofed, own = login.stdout.split("wget-exit")[0:2]
    exits = re.findall(r"wget-exit (\d+)", login.stdout)
    assert exits[0] != "0", login.stdout
    assert exits[1] == "0", login.stdout
    # The guest did send frames with the victim's address; none entered the subnet.
    assert any(str(b) in frame for frame in frames_sent), frames_sent
    assert frames_bridged == [], frames_bridged
    assert frames_to_victim == [], frames_to_victim
    # The metadata service never answered the liar with the victim's data (nor at all)...
    assert vm_b not in login.stdout
    assert "uuid" not in spoofed, login.stdout
    # ...and serves the liar its own data again once it uses its own address.
    assert f'"{vm_a}"' in own, login.stdout
    # Nobody learned the liar's MAC for the victim's address, and the victim still works.
    neighbour = in_netns(netns, ["ip", "neigh", "show", str(b)]).stdout
    assert mac_a not in neighbour, neighbour
    victim = net.ssh(netns, b, f"wget -q -O - {META}")
    assert f'"{vm_b}"' in victim.stdout, victim


async def test_a_guest_that_changes_its_mac_is_cut_off_until_it_changes_back(
    net: NetLab,
) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.53.0/24")
    group = await net.security_group(OPEN)
    port = await net.port(subnet, security_groups=[group])
    vm = await boot(net, "chameleon", [port])
    await wait_booted(net, vm, port)
    netns = net.vpc_netns(vpc)
    address, mac = port.spec.ipv4[0], port.spec.mac
    other_mac = "02:00:5e:00:53:01"
    # In the background (the SSH session cannot survive the change; the guest's busybox
    # has setsid, not nohup): a new MAC for a few
    # seconds, with traffic to the gateway and the metadata service, then the old MAC.
    script = (
        f"ip link set eth0 address {other_mac}; ping -c 3 -W 1 198.18.53.1; "
        f"timeout 3 wget -q -O - {META}; echo wget-exit $?; "
        f"ip link set eth0 address {mac}; echo changed-back"
    )
    with (
        Capture(netns, tap_name(port.id), f"ether src {other_mac}") as sent,
        Capture(netns, bridge_name(subnet.id), f"ether src {other_mac}") as bridged,
    ):
        started = net.ssh(
            netns, address, f"setsid sh -c '{script}' >/tmp/mac.log 2>&1 </dev/null &"
        )
        assert started.returncode == 0, started.stderr
        await asyncio.sleep(2.0)
        assert not await asyncio.to_thread(ping, netns, address, count=2, wait=1.0)

        def back() -> bool:
            log = net.ssh(netns, address, "cat /tmp/mac.log", timeout=10)
            return "changed-back" in log.stdout

        assert await until(back, timeout=30.0) is not None
        frames_sent, frames_bridged = sent.stop(), bridged.stop()
    assert frames_sent, "the guest sent nothing with its new MAC"
    assert frames_bridged == [], frames_bridged
    log = net.ssh(netns, address, "cat /tmp/mac.log").stdout
    assert "wget-exit 0" not in log, log
    assert " 0% packet loss" not in log, log
    # With its own MAC again its traffic flows: ping and its metadata.
    assert await asyncio.to_thread(ping, netns, address, count=2, wait=2.0)
    own = net.ssh(netns, address, f"ping -c 1 -W 2 198.18.53.1 >/dev/null && wget -q -O - {META}")
    assert f'"{vm}"' in own.stdout, own


async def test_a_dhcp_server_in_a_guest_gives_no_lease_on_its_subnet(net: NetLab) -> None:
    await net.keypair()
    vpc = await net.network()
    subnet = await net.subnet(vpc, "198.18.54.0/24")
    # The guest's group lets DHCP requests in, so its server hears them: what stops its
    # offers is anti-spoofing alone.
    dhcp_requests = {"direction": "ingress", "protocol": "udp", "port_min": 67, "port_max": 67}
    group = await net.security_group([*OPEN, dhcp_requests])
    port = await net.port(subnet, security_groups=[group])
    vm = await boot(net, "rogue", [port])
    await wait_booted(net, vm, port)
    netns = net.vpc_netns(vpc)
    address = port.spec.ipv4[0]
    config = (
        "start 198.18.54.200\nend 198.18.54.210\ninterface eth0\n"
        "lease_file /tmp/udhcpd.leases\noption subnet 255.255.255.0\n"
        "option router 198.18.54.1\n"
    )
    started = net.ssh(
        netns,
        address,
        f"printf '{config}' > /tmp/udhcpd.conf; touch /tmp/udhcpd.leases; "
        "udhcpd -a 100 /tmp/udhcpd.conf; sleep 0.5; pidof udhcpd",
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip(), "udhcpd did not start in the guest"
    with (
        SubnetNamespace(netns, bridge_name(subnet.id)) as segment,
        Capture(netns, tap_name(port.id), "udp port 67") as at_guest,
        Capture(segment.netns, segment.link, "udp src port 67") as received,
    ):
        started_at = time.monotonic()
        lease = await asyncio.to_thread(segment.dhcp_lease)
        asked_for = time.monotonic() - started_at
        frames_at_guest, frames_received = at_guest.stop(), received.stop()
        # The namespace is on the segment: with an address of its own it reaches the gateway.
        configured = in_netns(
            segment.netns, ["ip", "addr", "add", "198.18.54.250/24", "dev", segment.link]
        )
        assert configured.returncode == 0, configured.stderr
        on_segment = await asyncio.to_thread(ping, segment.netns, "198.18.54.1", count=2, wait=2.0)
    # The client's requests reached the guest, whose server answered them...
    assert any(".68 > 255.255.255.255.67:" in frame for frame in frames_at_guest)
    assert any(".67 > " in frame for frame in frames_at_guest), frames_at_guest
    # ...but no answer reached the client.
    assert lease is None, f"got a lease of {lease} after {asked_for:.1f} s"
    assert frames_received == [], frames_received
    assert on_segment
    # The guest's own traffic still flows.
    own = net.ssh(netns, address, f"kill $(pidof udhcpd); wget -q -O - {META}")
    assert f'"{vm}"' in own.stdout, own
    # The extra namespace went with its veth; the VM goes with everything of the lab.
    assert segment.netns not in in_netns(netns, ["ip", "netns", "list"]).stdout
    await net.lab.delete(Kind.VM, vm)
    await net.lab.wait_gone(vm)
    await net.lab.wait_state(port.id, "down")
    assert net.lab.leftovers() == []
