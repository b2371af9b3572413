"""The store on a real etcd (3.4+), spoken to over gRPC with the stubs aetcd ships.

Calls wait for the connection to be ready (so a call made while etcd restarts
simply waits for it), reads are retried when a connection drops mid-call, and a
guarded write whose outcome a dropped call left unknown is settled from etcd's
history (etcd_outcome.py). Watches resume from the revision after the last one
they received, so a restart or a leader change neither loses nor repeats a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from nubes.errors import ConfigError, LeaseNotFound, StoreError, StoreUnavailable
from nubes.store.base import (
    Compare,
    CompareTarget,
    Delete,
    Get,
    JsonValue,
    KeyValue,
    Lease,
    Put,
    RangeResult,
    Store,
    TxnOperation,
    TxnResult,
    Watch,
    check_key,
    check_txn_size,
    decode_value,
    encode_value,
    prefix_end,
    range_start,
)
from nubes.store.etcd_outcome import anchor_of, applied_at, first_change_after
from nubes.store.etcd_watch import EtcdWatch

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    # Reconnect quickly after an etcd restart (gRPC's default backoff grows to 2 minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a silent peer; etcd accepts pings every 5 s by default.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # With several members, keep a connection to each: when one dies, calls go on over
    # the others at once instead of waiting for pick_first to dial the next address.
    ("grpc.lb_policy_name", "round_robin"),
]

_COMPARE_TARGETS = {
    CompareTarget.VALUE: rpc.Compare.VALUE,
    CompareTarget.VERSION: rpc.Compare.VERSION,
    CompareTarget.CREATE_REVISION: rpc.Compare.CREATE,
    CompareTarget.MOD_REVISION: rpc.Compare.MOD,
}
_COMPARE_RESULTS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE,)
_UNKNOWN_OUTCOME = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class _OutcomeUnknown(StoreUnavailable):
    """A write's call broke after it was sent: etcd may or may not have applied it."""


def grpc_target(endpoints: Sequence[str]) -> str:
    """The gRPC target for etcd client endpoints given as host:port (http:// accepted).

    Raises:
        ConfigError: an endpoint is malformed, uses TLS, or several name hosts, not addresses.
    """
    addresses = []
    for endpoint in endpoints:
        if endpoint.startswith("https://"):
            raise ConfigError(
                f"etcd endpoint {endpoint!r} uses TLS, which nubes does not support yet",
                hint="use a plain http:// endpoint on a trusted network",
            )
        address = endpoint.removeprefix("http://").rstrip("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"etcd endpoint {endpoint!r} is not host:port", hint="e.g. 127.0.0.1:2379"
            )
        addresses.append((host.strip("[]"), port))
    if len(addresses) == 1:
        host, port = addresses[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    versions = set()
    for host, _ in addresses:
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ConfigError(
                f"etcd endpoint host {host!r} is a name; with several endpoints give IP addresses",
                hint="list the cluster members as address:port",
            ) from None
    if len(versions) != 1:
        raise ConfigError("etcd endpoints mix IPv4 and IPv6 addresses; use one family")
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in addresses)
    return "ipv4:" + ",".join(f"{host}:{port}" for host, port in addresses)


def _kv(message: Any) -> KeyValue:
    return KeyValue(
        key=bytes(message.key).decode("ascii"),
        value=decode_value(message.value),
        create_revision=int(message.create_revision),
        mod_revision=int(message.mod_revision),
        version=int(message.version),
        lease=int(message.lease),
    )


def _txn_result(response: Any) -> TxnResult:
    responses: list[list[KeyValue] | int | None] = []
    for item in response.responses:
        kind = item.WhichOneof("response")
        if kind == "response_range":
            responses.append([_kv(kv) for kv in item.response_range.kvs])
        elif kind == "response_delete_range":
            responses.append(int(item.response_delete_range.deleted))
        else:
            responses.append(None)
    return TxnResult(bool(response.succeeded), int(response.header.revision), responses)


def _txn_request(
    compares: Sequence[Compare],
    on_success: Sequence[TxnOperation],
    on_failure: Sequence[TxnOperation],
) -> Any:
    return rpc.TxnRequest(
        compare=[_compare_message(compare) for compare in compares],
        success=[_operation_message(operation) for operation in on_success],
        failure=[_operation_message(operation) for operation in on_failure],
    )


def _lease_of(operations: Sequence[TxnOperation]) -> int:
    leases = [op.lease for op in operations if isinstance(op, Put) and op.lease]
    return leases[0] if leases else 0


def _compare_message(compare: Compare) -> Any:
    message = rpc.Compare(
        key=check_key(compare.key),
        target=_COMPARE_TARGETS[compare.target],
        result=_COMPARE_RESULTS[compare.operator],
    )
    if compare.target is CompareTarget.VALUE:
        message.value = encode_value(compare.operand)
    else:
        setattr(message, compare.target.value, compare.operand)
    return message


