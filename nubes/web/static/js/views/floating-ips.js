// Floating IPs: allocate from an external network, associate with a VM's port,
// disassociate, release.

import * as api from "../api.js";
import { actionButton, confirmButton, createForm, el, field, idText, options, stateBadge, table }
  from "../dom.js";
import { attempt, byId, isExternal, nameOf, reloadingView } from "./common.js";

export async function show({ root, notify }) {
  const holder = el("div", { id: "floating-ip-table" });
  const networkSelect = el("select", { name: "network", id: "floating-ip-network" });

  function actions(fip, portChoices) {
    const path = `/floating-ips/${api.enc(fip.id)}`;
    const controls = [];
    if (fip.spec.port) {
      controls.push(
        actionButton("Disassociate", async () =>
          attempt(notify, async () => {
            await api.post(`${path}/disassociate`);
            notify.info(`${fip.spec.address} is being disassociated.`);
            load();
          }),
          { "data-action": "disassociate" },
        ),
      );
    } else if (portChoices.length) {
      const select = el("select", { "data-role": "associate-port" }, options(portChoices));
      controls.push(
        select,
        actionButton("Associate", async () =>
          attempt(notify, async () => {
            await api.post(`${path}/associate`, { port: select.value });
            notify.info(`${fip.spec.address} is being associated.`);
            load();
          }),
          { "data-action": "associate" },
        ),
      );
    }
    controls.push(
      confirmButton("Release", async () =>
        attempt(notify, async () => {
          await api.del(path);
          notify.info(`${fip.spec.address} is being released.`);
          load();
        }),
        { "data-action": "release" },
      ),
    );
    return controls;
  }

  async function load() {
    await attempt(notify, async () => {
      const [fips, networks, ports, vms] = await Promise.all([
        api.listAll("/floating-ips"),
        api.listAll("/networks"),
        api.listAll("/ports"),
        api.listAll("/vms"),
      ]);
      const networkById = byId(networks);
      const vmById = byId(vms);
      const portById = byId(ports);
      const portLabel = (port) =>
        `${nameOf(vmById, port.spec.vm)} ${port.spec.fixed_ips.join(", ")}`.trim();
      // Only ports a VM uses are worth a public address.
      const portChoices = ports.filter((p) => p.spec.vm).map((p) => [p.id, portLabel(p)]);
      const columns = [
        { title: "Address", cell: (f) => f.spec.address },
        { title: "ID", cell: (f) => idText(f.id) },
        { title: "Network", cell: (f) => nameOf(networkById, f.spec.network) },
        {
          title: "Associated with",
          cell: (f) => (f.spec.port && portById.get(f.spec.port) ? portLabel(portById.get(f.spec.port)) : f.spec.port || ""),
        },
        { title: "State", cell: (f) => stateBadge(f.status ? f.status.state : "down") },
        { title: "", class: "actions", cell: (f) => actions(f, portChoices) },
      ];
      holder.replaceChildren(table(columns, fips, { empty: "No floating IPs yet." }));
      const chosen = networkSelect.value;
      const external = networks.filter(isExternal).map((n) => [n.id, n.spec.name]);
      networkSelect.replaceChildren(...options(external, chosen));
    });
  }

  const form = createForm("floating-ip", [field("External network", networkSelect)], "Allocate", async (values) => {
    await attempt(notify, async () => {
      const fip = await api.post("/floating-ips", { network: values.get("network") });
      notify.info(`Allocated ${fip.spec.address}.`);
      load();
    });
  });
  root.append(el("h1", { text: "Floating IPs" }), holder, el("h2", { text: "Allocate a floating IP" }), form);
  await load();
  return reloadingView(["floating-ips", "ports", "vms"], load);
}
