"""Security groups and their rules: what traffic a project's ports may send and receive.

A rule's id is derived from what it allows, so equal rules have equal ids and a group
never holds the same rule twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated

from fastapi import APIRouter, Body, Query, Response
from fastapi.openapi.models import Example
from pydantic import ConfigDict, Field

from nubes.api.context import Caller, CallerDep, ContextDep
from nubes.api.netops import (
    RACE_ATTEMPTS,
    ResourceInUse,
    find_groups,
    merge_guards,
    raced,
    references_key,
    references_snapshot,
    scan,
    shown,
    takes_reference,
)
from nubes.api.openapi_links import link, links
from nubes.api.params import CursorQuery, LimitQuery
from nubes.api.records import DEFAULT_PAGE, Guards, Records, name_guard
from nubes.errors import Conflict, InvalidInput, NotFound
from nubes.ids import IdKind, new_id
from nubes.model.common import NAME_PATTERN, Model, now
from nubes.model.network import PortRecord
from nubes.model.security_group import (
    MAX_RULES,
    SecurityGroupRecord,
    SecurityGroupRule,
    SecurityGroupRuleSpec,
    SecurityGroupSpec,
    default_rules,
)
from nubes.store.base import Delete, Store
from nubes.store.keys import Kind, name_key

router = APIRouter(tags=["security-groups"])


class SecurityGroupCreate(Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=255)
    rules: list[SecurityGroupRuleSpec] | None = Field(
        default=None, max_length=MAX_RULES, description="default: allow all egress"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "example-sg", "description": "web servers"},
                {
                    "name": "example-sg-2",
                    "rules": [
                        {"direction": "egress"},
                        {"direction": "ingress", "protocol": "icmp"},
                        {
                            "direction": "ingress",
                            "protocol": "tcp",
                            "port_min": 22,
                            "port_max": 22,
                            "remote_cidr": "198.18.0.0/15",
                        },
                        {"direction": "ingress", "remote_group": "example-sg"},
                    ],
                },
            ]
        }
    )


class SecurityGroupUpdate(Model):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=255)

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"description": "web and ssh"}, {"name": "example-sg-3"}]}
    )


RULE_EXAMPLES: dict[str, Example] = {
    "ssh": {
        "summary": "ssh from a range",
        "value": {
            "direction": "ingress",
            "protocol": "tcp",
            "port_min": 22,
            "port_max": 22,
            "remote_cidr": "198.18.0.0/15",
        },
    },
    "ping6": {
        "summary": "ICMPv6 echo requests",
        "value": {
            "direction": "ingress",
            "ethertype": "ipv6",
            "protocol": "icmpv6",
            "port_min": 128,
        },
    },
    "group": {
        "summary": "anything from the ports of a group",
        "value": {"direction": "ingress", "remote_group": "example-sg"},
    },
}
RULES_EXAMPLES: dict[str, Example] = {
    "web": {
        "summary": "all egress, web from anywhere",
        "value": [
            {"direction": "egress"},
            {"direction": "ingress", "protocol": "tcp", "port_min": 80, "port_max": 443},
        ],
    },
    "none": {"summary": "drop everything", "value": []},
}


class SecurityGroupPage(Model):
    items: list[SecurityGroupRecord]
    next: str | None = None


async def _rules(
    store: Store,
    caller: Caller,
    group_id: str,
    specs: Iterable[SecurityGroupRuleSpec],
) -> tuple[list[SecurityGroupRule], Guards]:
    """Rules with ids and remote groups resolved to ids of the project, and the guards
    that reference those groups.

    Raises:
        NotFound: a remote group is not the project's. InvalidInput: a rule is given twice.
    """
    rules: list[SecurityGroupRule] = []
    guards = Guards()
    seen: set[str] = set()
    for spec in specs:
        fields = spec.model_dump()
        if spec.remote_group is not None and spec.remote_group != group_id:
            [(kv, remote)] = await find_groups(store, caller, [spec.remote_group])
            fields["remote_group"] = remote.id
            guards = merge_guards(guards, takes_reference(kv, remote.id, group_id))
        rule = SecurityGroupRule(**fields)
        if rule.id in seen:
            raise InvalidInput(
                f"rule {rule.id} ({_described(rule)}) is given twice", hint="give each rule once"
            )
        seen.add(rule.id)
        rules.append(rule)
    return rules, guards


def _described(rule: SecurityGroupRuleSpec) -> str:
    ports = "" if rule.port_min is None else f" {rule.port_min}-{rule.port_max or rule.port_min}"
    remote = rule.remote_cidr or rule.remote_group or "anywhere"
    return f"{rule.direction} {rule.ethertype} {rule.protocol}{ports} {remote}"


@router.post(
    "/security-groups",
    status_code=201,
    responses=links(
        201,
        add_rule=link(
            "POST /security-groups/{group_id}/rules",
            "let the group's ports reach each other",
            parameters={"group_id": "$response.body#/id"},
            body={"direction": "ingress", "remote_group": "$response.body#/id"},
        ),
        replace_rules=link(
            "PUT /security-groups/{group_id}/rules",
            "replace the group's rules: only traffic from its own ports comes in",
            parameters={"group_id": "$response.body#/id"},
            body=[{"direction": "ingress", "remote_group": "$response.body#/id"}],
        ),
        delete_rule=link(
            "DELETE /security-groups/{group_id}/rules/{rule_id}",
            "remove the group's first rule",
            parameters={
                "group_id": "$response.body#/id",
                "rule_id": "$response.body#/spec/rules/0/id",
            },
        ),
        port=link(
            "POST /ports",
            "make a port in the group",
            body={"security_groups": ["$response.body#/id"]},
        ),
    ),
)
async def create_security_group(
    body: SecurityGroupCreate, ctx: ContextDep, caller: CallerDep
) -> SecurityGroupRecord:
    """Make a security group; without `rules` it allows all egress and no ingress."""
    store = ctx.store
    for _ in range(RACE_ATTEMPTS):
        group_id = new_id(IdKind.SECURITY_GROUP)
        guards = Guards(names=name_guard(Kind.SECURITY_GROUP, caller.project, body.name, group_id))
        rules = default_rules()
        if body.rules is not None:
            rules, references = await _rules(store, caller, group_id, body.rules)
            guards = merge_guards(guards, references)
        spec = SecurityGroupSpec(name=body.name, description=body.description, rules=rules)
        record = SecurityGroupRecord(
            id=group_id, project=caller.project, spec=spec, created_at=now()
        )
        written = Records(store).create(caller, Kind.SECURITY_GROUP, group_id, record, guards)
        if not await raced(store, guards, written):
            return record
    raise Conflict("the groups its rules name kept changing", hint="try again")


@router.get("/security-groups")
async def list_security_groups(
    ctx: ContextDep,
    caller: CallerDep,
    limit: LimitQuery = DEFAULT_PAGE,
    cursor: CursorQuery = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
) -> SecurityGroupPage:
    """The project's security groups, by id."""
    items, following = await Records(ctx.store).page(
        Kind.SECURITY_GROUP,
        SecurityGroupRecord,
        caller,
        limit=limit,
        cursor=cursor,
        keep=lambda record: name is None or record.spec.name == name,
    )
    return SecurityGroupPage(items=[record for record, _ in items], next=following)