def _range_request(key: str, prefix: bool, limit: int | None = None) -> Any:
    request = rpc.RangeRequest(key=check_key(key), limit=limit or 0)
    if prefix:
        request.range_end = prefix_end(key).encode("ascii")
    return request


def _operation_message(operation: TxnOperation) -> Any:
    if isinstance(operation, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(
                key=check_key(operation.key),
                value=encode_value(operation.value),
                lease=operation.lease,
            )
        )
    if isinstance(operation, Delete):
        request = rpc.DeleteRangeRequest(key=check_key(operation.key))
        if operation.prefix:
            request.range_end = prefix_end(operation.key).encode("ascii")
        return rpc.RequestOp(request_delete_range=request)
    return rpc.RequestOp(request_range=_range_request(operation.key, operation.prefix))


class EtcdStore(Store):
    """The store on etcd. Open it with `await EtcdStore.connect(endpoints)`."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 10.0) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(grpc_target(endpoints), options=_CHANNEL_OPTIONS)
        self._kv_stub = rpc.KVStub(self._channel)
        self._watch_stub = rpc.WatchStub(self._channel)
        self._lease_stub = rpc.LeaseStub(self._channel)
        self._watches: set[EtcdWatch] = set()
        self.settled = 0  # transactions whose lost answer was settled (settle_txn)

    @classmethod
    async def connect(cls, endpoints: Sequence[str], *, timeout: float = 10.0) -> EtcdStore:
        """Connect and check that etcd answers.

        Raises:
            ConfigError: the endpoints are malformed.
            StoreUnavailable: etcd did not answer within `timeout` seconds.
        """
        store = cls(endpoints, timeout=timeout)
        try:
            await store.current_revision()
        except BaseException:
            await store.close()
            raise
        return store

    # -- calling etcd -----------------------------------------------------------

    def _unavailable(self, detail: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"etcd at {', '.join(self.endpoints)} {detail}",
            hint="check that etcd runs and store.endpoints in nubes.toml names it",
        )

    async def _call(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Any,
        *,
        idempotent: bool,
        lease_id: int = 0,
    ) -> Any:
        """One unary call. Reads are retried until the timeout when the connection drops."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._unavailable(f"did not answer within {self.timeout:g} s")
            try:
                return await method(request, timeout=remaining, wait_for_ready=True)
            except grpc.aio.AioRpcError as error:
                if error.code() in _TRANSIENT and idempotent:
                    await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(delay * 2, 1.0)
                    continue
                if error.code() in _UNKNOWN_OUTCOME and not idempotent:
                    raise _OutcomeUnknown(
                        self._translate(error, lease_id).message,
                        hint="read the key again before retrying",
                    ) from None
                raise self._translate(error, lease_id) from None

    def _translate(self, error: grpc.aio.AioRpcError, lease_id: int = 0) -> StoreError:
        code, details = error.code(), error.details() or ""
        if "lease not found" in details:
            return LeaseNotFound(lease_id)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._unavailable(f"did not answer within {self.timeout:g} s")
        if code is grpc.StatusCode.UNAVAILABLE:
            return self._unavailable(
                "dropped the connection during a write; its outcome is unknown "
                f"({details}): read the key again before retrying"
            )
        return StoreError(f"etcd refused the request: {details} ({code.name})")

    # -- key-value operations ---------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        response = await self._call(
            self._kv_stub.Range, _range_request(key, prefix=False), idempotent=True
        )
        return _kv(response.kvs[0]) if response.kvs else None

    async def range(
        self, prefix: str, *, limit: int | None = None, start: str | None = None
    ) -> RangeResult:
        request = _range_request(prefix, prefix=True, limit=limit)
        request.key = range_start(prefix, start).encode("ascii")
        response = await self._call(self._kv_stub.Range, request, idempotent=True)
        return RangeResult([_kv(kv) for kv in response.kvs], int(response.header.revision))

    async def put(self, key: str, value: JsonValue, *, lease: int = 0) -> int:
        request = rpc.PutRequest(key=check_key(key), value=encode_value(value), lease=lease)
        # Writing the same value twice leaves the same state, so a broken call is retried.
        response = await self._call(self._kv_stub.Put, request, idempotent=True, lease_id=lease)
        return int(response.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        request = rpc.DeleteRangeRequest(key=check_key(key))
        if prefix:
            request.range_end = prefix_end(key).encode("ascii")
        response = await self._call(self._kv_stub.DeleteRange, request, idempotent=False)
        return int(response.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation] = (),
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        check_txn_size(on_success, on_failure)
        request = _txn_request(compares, on_success, on_failure)
        read_only = all(isinstance(op, Get) for op in (*on_success, *on_failure))
        try:
            response = await self._call(
                self._kv_stub.Txn, request, idempotent=read_only, lease_id=_lease_of(on_success)
            )
        except _OutcomeUnknown:
            if anchor_of(compares, on_success, on_failure) is None:
                raise
            return await self.settle_txn(compares, on_success, on_failure)
        return _txn_result(response)

    async def settle_txn(
        self,
        compares: Sequence[Compare],
        on_success: Sequence[TxnOperation],
        on_failure: Sequence[TxnOperation] = (),
    ) -> TxnResult:
        """The outcome of a transaction already sent once whose answer was lost: send it
        again (its guard stops a second application); when the guard then fails, etcd's
        history tells whether the first attempt was the write that changed the guarded key.

        Raises:
            ValueError: the transaction has no guard that makes sending it again safe.
            StoreUnavailable: etcd did not answer within the timeout.
            StoreError: the history needed was compacted away.
        """
        anchor = anchor_of(compares, on_success, on_failure)
        if anchor is None:
            raise ValueError("only a create or a compare-and-swap can be settled")
        self.settled += 1
        request = _txn_request(compares, on_success, on_failure)
        lease_id = _lease_of(on_success)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                response = await self._call(
                    self._kv_stub.Txn, request, idempotent=False, lease_id=lease_id
                )
                break
            except _OutcomeUnknown:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        result = _txn_result(response)
        if result.succeeded:
            return result
        revision = await first_change_after(self, anchor)
        if revision:
            responses = await applied_at(self, revision, on_success)
            if responses is not None:
                return TxnResult(True, revision, responses)
        return result

    # The history the settling reads (etcd_outcome.History).

    async def get_now(self, key: str) -> KeyValue | None:
        return await self.get(key)

    async def get_at(self, key: str, revision: int) -> KeyValue | None:
        request = _range_request(key, prefix=False)
        request.revision = revision
        response = await self._call(self._kv_stub.Range, request, idempotent=True)
        return _kv(response.kvs[0]) if response.kvs else None

    async def count_at(self, key: str, prefix: bool, revision: int) -> int:
        request = _range_request(key, prefix=prefix)
        request.revision = revision
        request.count_only = True
        response = await self._call(self._kv_stub.Range, request, idempotent=True)
        return int(response.count)

    async def current_revision(self) -> int:
        # A range over a key nobody writes reads only the header.
        response = await self._call(
            self._kv_stub.Range,
            rpc.RangeRequest(key=b"\x00nubes-revision-probe", count_only=True),
            idempotent=True,
        )
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        try:
            await self._call(
                self._kv_stub.Compact,
                rpc.CompactionRequest(revision=revision, physical=True),
                idempotent=True,
            )
        except StoreError as error:
            if "required revision has been compacted" in error.message:
                return  # already compacted at least that far
            if "future revision" in error.message:
                raise ValueError(f"cannot compact to {revision}: it is a future revision") from None
            raise

    # -- leases -----------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError(f"a lease lives at least 1 second, got ttl={ttl}")
        response = await self._call(
            # A grant lost with a broken call only leaves a lease that expires unused.
            self._lease_stub.LeaseGrant,
            rpc.LeaseGrantRequest(TTL=ttl),
            idempotent=True,
        )
        if response.error:
            raise StoreError(f"etcd refused the lease: {response.error}")
        return Lease(int(response.ID), int(response.TTL))

    async def lease_keepalive(self, lease_id: int) -> int:
        async def once() -> Any:
            call = self._lease_stub.LeaseKeepAlive(wait_for_ready=True)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                return await call.read()
            finally:
                call.cancel()

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    response = await once()
                break
            except TimeoutError:
                raise self._unavailable(f"did not answer within {self.timeout:g} s") from None
            except grpc.aio.AioRpcError as error:
                # A keepalive is idempotent: retry while the connection comes back.
                if error.code() not in _TRANSIENT or time.monotonic() > deadline:
                    raise self._translate(error, lease_id) from None
                await asyncio.sleep(0.1)
        if response is grpc.aio.EOF or int(response.TTL) <= 0:
            raise LeaseNotFound(lease_id)
        return int(response.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                self._lease_stub.LeaseRevoke, request, idempotent=False, lease_id=lease_id
            )
        except _OutcomeUnknown:
            # Revoke again: "not found" then means the first attempt did it.
            with contextlib.suppress(LeaseNotFound):
                await self._call(
                    self._lease_stub.LeaseRevoke, request, idempotent=True, lease_id=lease_id
                )

    # -- watches ----------------------------------------------------------------

    def watch(self, prefix: str, from_revision: int | None = None) -> Watch:
        check_key(prefix)
        if from_revision is not None and from_revision < 1:
            raise ValueError(f"revisions start at 1, got from_revision={from_revision}")
        watch = EtcdWatch(self, prefix, from_revision)
        self._watches.add(watch)
        return watch

    def _forget_watch(self, watch: EtcdWatch) -> None:
        self._watches.discard(watch)

    async def close(self) -> None:
        for watch in list(self._watches):
            await watch.close()
        await self._channel.close()
