"""`Client`: every API resource as plain methods returning the API's JSON (dicts).

Refs are ids or names (a name is looked up in the caller's project when the API's path
wants an id). Lists are iterators that fetch pages as they are consumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nubes.client.base import (
    FLOATING_IP,
    IMAGE,
    KEYPAIR,
    NETWORK,
    PORT,
    SECURITY_GROUP,
    SUBNET,
    TOKEN,
    VM,
    VOLUME,
    BaseClient,
    Json,
    drop_none,
    state_of,
)
from nubes.client.errors import ApiError, ResourceFailed, WaitTimeout
from nubes.client.http import Event, segment

UPLOAD_CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


class Client(BaseClient):
    """The nubes API. Every method raises ApiError (the API refused), ApiUnreachable
    (nothing answers) or NotLoggedIn (no token) unless it says otherwise."""

    # -- auth -----------------------------------------------------------------------------

    def login(
        self,
        user: str,
        password: str,
        project: str | None = None,
        totp: str | None = None,
        ttl_hours: float | None = None,
    ) -> str:
        """Logs in, keeps the token for the next calls and returns it.

        Raises:
            ApiError: `unauthorized` for a wrong user, password or TOTP code.
        """
        body = {
            "user": user,
            "password": password,
            "project": project,
            "totp": totp,
            "ttl_hours": ttl_hours,
        }
        answer = self.call("POST", "/auth/login", json_body=drop_none(body), authenticated=False)
        self.token = str(answer["token"])
        self.last_login = answer
        return self.token

    def logout(self) -> None:
        """Revokes the token in use (it stops working at once) and forgets it."""
        self.call("DELETE", "/auth/token")
        self.token = None

    def create_token(self, description: str = "", ttl_hours: float | None = None) -> Json:
        """A new token for the caller in its project; `token` in the answer is shown once."""
        return self.create(TOKEN, {"description": description, "ttl_hours": ttl_hours})

    def list_tokens(self, **filters: Any) -> Iterator[Json]:
        return self.records(TOKEN, **filters)

    def revoke_token(self, token_id: str) -> None:
        self.delete(TOKEN, token_id)

    def enable_totp(self) -> Json:
        """Starts two-factor login: the answer's secret is active once confirmed."""
        result: Json = self.call("POST", "/auth/totp")
        return result

    def confirm_totp(self, code: str) -> Json:
        result: Json = self.call("POST", "/auth/totp/confirm", json_body={"code": code})
        return result

    def disable_totp(self, code: str) -> Json:
        result: Json = self.call("DELETE", "/auth/totp", json_body={"code": code})
        return result

    def whoami(self) -> Json:
        result: Json = self.call("GET", "/auth/whoami")
        return result

    def health(self) -> Json:
        result: Json = self.call("GET", "/health", authenticated=False)
        return result

    # -- VMs --------------------------------------------------------------------------------

    def list_vms(self, **filters: Any) -> Iterator[Json]:
        return self.records(VM, **filters)

    def get_vm(self, ref: str) -> Json:
        return self.get(VM, ref)

    def create_vm(self, name: str, **fields: Any) -> Json:
        return self.create(VM, {"name": name, **fields})

    def delete_vm(self, ref: str) -> Json | None:
        return self.delete(VM, ref)

    def start_vm(self, ref: str) -> Json:
        result: Json = self.action(VM, ref, "start")
        return result

    def stop_vm(self, ref: str, force: bool = False, timeout: float | None = None) -> Json:
        """Stops the VM: the power button (turning hard after `timeout` s), or with `force`
        the plug."""
        result: Json = self.action(VM, ref, "stop", {"force": force, "timeout": timeout})
        return result

    def reboot_vm(self, ref: str) -> Json:
        result: Json = self.action(VM, ref, "reboot")
        return result

    def resize_vm(self, ref: str, flavor: str) -> Json:
        """Gives the VM another flavor; a running VM takes it at its next start."""
        result: Json = self.action(VM, ref, "resize", {"flavor": flavor})
        return result

    def attach_volume(self, ref: str, volume: str) -> Json:
        result: Json = self.action(VM, ref, "volumes", {"volume": volume})
        return result

    def detach_volume(self, ref: str, volume: str) -> Json:
        result: Json = self.action(VM, ref, f"volumes/{segment(volume)}", method="DELETE")
        return result

    def console_log(self, ref: str, lines: int = 100) -> Json:
        """The last `lines` lines of the VM's serial console: `{lines, truncated, host}`."""
        result: Json = self.action(VM, ref, "console", method="GET", params={"lines": lines})
        return result

    def migrate_vm(self, ref: str, host: str | None = None, *, live: bool = True) -> Json:
        """Moves the VM to `host` (None: the scheduler chooses), running (`live`) or stopped
        (admin). Follow it with `wait_migration`."""
        body = {"host": host, "live": live}
        result: Json = self.action(VM, ref, "migrate", body)
        return result

    def get_migration(self, ref: str) -> Json:
        """The progress of the VM's last move: state, source, target, bytes, downtime_ms."""
        result: Json = self.action(VM, ref, "migration", method="GET")
        return result

    def wait_migration(
        self,
        ref: str,
        timeout: float = 600.0,
        *,
        interval: float = 0.2,
        progress: Callable[[Json], None] | None = None,
    ) -> Json:
        """Polls the VM's move until it completes; `progress` sees every answer.

        Raises:
            ResourceFailed: the move failed and was rolled back (the message says why).
            WaitTimeout: `timeout` seconds passed first.
        """
        deadline = time.monotonic() + timeout
        while True:
            moving = self.get_migration(ref)
            if progress is not None:
                progress(moving)
            if moving.get("state") == "completed":
                return moving
            if moving.get("state") == "failed":
                raise ResourceFailed(
                    f"moving VM {ref} to {moving.get('target')} failed: {moving.get('reason')}",
                    hint=f"it still runs on {moving.get('source')}; see `nubes vm show {ref}`",
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"VM {ref} is still moving ({moving.get('state')}) after {timeout:g} s",
                    hint="wait longer with --timeout",
                )
            time.sleep(interval)

    def wait_vm(
        self,
        ref: str,
        state: str = "running",
        timeout: float = 300.0,
        *,
        interval: float = 0.2,
        gone: bool = False,
    ) -> Json | None:
        """Polls the VM until its status is `state` (or, with `gone`, until it is deleted).

        Raises:
            ResourceFailed: the VM went to `error` (the message carries the agent's reason).
            WaitTimeout: `timeout` seconds passed first.
            ApiError: `not_found` when the VM is deleted while waited for a state.
        """
        vm_id = self.resolve(VM, ref)
        deadline = time.monotonic() + timeout
        last: str | None = None
        while True:
            try:
                record = self.get(VM, vm_id)
            except ApiError as error:
                if gone and error.status == 404:
                    return None
                raise
            last = state_of(record)
            if not gone and last == state:
                return record
            if last == "error" or (last == "deleting" and not gone and state != last):
                reason = (record.get("status") or {}).get("reason") or (
                    "it is being deleted" if last == "deleting" else "no reason given"
                )
                raise ResourceFailed(
                    f"VM {vm_id} went to {last}: {reason}",
                    hint=f"see `nubes vm show {vm_id}` and `nubes vm console-log {vm_id}`",
                )
            if time.monotonic() >= deadline:
                wanted = "to be deleted" if gone else f"to be {state}"
                raise WaitTimeout(
                    f"VM {vm_id} is still {last or 'without a status'} after waiting "
                    f"{timeout:g} s {wanted}",
                    hint="wait longer with --timeout, or see `nubes vm show` for why",
                )
            time.sleep(interval)

    # -- images ------------------------------------------------------------------------------

    def list_images(self, **filters: Any) -> Iterator[Json]:
        return self.records(IMAGE, **filters)

    def get_image(self, ref: str) -> Json:
        return self.get(IMAGE, ref)

    def delete_image(self, ref: str) -> Json | None:
        return self.delete(IMAGE, ref)

    def upload_image(
        self,
        name: str,
        path: Path | str,
        *,
        kernel: Path | str | None = None,
        initrd: Path | str | None = None,
        cmdline: str | None = None,
        disk_format: str | None = None,
        public: bool = False,
        progress: Progress | None = None,
    ) -> Json:
        """Uploads a disk image (and a kernel and initrd for direct boot), streaming the
        files chunk by chunk: they are never read whole into memory.

        Raises:
            ApiError: the API refused the image (format, size, name taken, ...).
            OSError: a file cannot be read.
        """
        files = [Path(f) for f in (kernel, initrd) if f is not None] + [Path(path)]
        sizes = [f.stat().st_size for f in files]
        params = {
            "name": name,
            "format": disk_format,
            "kernel_size": sizes[0] if kernel is not None else None,
            "initrd_size": sizes[-2] if initrd is not None else None,
            "cmdline": cmdline,
            "public": public or None,
        }
        result: Json = self.call(
            "POST",
            IMAGE.path,
            params=params,
            content=_chunks(files, sum(sizes), progress),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(sum(sizes))},
            timeout=None,
        )
        return result

    def import_image(
        self,
        name: str,
        url: str,
        *,
        kernel_url: str | None = None,
        initrd_url: str | None = None,
        cmdline: str | None = None,
        disk_format: str | None = None,
        public: bool = False,
    ) -> Json:
        """Asks the API to fetch an image from URLs; poll `image_import(id)` for progress."""
        body = {
            "name": name,
            "url": url,
            "kernel_url": kernel_url,
            "initrd_url": initrd_url,
            "cmdline": cmdline,
            "format": disk_format,
            "public": public,
        }
        result: Json = self.call("POST", f"{IMAGE.path}/import", json_body=drop_none(body))
        return result

    def image_import(self, image_id: str) -> Json:
        """How an import goes: state, bytes_done, bytes_total, reason, and the image when active."""
        result: Json = self.call("GET", f"{IMAGE.path}/imports/{segment(image_id)}")
        return result

    def wait_import(
        self,
        image_id: str,
        timeout: float = 3600.0,
        *,
        interval: float = 0.25,
        progress: Callable[[Json], None] | None = None,
    ) -> Json:
        """Polls an import until the image is active; returns the image.

        Raises:
            ResourceFailed: the import failed (the message carries the API's reason).
            WaitTimeout: `timeout` seconds passed first.
        """
        deadline = time.monotonic() + timeout
        while True:
            report = self.image_import(image_id)
            if progress is not None:
                progress(report)
            if report.get("image") is not None or report.get("state") == "active":
                image: Json = report.get("image") or self.get_image(image_id)
                return image
            if report.get("state") == "failed":
                raise ResourceFailed(
                    f"the import of image {image_id} failed: {report.get('reason')}",
                    hint="check the URL is reachable from the API host and is an image",
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"the import of image {image_id} is still {report.get('state')} "
                    f"after {timeout:g} s",
                    hint=f"check on it with `nubes image import-status {image_id}`",
                )
            time.sleep(interval)

    # -- key pairs, networks, subnets, ports ------------------------------------------------

    def create_keypair(self, name: str, public_key: str) -> Json:
        return self.create(KEYPAIR, {"name": name, "public_key": public_key})

    def create_network(
        self,
        name: str,
        *,
        mtu: int | None = None,
        external_gateway: str | None = None,
        external: Json | None = None,
    ) -> Json:
        """A VPC (with `external_gateway`, its way out), or with `external` (admin) an
        external network `{physical_network, cidr, gateway}`."""
        body = {"name": name, "mtu": mtu, "external_gateway": external_gateway}
        return self.create(NETWORK, {**body, "external": external})

    def create_subnet(self, name: str, network: str, cidr: str, **fields: Any) -> Json:
        """fields: gateway, ipv6_cidr, ipam (none, manual, automatic), dhcp, dns_nameservers."""
        return self.create(SUBNET, {"name": name, "network": network, "cidr": cidr, **fields})

    def create_port(self, network: str, **fields: Any) -> Json:
        return self.create(PORT, {"network": network, **fields})

    # -- security groups ---------------------------------------------------------------------

    def create_security_group(self, name: str, description: str = "") -> Json:
        return self.create(SECURITY_GROUP, {"name": name, "description": description})

    def add_rule(self, group: str, **rule: Any) -> Json:
        """rule: direction, protocol, port_min, port_max, remote_cidr, remote_group, ethertype."""
        result: Json = self.action(SECURITY_GROUP, group, "rules", rule)
        return result

    def delete_rule(self, group: str, rule_id: str) -> Any:
        return self.action(SECURITY_GROUP, group, f"rules/{segment(rule_id)}", method="DELETE")

    # -- floating IPs ------------------------------------------------------------------------

    def create_floating_ip(self, network: str, port: str | None = None) -> Json:
        """A floating IP from external network `network`, associated with `port` if given."""
        return self.create(FLOATING_IP, {"network": network, "port": port})

    def associate_floating_ip(self, ref: str, port: str) -> Json:
        result: Json = self.action(FLOATING_IP, ref, "associate", {"port": port})
        return result

    def disassociate_floating_ip(self, ref: str) -> Json:
        result: Json = self.action(FLOATING_IP, ref, "disassociate")
        return result

    # -- volumes and snapshots ---------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        size_gb: int | None = None,
        image: str | None = None,
        pool: str | None = None,
    ) -> Json:
        return self.create(VOLUME, {"name": name, "size_gb": size_gb, "image": image, "pool": pool})

    def resize_volume(self, ref: str, size_gb: int) -> Json:
        return self.update(VOLUME, ref, {"size_gb": size_gb})

    def create_snapshot(self, volume: str, name: str) -> Json:
        result: Json = self.action(VOLUME, volume, "snapshots", {"name": name})
        return result

    def list_snapshots(self, volume: str) -> list[Json]:
        answer = self.action(VOLUME, volume, "snapshots", method="GET")
        items: list[Json] = answer.get("items", [])
        return items

    def delete_snapshot(self, volume: str, name: str) -> Any:
        return self.action(VOLUME, volume, f"snapshots/{segment(name)}", method="DELETE")

    def revert_volume(self, volume: str, snapshot: str) -> Json:
        result: Json = self.action(VOLUME, volume, "revert", {"snapshot": snapshot})
        return result

    def wait_volume(self, ref: str, state: str = "available", timeout: float = 300.0) -> Json:
        """Polls a volume until its status is `state`.

        Raises:
            ResourceFailed: it went to `error`. WaitTimeout: `timeout` passed first.
        """
        return self.wait_for(VOLUME, ref, state, timeout)

    # -- usage -------------------------------------------------------------------------------

    def usage(
        self, project: str | None = None, start: str | None = None, end: str | None = None
    ) -> Json:
        """What `project` (default: the token's) used from `start` to `end` (dates, ISO 8601
        times or `now`; default: the first of this month to now), as the API's UsageReport.

        Raises:
            ApiError: `invalid_input` for a bad date or an empty period; `not_found` for a
                project the caller is not in.
        """
        params = {"project": project, "from": start, "to": end}
        result: Json = self.call("GET", "/usage", params=params)
        return result

    # -- watch -------------------------------------------------------------------------------

    def watch(
        self,
        kinds: Sequence[str] | None = None,
        since: int | None = None,
        *,
        timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Iterator[Event]:
        """Changes of the caller's resources as server-sent events (`put` or `delete`, `id`
        the store revision, `data` the API's WatchData) until the stream ends (`timeout`).

        Raises:
            ApiError: the API ended the stream with an error event (`store_compacted`:
                list again and watch from there).
        """
        params = {"kinds": ",".join(kinds) if kinds else None, "since": since, "timeout": timeout}
        for event in self.events("/watch", params, read_timeout=read_timeout):
            if event.type == "error":
                body = event.data if isinstance(event.data, dict) else {}
                status = 410 if body.get("code") == "store_compacted" else 503
                raise ApiError.from_response(status, body, "the watch ended")
            yield event

    # -- events ------------------------------------------------------------------------------

    def list_events(
        self,
        resource: str | None = None,
        kind: str | None = None,
        *,
        project: str | None = None,
        last: int | None = None,
    ) -> Iterator[Json]:
        """Events, oldest first (every page), or only the newest `last` of them."""
        params = {"resource": resource, "kind": kind, "project": project}
        if last is None:
            return self.pages("/events", params)
        page = self.call("GET", "/events", params={**params, "limit": last, "tail": True})
        return iter(page.get("items", []))

    def watch_events(
        self,
        resource: str | None = None,
        kind: str | None = None,
        *,
        project: str | None = None,
        after: str | None = None,
        timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Iterator[Json]:
        """New events as they are written, until the stream ends (`timeout`); with `after`
        (a cursor), first the events after it, so none written since a listing is missed.

        Raises:
            ApiError: the API ended the stream with an error event.
        """
        params = {
            "resource": resource,
            "kind": kind,
            "project": project,
            "after": after,
            "timeout": timeout,
        }
        for event in self.events("/events/watch", params, read_timeout=read_timeout):
            if event.type == "error":
                body = event.data if isinstance(event.data, dict) else {}
                raise ApiError.from_response(503, body, "the event watch ended")
            if isinstance(event.data, dict):
                yield event.data


def _chunks(files: Sequence[Path], total: int, progress: Progress | None) -> Iterable[bytes]:
    done = 0
    for source in files:
        with source.open("rb") as file:
            while chunk := file.read(UPLOAD_CHUNK):
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
                yield chunk
