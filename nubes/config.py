"""nubes settings: a TOML file, overridden by environment variables, validated by pydantic.

The file is `$NUBES_CONFIG` when set, else `/etc/nubes/nubes.toml` when it exists,
else built-in defaults. `NUBES_<SECTION>__<KEY>=value` overrides one setting,
for example `NUBES_STORE__ENGINE=etcd` or
`NUBES_STORE__ENDPOINTS=127.0.0.1:2379,127.0.0.1:22379` (lists are comma-separated).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nubes.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/nubes/nubes.toml")
CONFIG_PATH_VARIABLE = "NUBES_CONFIG"
ENV_PREFIX = "NUBES_"
ENV_SECTION_SEPARATOR = "__"


def _comma_separated(value: object) -> object:
    """Lists may be written as one comma-separated string (the form environment variables take)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreEngine(StrEnum):
    SQLITE = "sqlite"
    ETCD = "etcd"


class StoreConfig(_Section):
    """Where nubes keeps its state: the embedded SQLite file, or an etcd cluster."""

    engine: StoreEngine = StoreEngine.SQLITE
    path: Path | None = Field(
        default=None,
        description="SQLite database file; defaults to <state_dir>/nubes.db",
    )
    endpoints: Annotated[list[str], BeforeValidator(_comma_separated)] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        min_length=1,
        description="etcd client endpoints as host:port (an http:// prefix is accepted)",
    )
    timeout: float = Field(
        default=10.0, gt=0, le=300, description="seconds to wait for the store before giving up"
    )
    history_revisions: int = Field(
        default=100_000,
        ge=1_000,
        description="SQLite: revisions of history kept for watches before compaction",
    )


class Accel(StrEnum):
    """How the agent runs guests: KVM when it works (`auto`), or always one or the other."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


_HOST_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_PREFIX = r"^[a-z][a-z0-9]{0,5}$"


def _default_host_name() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return name if re.fullmatch(_HOST_NAME, name) else "localhost"


class AgentConfig(_Section):
    """The host agent: who it is, where it keeps its files, how it runs QEMU."""

    host: str = Field(
        default_factory=_default_host_name,
        pattern=_HOST_NAME,
        description="this host's name in the store (lowercase letters, digits, '-')",
    )
    state_dir: Path | None = Field(
        default=None, description="VM disks, volumes, image cache; defaults to <state_dir>/agent"
    )
    run_dir: Path = Field(
        default=Path("/run/nubes/agent"),
        description="pidfiles and sockets; on tmpfs, so a host reboot clears it",
    )
    prefix: str = Field(
        default="nb",
        pattern=_PREFIX,
        description="marks this agent's namespaces, interfaces and processes "
        "(several agents on one machine use different prefixes)",
    )
    accel: Accel = Accel.AUTO
    qemu: str = Field(default="qemu-system-x86_64", description="the QEMU system emulator")
    machine: str = Field(default="q35", pattern=r"^[a-z0-9.-]{1,40}$")
    soft_stop_timeout: float = Field(
        default=60.0, ge=0, le=3600, description="seconds a guest gets to power off before quit"
    )
    resync_interval: float = Field(
        default=30.0, gt=0, le=3600, description="seconds between full reconcile passes"
    )
    heartbeat_ttl: int = Field(
        default=8,
        ge=2,
        le=300,
        # 8, not 10: etcd ends a lease up to 0.5 s after its TTL, and the last keepalive
        # came before the host died, so a dead host is down within 10 s.
        description="seconds the host stays alive without a heartbeat",
    )
    hotplug_slots: int = Field(
        default=8, ge=0, le=30, description="PCIe slots kept free for volume hotplug"
    )
    underlay_address: IPv4Address = Field(
        default=IPv4Address("127.0.0.1"),
        description="the address VXLAN tunnels bind on this host (the host's underlay IP)",
    )
    underlay_netns: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the network namespace that holds underlay_address (default: the agent's own)",
    )
    vxlan_port: int = Field(default=4789, ge=1, le=65535, description="VXLAN UDP port")
    external_bridges: dict[str, str] = Field(
        default_factory=dict,
        description="external network's physical_network -> host bridge its VPCs plug into",
    )

    storage_pools: dict[str, Path] = Field(
        default_factory=dict,
        description="shared storage pools: name -> a directory every host mounts at the same "
        "path (NFS, CephFS); 'local' is the agent's state dir and always exists",
    )
    metrics_listen: str = Field(
        default="127.0.0.1", description="address the agent's Prometheus /metrics binds"
    )
    metrics_port: int = Field(
        default=8687, ge=0, le=65535, description="port of the agent's /metrics; 0 turns it off"
    )

    @field_validator("storage_pools")
    @classmethod
    def _pool_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, path in value.items():
            if name == "local":
                raise ValueError("the pool name 'local' is reserved for the agent's state dir")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name):
                raise ValueError(f"{name!r} is not a storage pool name (letters, digits, ._-)")
            if not path.is_absolute():
                raise ValueError(f"storage pool {name}: {str(path)!r} is not an absolute path")
        return value

    @field_validator("external_bridges")
    @classmethod
    def _bridge_names(cls, value: dict[str, str]) -> dict[str, str]:
        for physical, bridge in value.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", physical):
                raise ValueError(f"{physical!r} is not a physical network name")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,14}", bridge):
                raise ValueError(f"{bridge!r} is not a Linux interface name")
        return value


class ApiConfig(_Section):
    """[api]: the HTTP API."""

    listen: str = Field(
        default="127.0.0.1", description="address the API binds; 0.0.0.0 exposes it to the network"
    )
    port: int = Field(default=8686, ge=1, le=65535)
    tls_cert: Path | None = Field(default=None, description="PEM certificate: serve HTTPS")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    token_ttl_hours: float = Field(default=12, gt=0, le=24 * 365)
    import_allow: Annotated[list[str], BeforeValidator(_comma_separated)] = Field(
        default_factory=list,
        description="hosts image import may fetch URLs from ('*' for any); empty refuses URLs",
    )
    metrics: bool = Field(
        default=True,
        description="serve Prometheus /metrics (no token: counts, host names and sizes)",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class SchedulerConfig(_Section):
    """The scheduler: how it weighs hosts and how far it lets VMs overcommit them."""

    strategy: Literal["spread", "pack"] = Field(
        default="spread",
        description="spread: the host with the most room left; pack: the fullest that fits",
    )
    cpu_overcommit: float = Field(
        default=4.0, ge=1.0, le=64.0, description="vCPUs bound per real CPU, at most"
    )
    memory_overcommit: float = Field(
        default=1.0, ge=0.1, le=8.0, description="memory bound per MiB of the host, at most"
    )
    disk_overcommit: float = Field(
        default=1.0, ge=0.1, le=64.0, description="disk bound per GB of the host, at most"
    )
    resync_interval: float = Field(
        default=30.0, gt=0, le=3600, description="seconds between full passes behind the watches"
    )


class EventsConfig(_Section):
    """[events]: how much of the event log the store keeps (the oldest go first)."""

    retention_count: int = Field(
        default=100_000, ge=100, description="events kept at most, over every resource"
    )
    retention_days: float = Field(
        default=30.0, gt=0, le=3650, description="events older than this many days are removed"
    )


class MeteringConfig(_Section):
    """[metering]: usage accounting (VM-minutes, volume GiB-hours, floating-IP hours)."""

    keep_days: int = Field(
        default=400, ge=1, le=100 * 365, description="closed usage intervals kept this long"
    )


class NubesConfig(_Section):
    """All nubes settings."""

    state_dir: Path = Path("/var/lib/nubes")
    store: StoreConfig = Field(default_factory=StoreConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)

    @property
    def image_dir(self) -> Path:
        """The image store: every registered image's files, by id."""
        return self.state_dir / "images"

    @property
    def agent_state_dir(self) -> Path:
        """Where this host's agent keeps VM disks, volumes and its image cache."""
        return self.agent.state_dir or self.state_dir / "agent"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file this configuration names."""
        return self.store.path or self.state_dir / "nubes.db"


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> NubesConfig:
    """Read the settings file and the environment overrides.

    Raises:
        ConfigError: the file is missing (when named explicitly), unreadable,
            not TOML, or a setting is unknown or invalid. The message names the
            setting, where it came from, and what is expected.
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or CONFIG_PATH_VARIABLE in environ
    if path is None:
        path = Path(environ.get(CONFIG_PATH_VARIABLE, DEFAULT_CONFIG_PATH))

    document: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    if path.exists() or explicit:
        document = _read_toml(path)
        sources.update({loc: str(path) for loc in _leaf_paths(document)})
    for loc, value, variable in _environment_overrides(environ):
        _set_nested(document, loc, value)
        sources[loc] = f"environment variable {variable}"

    try:
        return NubesConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(_describe(error, sources, path)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} does not exist",
            hint=f"create it, or unset {CONFIG_PATH_VARIABLE} to use the defaults",
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file {path} is not valid TOML: {error}") from None


