"""Security groups: stateful allow-rules on ports; what no rule allows is dropped.

A new group allows all egress (one rule per IP version), as in EC2 and Neutron; give
`rules` explicitly to say exactly what is allowed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from nubes.model.common import NAME_PATTERN, Model

MAX_RULES = 2000
RULE_ID_PATTERN = r"^[a-z0-9]{6,16}$"


class Direction(StrEnum):
    INGRESS = "ingress"  # toward the port's VM
    EGRESS = "egress"  # from the port's VM


class EtherType(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "icmpv6"
    ANY = "any"


class SecurityGroupRuleSpec(Model):
    """Allows traffic. For tcp/udp, `port_min`..`port_max` (none = every port); for icmp
    and icmpv6, `port_min` is the ICMP type (none = every type). The remote end is a CIDR
    or the ports of a group (none = anywhere)."""

    direction: Direction
    ethertype: EtherType = EtherType.IPV4
    protocol: Protocol = Protocol.ANY
    port_min: int | None = Field(default=None, ge=0, le=65535)
    port_max: int | None = Field(default=None, ge=0, le=65535)
    remote_cidr: str | None = None
    remote_group: str | None = Field(default=None, description="sg- id")

    @field_validator("remote_cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_network(value, strict=False))
        except ValueError as error:
            raise ValueError(f"{value!r} is not a CIDR like 198.18.0.0/16: {error}") from None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        v6 = self.ethertype is EtherType.IPV6
        if self.remote_cidr is not None and self.remote_group is not None:
            raise ValueError("give remote_cidr or remote_group, not both")
        if (
            self.remote_cidr is not None
            and (ipaddress.ip_network(self.remote_cidr).version == 6) != v6
        ):
            raise ValueError(f"remote_cidr {self.remote_cidr} is not {self.ethertype}")
        if self.protocol is Protocol.ICMP and v6:
            raise ValueError("icmp is IPv4; use icmpv6 for IPv6 rules")
        if self.protocol is Protocol.ICMPV6 and not v6:
            raise ValueError("icmpv6 needs ethertype ipv6")
        ported = self.protocol in (Protocol.TCP, Protocol.UDP)
        if self.protocol is Protocol.ANY and (self.port_min, self.port_max) != (None, None):
            raise ValueError("ports need protocol tcp or udp")
        if self.protocol in (Protocol.ICMP, Protocol.ICMPV6):
            if self.port_max is not None:
                raise ValueError("for icmp, give the type as port_min and no port_max")
            if self.port_min is not None and self.port_min > 255:
                raise ValueError("an ICMP type is 0 to 255")
        if ported:
            if self.port_min == 0 or self.port_max == 0:
                raise ValueError("ports are 1 to 65535")
            if (self.port_min is None) != (self.port_max is None):
                raise ValueError("give both port_min and port_max, or neither")
            if (
                self.port_min is not None
                and self.port_max is not None
                and self.port_min > self.port_max
            ):
                raise ValueError(f"port_min {self.port_min} > port_max {self.port_max}")
        return self

    @property
    def ports(self) -> tuple[int, int] | None:
        """The tcp/udp port range, or None for every port."""
        if self.port_min is None or self.protocol not in (Protocol.TCP, Protocol.UDP):
            return None
        return self.port_min, self.port_max if self.port_max is not None else self.port_min

    def content_id(self) -> str:
        """A short id derived from what the rule allows: equal rules get equal ids."""
        document = self.model_dump(mode="json")
        fields = {name: document[name] for name in SecurityGroupRuleSpec.model_fields}
        canonical = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:10]


class SecurityGroupRule(SecurityGroupRuleSpec):
    """A rule of a group, with the id it is deleted by. Records written before rules had
    ids get the content id when read, so the id of a rule never changes."""

    id: str = Field(
        default="",  # filled in by _default_id before validation
        pattern=RULE_ID_PATTERN,
        description="stable short id; derived from the rule when not given",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("id"):
            fields = {name: value for name, value in data.items() if name != "id"}
            return {**fields, "id": SecurityGroupRuleSpec.model_validate(fields).content_id()}
        return data


def default_rules() -> list[SecurityGroupRule]:
    return [
        SecurityGroupRule(direction=Direction.EGRESS, ethertype=EtherType.IPV4),
        SecurityGroupRule(direction=Direction.EGRESS, ethertype=EtherType.IPV6),
    ]


class SecurityGroupSpec(Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=255)
    rules: list[SecurityGroupRule] = Field(default_factory=default_rules, max_length=MAX_RULES)


class SecurityGroupRecord(Model):
    id: str
    project: str = "default"
    spec: SecurityGroupSpec
    deleting: bool = False
    created_at: datetime