@router.get("/security-groups/{group_id}")
async def get_security_group(
    group_id: str, ctx: ContextDep, caller: CallerDep
) -> SecurityGroupRecord:
    """One security group with its rules."""
    _, record = await Records(ctx.store).get(
        Kind.SECURITY_GROUP, SecurityGroupRecord, caller, group_id
    )
    return record


Edit = Callable[[SecurityGroupRecord], Awaitable[tuple[SecurityGroupSpec, Guards]]]


async def _change(store: Store, caller: Caller, group_id: str, edit: Edit) -> SecurityGroupRecord:
    """Reads the group, lets `edit` make its new spec and guards, writes with CAS.

    Raises:
        NotFound: no such group. Conflict: `edit` refused, or the group kept changing.
    """
    records = Records(store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await records.get(Kind.SECURITY_GROUP, SecurityGroupRecord, caller, group_id)
        spec, guards = await edit(record)
        updated = record.model_copy(update={"spec": spec})
        if not await raced(store, guards, records.replace(caller, kv, updated, guards)):
            return updated
    raise Conflict(f"security group {group_id} kept changing", hint="try again")


def _with_rules(record: SecurityGroupRecord, rules: list[SecurityGroupRule]) -> SecurityGroupSpec:
    if len(rules) > MAX_RULES:
        raise Conflict(
            f"security group {record.spec.name} would have {len(rules)} rules; "
            f"a group holds at most {MAX_RULES}",
            hint="use wider CIDRs or port ranges, or another group",
        )
    return record.spec.model_copy(update={"rules": rules})


@router.patch("/security-groups/{group_id}")
async def update_security_group(
    group_id: str, body: SecurityGroupUpdate, ctx: ContextDep, caller: CallerDep
) -> SecurityGroupRecord:
    """Rename a security group or change its description."""

    async def edit(record: SecurityGroupRecord) -> tuple[SecurityGroupSpec, Guards]:
        spec, guards = record.spec, Guards()
        if body.name is not None and body.name != spec.name:
            guards.names = name_guard(Kind.SECURITY_GROUP, record.project, body.name, record.id)
            guards.released_names = [name_key(Kind.SECURITY_GROUP, record.project, spec.name)]
            spec = spec.model_copy(update={"name": body.name})
        if body.description is not None:
            spec = spec.model_copy(update={"description": body.description})
        return spec, guards

    return await _change(ctx.store, caller, group_id, edit)


@router.post(
    "/security-groups/{group_id}/rules",
    status_code=201,
    responses=links(
        201,
        delete_rule=link(
            "DELETE /security-groups/{group_id}/rules/{rule_id}",
            "remove the rule",
            parameters={"group_id": "$request.path.group_id", "rule_id": "$response.body#/id"},
        ),
        group=link(
            "GET /security-groups/{group_id}",
            "the group with the rule",
            parameters={"group_id": "$request.path.group_id"},
        ),
    ),
)
async def add_rule(
    group_id: str,
    body: Annotated[SecurityGroupRuleSpec, Body(openapi_examples=RULE_EXAMPLES)],
    ctx: ContextDep,
    caller: CallerDep,
) -> SecurityGroupRule:
    """Add a rule to a security group; the answer carries the rule's id."""
    made: list[SecurityGroupRule] = []

    async def edit(record: SecurityGroupRecord) -> tuple[SecurityGroupSpec, Guards]:
        rules, guards = await _rules(ctx.store, caller, record.id, [body])
        [rule] = rules
        if any(existing.id == rule.id for existing in record.spec.rules):
            raise Conflict(
                f"security group {record.spec.name} already has rule {rule.id} "
                f"({_described(rule)})",
                hint="nothing to do: the rule is there",
            )
        made[:] = [rule]
        return _with_rules(record, [*record.spec.rules, rule]), guards

    await _change(ctx.store, caller, group_id, edit)
    return made[0]


@router.put("/security-groups/{group_id}/rules")
async def replace_rules(
    group_id: str,
    body: Annotated[
        list[SecurityGroupRuleSpec],
        Body(max_length=MAX_RULES, openapi_examples=RULES_EXAMPLES),
    ],
    ctx: ContextDep,
    caller: CallerDep,
) -> SecurityGroupRecord:
    """Replace every rule of a security group."""

    async def edit(record: SecurityGroupRecord) -> tuple[SecurityGroupSpec, Guards]:
        rules, guards = await _rules(ctx.store, caller, record.id, body)
        return _with_rules(record, rules), guards

    return await _change(ctx.store, caller, group_id, edit)


@router.delete("/security-groups/{group_id}/rules/{rule_id}", status_code=204)
async def delete_rule(group_id: str, rule_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Remove one rule of a security group."""

    async def edit(record: SecurityGroupRecord) -> tuple[SecurityGroupSpec, Guards]:
        rules = [rule for rule in record.spec.rules if rule.id != rule_id]
        if len(rules) == len(record.spec.rules):
            raise NotFound(
                f"security group {record.spec.name} has no rule {rule_id!r}",
                hint="its rules and their ids are in `GET /v1/security-groups/{id}`",
            )
        return record.spec.model_copy(update={"rules": rules}), Guards()

    await _change(ctx.store, caller, group_id, edit)
    return Response(status_code=204)


@router.delete("/security-groups/{group_id}", status_code=204)
async def delete_security_group(group_id: str, ctx: ContextDep, caller: CallerDep) -> Response:
    """Delete a security group no port uses and no other group's rule names."""
    store = ctx.store
    records = Records(store)
    for _ in range(RACE_ATTEMPTS):
        kv, record = await records.get(Kind.SECURITY_GROUP, SecurityGroupRecord, caller, group_id)
        snapshot = await references_snapshot(store, record.id)
        ports = await scan(
            store,
            Kind.PORT,
            PortRecord,
            lambda p: p.project == caller.project and group_id in p.spec.security_groups,
        )
        if ports:
            raise ResourceInUse(
                f"security group {record.spec.name} is used by ports {shown(p.id for p in ports)}",
                hint="take it off those ports (or delete them) first",
            )
        naming = await scan(
            store,
            Kind.SECURITY_GROUP,
            SecurityGroupRecord,
            lambda g: (
                g.project == caller.project
                and g.id != group_id
                and any(rule.remote_group == group_id for rule in g.spec.rules)
            ),
        )
        if naming:
            raise ResourceInUse(
                f"rules of security groups {shown(g.id for g in naming)} name "
                f"security group {record.spec.name} as their remote group",
                hint="delete those rules first",
            )
        guards = Guards(
            compares=[snapshot],
            released_names=[name_key(Kind.SECURITY_GROUP, record.project, record.spec.name)],
            operations=[Delete(references_key(record.id))],
        )
        if await records.remove(caller, kv, guards) is not None:
            return Response(status_code=204)
    raise Conflict(
        f"security group {group_id} kept changing while it was deleted", hint="try again"
    )
