// Networks and their subnets: list, create, delete.

import * as api from "../api.js";
import { confirmButton, createForm, el, field, idText, options, table } from "../dom.js";
import { attempt, byId, isExternal, nameOf, reloadingView } from "./common.js";

export async function show({ root, notify }) {
  const networkTable = el("div", { id: "network-table" });
  const subnetTable = el("div", { id: "subnet-table" });
  const networkSelect = el("select", { name: "network", id: "subnet-network" });

  const remove = (path, what) => async () =>
    attempt(notify, async () => {
      await api.del(path);
      notify.info(`${what} is being deleted.`);
      load();
    });

  async function load() {
    await attempt(notify, async () => {
      const [networks, subnets] = await Promise.all([api.listAll("/networks"), api.listAll("/subnets")]);
      const networkById = byId(networks);
      networkTable.replaceChildren(
        table(
          [
            { title: "Name", cell: (n) => n.spec.name },
            { title: "ID", cell: (n) => idText(n.id) },
            { title: "Kind", cell: (n) => (isExternal(n) ? "external" : "tenant") },
            { title: "MTU", cell: (n) => String(n.spec.mtu) },
            {
              title: "",
              class: "actions",
              cell: (n) => confirmButton("Delete", remove(`/networks/${api.enc(n.id)}`, `Network ${n.spec.name}`)),
            },
          ],
          networks,
          { empty: "No networks yet." },
        ),
      );
      subnetTable.replaceChildren(
        table(
          [
            { title: "Name", cell: (s) => s.spec.name },
            { title: "ID", cell: (s) => idText(s.id) },
            { title: "Network", cell: (s) => nameOf(networkById, s.spec.network) },
            { title: "CIDR", cell: (s) => [s.spec.cidr, s.spec.ipv6_cidr].filter(Boolean).join(", ") },
            { title: "Gateway", cell: (s) => s.spec.gateway || "" },
            { title: "DHCP", cell: (s) => (s.spec.dhcp ? "on" : "off") },
            {
              title: "",
              class: "actions",
              cell: (s) => confirmButton("Delete", remove(`/subnets/${api.enc(s.id)}`, `Subnet ${s.spec.name}`)),
            },
          ],
          subnets,
          { empty: "No subnets yet." },
        ),
      );
      const chosen = networkSelect.value;
      const tenant = networks.filter((n) => !isExternal(n)).map((n) => [n.id, n.spec.name]);
      networkSelect.replaceChildren(...options(tenant, chosen));
    });
  }

  const networkForm = createForm(
    "network",
    [field("Name", el("input", { name: "name", id: "network-name", required: true }))],
    "Create network",
    async (values, form) => {
      await attempt(notify, async () => {
        const made = await api.post("/networks", { name: values.get("name") });
        notify.info(`Network ${made.spec.name} (${made.id}) made.`);
        form.reset();
        load();
      });
    },
  );
  const subnetForm = createForm(
    "subnet",
    [
      field("Name", el("input", { name: "name", id: "subnet-name", required: true })),
      field("Network", networkSelect),
      field("CIDR", el("input", { name: "cidr", id: "subnet-cidr", required: true, placeholder: "10.1.0.0/24" })),
      field("Gateway", el("input", { name: "gateway", id: "subnet-gateway", placeholder: "(the first address)" })),
    ],
    "Create subnet",
    async (values, form) => {
      const body = { name: values.get("name"), network: values.get("network"), cidr: values.get("cidr") };
      if (values.get("gateway")) body.gateway = values.get("gateway");
      await attempt(notify, async () => {
        const made = await api.post("/subnets", body);
        notify.info(`Subnet ${made.spec.name} (${made.id}) made.`);
        form.querySelector("#subnet-name").value = "";
        form.querySelector("#subnet-cidr").value = "";
        load();
      });
    },
  );
  root.append(
    el("h1", { text: "Networks" }),
    networkTable,
    networkForm,
    el("h2", { text: "Subnets" }),
    subnetTable,
    subnetForm,
  );
  await load();
  return reloadingView(["networks", "subnets"], load);
}
