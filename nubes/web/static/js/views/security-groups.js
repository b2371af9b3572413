// Security groups: list, create, delete; one group's rules: add and remove.

import * as api from "../api.js";
import { confirmButton, createForm, el, field, idText, options, table } from "../dom.js";
import { attempt, byId, nameOf, reloadingView } from "./common.js";

function portRange(rule) {
  if (rule.port_min === null || rule.port_min === undefined) return "any";
  return rule.port_max && rule.port_max !== rule.port_min ? `${rule.port_min}-${rule.port_max}` : String(rule.port_min);
}

export async function show({ root, notify }) {
  const holder = el("div", { id: "security-group-table" });

  async function load() {
    await attempt(notify, async () => {
      const groups = await api.listAll("/security-groups");
      const columns = [
        { title: "Name", cell: (g) => el("a", { href: `#/security-groups/${api.enc(g.id)}`, text: g.spec.name }) },
        { title: "ID", cell: (g) => idText(g.id) },
        { title: "Description", cell: (g) => g.spec.description },
        { title: "Rules", cell: (g) => String(g.spec.rules.length) },
        {
          title: "",
          class: "actions",
          cell: (g) =>
            confirmButton("Delete", async () =>
              attempt(notify, async () => {
                await api.del(`/security-groups/${api.enc(g.id)}`);
                notify.info(`Security group ${g.spec.name} deleted.`);
                load();
              }),
            ),
        },
      ];
      holder.replaceChildren(table(columns, groups, { empty: "No security groups yet." }));
    });
  }

  const form = createForm(
    "security-group",
    [
      field("Name", el("input", { name: "name", id: "security-group-name", required: true })),
      field("Description", el("input", { name: "description", id: "security-group-description" })),
    ],
    "Create group",
    async (values, made) => {
      await attempt(notify, async () => {
        const body = { name: values.get("name"), description: values.get("description") || "" };
        const group = await api.post("/security-groups", body);
        notify.info(`Security group ${group.spec.name} (${group.id}) made.`);
        made.reset();
        load();
      });
    },
  );
  root.append(el("h1", { text: "Security groups" }), holder, el("h2", { text: "Create a security group" }), form);
  await load();
  return reloadingView(["security-groups"], load);
}

function ruleForm(group, notify, load) {
  const select = (name, choices) => el("select", { name, id: `rule-${name}` }, options(choices));
  const fields = [
    field("Direction", select("direction", [["ingress", "ingress"], ["egress", "egress"]])),
    field("Ethertype", select("ethertype", [["ipv4", "IPv4"], ["ipv6", "IPv6"]])),
    field("Protocol", select("protocol", ["tcp", "udp", "icmp", "icmpv6", "any"].map((p) => [p, p]))),
    field("Port from", el("input", { name: "port_min", id: "rule-port-min", type: "number", min: 0, max: 65535 })),
    field("Port to", el("input", { name: "port_max", id: "rule-port-max", type: "number", min: 0, max: 65535 })),
    field("Remote CIDR", el("input", { name: "remote_cidr", id: "rule-remote-cidr", placeholder: "(anywhere)" })),
  ];
  return createForm("rule", fields, "Add rule", async (values, made) => {
    const rule = {
      direction: values.get("direction"),
      ethertype: values.get("ethertype"),
      protocol: values.get("protocol"),
    };
    // One port alone is a range of one; the API wants both ends or neither.
    const low = values.get("port_min") || values.get("port_max");
    const high = values.get("port_max") || values.get("port_min");
    if (low) Object.assign(rule, { port_min: Number(low), port_max: Number(high) });
    if (values.get("remote_cidr")) rule.remote_cidr = values.get("remote_cidr");
    await attempt(notify, async () => {
      await api.post(`/security-groups/${api.enc(group.id)}/rules`, rule);
      notify.info(`Rule added to ${group.spec.name}.`);
      made.reset();
      load();
    });
  });
}

/** One group: its rules, with a form to add one. */
export const detail = {
  async show({ root, id, notify }) {
    const holder = el("div", { id: "rule-table" });
    const heading = el("h1", {});
    let group = null;

    async function load() {
      await attempt(notify, async () => {
        const [found, groups] = await Promise.all([
          api.get(`/security-groups/${api.enc(id)}`),
          api.listAll("/security-groups"),
        ]);
        group = found;
        const groupById = byId(groups);
        heading.replaceChildren(`Security group ${group.spec.name} `, idText(group.id));
        const columns = [
          { title: "Direction", cell: (r) => r.direction },
          { title: "Ethertype", cell: (r) => r.ethertype },
          { title: "Protocol", cell: (r) => r.protocol },
          { title: "Ports", cell: (r) => portRange(r) },
          { title: "Remote", cell: (r) => r.remote_cidr || (r.remote_group ? `group ${nameOf(groupById, r.remote_group)}` : "anywhere") },
          {
            title: "",
            class: "actions",
            cell: (r) =>
              confirmButton("Remove", async () =>
                attempt(notify, async () => {
                  await api.del(`/security-groups/${api.enc(group.id)}/rules/${api.enc(r.id)}`);
                  notify.info("Rule removed.");
                  load();
                }),
              ),
          },
        ];
        holder.replaceChildren(table(columns, group.spec.rules, { empty: "No rules." }));
      });
    }

    await load();
    if (group === null) return reloadingView([], async () => {});
    root.append(
      el("p", {}, el("a", { href: "#/security-groups", text: "← all security groups" })),
      heading,
      el("p", { class: "muted", text: group.spec.description }),
      holder,
      el("h2", { text: "Add a rule" }),
      ruleForm(group, notify, load),
    );
    return reloadingView(["security-groups"], load);
  },
};