def _environment_overrides(
    environ: Mapping[str, str],
) -> list[tuple[tuple[str, ...], str, str]]:
    """(setting path, value, variable name) for every NUBES_* variable that names a setting."""
    overrides = []
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_PATH_VARIABLE:
            continue
        name = variable.removeprefix(ENV_PREFIX).lower()
        loc = tuple(name.split(ENV_SECTION_SEPARATOR))
        if loc[0] not in NubesConfig.model_fields:
            continue  # NUBES_* variables of other tools (tests, benchmarks) are not settings
        overrides.append((loc, value, variable))
    return overrides


def _set_nested(document: dict[str, Any], loc: tuple[str, ...], value: str) -> None:
    node = document
    for part in loc[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[loc[-1]] = value


def _leaf_paths(document: Mapping[str, Any], parent: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in document.items():
        if isinstance(value, Mapping):
            paths.extend(_leaf_paths(value, (*parent, key)))
        else:
            paths.append((*parent, key))
    return paths


def _describe(error: ValidationError, sources: dict[tuple[str, ...], str], path: Path) -> str:
    lines = ["invalid configuration:"]
    for problem in error.errors():
        loc = tuple(str(part) for part in problem["loc"])
        setting = ".".join(loc)
        source = _source_of(loc, sources) or f"defaults (no setting in {path})"
        if problem["type"] == "extra_forbidden":
            known = _known_settings(loc[:-1])
            lines.append(
                f"  {setting}: unknown setting (from {source}); "
                f"known settings here: {', '.join(known)}"
            )
            continue
        given = problem.get("input")
        shown = f" (got {given!r})" if not isinstance(given, dict) else ""
        lines.append(f"  {setting}: {problem['msg']}{shown} (from {source})")
    return "\n".join(lines)


def _source_of(loc: tuple[str, ...], sources: dict[tuple[str, ...], str]) -> str | None:
    for length in range(len(loc), 0, -1):
        if loc[:length] in sources:
            return sources[loc[:length]]
    return None


def _known_settings(section: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = NubesConfig
    for part in section:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)
