// The VM list: states kept live from the watch, the create form, and power actions.

import * as api from "../api.js";
import { actionButton, confirmButton, createForm, el, field, idText, options, stateBadge, table }
  from "../dom.js";
import { attempt, byId, debounce, isExternal, nameOf } from "./common.js";

/** The state the API would report for a VM from its record and status (vmops.py). */
export function stateOf(entry) {
  if (entry.deleting) return "deleting";
  if (entry.status) return entry.status.state;
  return entry.host ? "scheduled" : "pending";
}

/** Start, stop, reboot and delete buttons; `after(view)` gets the API's answer. */
export function powerButtons(vm, notify, after) {
  const path = `/vms/${api.enc(vm.id)}`;
  const act = (verb, body) => async () => {
    await attempt(notify, async () => {
      after(await api.post(`${path}/${verb}`, body));
      notify.info(`Asked VM ${vm.spec.name} to ${verb}.`);
    });
  };
  return [
    actionButton("Start", act("start"), { "data-action": "start" }),
    actionButton("Stop", act("stop", {}), { "data-action": "stop" }),
    actionButton("Reboot", act("reboot"), { "data-action": "reboot" }),
    confirmButton(
      "Delete",
      async () => {
        await attempt(notify, async () => {
          after(await api.del(path));
          notify.info(`VM ${vm.spec.name} is being deleted.`);
        });
      },
      { "data-action": "delete" },
    ),
  ];
}

async function createVmForm(notify, created) {
  const [flavors, images, networks, subnets, keypairs, groups] = await Promise.all([
    api.listAll("/flavors"),
    api.listAll("/images"),
    api.listAll("/networks"),
    api.listAll("/subnets"),
    api.listAll("/keypairs"),
    api.listAll("/security-groups"),
  ]);
  flavors.sort((a, b) => a.memory_mb - b.memory_mb || a.vcpus - b.vcpus);
  const flavorChoices = flavors.map((f) => [
    f.name,
    `${f.name} (${f.vcpus} vCPU, ${f.memory_mb} MB, ${f.disk_gb} GB)`,
  ]);
  const imageChoices = images.map((image) => [image.id, image.name]);
  // A network alone lets the API choose its subnet; "network/subnet" pins one.
  const networkChoices = [];
  for (const network of networks.filter((n) => !isExternal(n))) {
    networkChoices.push([network.id, network.spec.name]);
    for (const subnet of subnets.filter((s) => s.spec.network === network.id)) {
      const label = `${network.spec.name} / ${subnet.spec.name} (${subnet.spec.cidr})`;
      networkChoices.push([`${network.id}/${subnet.id}`, label]);
    }
  }
  const keyChoices = [["", "(none)"], ...keypairs.map((key) => [key.name, key.name])];
  const groupBoxes = groups.map((group) =>
    el(
      "label",
      {},
      el("input", { type: "checkbox", name: "security_groups", value: group.id }),
      group.spec.name,
    ),
  );
  const fields = [
    field("Name", el("input", { name: "name", id: "vm-name", required: true })),
    field("Flavor", el("select", { name: "flavor", id: "vm-flavor" }, options(flavorChoices))),
    field("Image", el("select", { name: "image", id: "vm-image" }, options(imageChoices))),
    field("Network", el("select", { name: "network", id: "vm-network" }, options(networkChoices))),
    field("Key pair", el("select", { name: "key_name", id: "vm-key" }, options(keyChoices))),
    el("fieldset", {}, el("legend", { text: "Security groups (default: the project's)" }),
      groupBoxes.length ? groupBoxes : el("span", { class: "muted", text: "none" })),
  ];
  return createForm("vm", fields, "Create VM", async (values, form) => {
    const body = { name: values.get("name"), flavor: values.get("flavor"), image: values.get("image") };
    const [network, subnet] = String(values.get("network") || "").split("/");
    if (network) body.networks = [subnet ? { network, subnet } : { network }];
    if (values.get("key_name")) body.key_name = values.get("key_name");
    const chosen = values.getAll("security_groups");
    if (chosen.length) body.security_groups = chosen;
    await attempt(notify, async () => {
      const vm = await api.post("/vms", body);
      notify.info(`VM ${vm.spec.name} (${vm.id}) is on its way.`);
      form.querySelector("#vm-name").value = "";
      created();
    });
  });
}

export async function show({ root, notify }) {
  const known = new Map(); // id -> {deleting, host, status}: what a state is computed from
  const holder = el("div", { id: "vm-table" });
  root.append(el("h1", { text: "VMs" }), holder);

  function applyView(vm) {
    if (!vm) return;
    known.set(vm.id, { deleting: vm.deleting, host: vm.spec.host, status: vm.status });
    showState(vm.id);
  }

  function row(id) {
    return holder.querySelector(`tr[data-id="${CSS.escape(id)}"]`);
  }

  function showState(id) {
    const found = row(id);
    const entry = known.get(id);
    if (!found || !entry) return;
    found.querySelector(".state").replaceWith(stateBadge(stateOf(entry)));
    const host = found.querySelector("td.host");
    if (host) host.textContent = (entry.status && entry.status.host) || entry.host || "";
  }

  async function load() {
    await attempt(notify, async () => {
      const [items, networks] = await Promise.all([api.listAll("/vms"), api.listAll("/networks")]);
      const networkById = byId(networks);
      known.clear();
      for (const vm of items) {
        known.set(vm.id, { deleting: vm.deleting, host: vm.spec.host, status: vm.status });
      }
      const columns = [
        { title: "Name", cell: (vm) => el("a", { href: `#/vms/${api.enc(vm.id)}`, text: vm.spec.name }) },
        { title: "ID", cell: (vm) => idText(vm.id) },
        { title: "State", cell: (vm) => stateBadge(vm.state) },
        { title: "Flavor", cell: (vm) => vm.spec.flavor.name },
        {
          title: "Addresses",
          cell: (vm) => vm.addresses.map((a) => `${a.ip} (${nameOf(networkById, a.network)})`).join(", "),
        },
        { title: "Host", class: "host", cell: (vm) => (vm.status && vm.status.host) || vm.spec.host || "" },
        { title: "", class: "actions", cell: (vm) => powerButtons(vm, notify, applyView) },
      ];
      holder.replaceChildren(table(columns, items, { empty: "No VMs yet: create one below." }));
    });
  }
  const reload = debounce(load);

  await load();
  root.append(el("h2", { text: "Create a VM" }), await createVmForm(notify, reload));

  return {
    onChange(change) {
      if (change.kind === "ports" && change.part === "record") reload();
      if (change.kind !== "vms") return;
      const entry = known.get(change.id);
      if (change.part === "record" && change.type === "delete") {
        known.delete(change.id);
        const gone = row(change.id);
        if (gone) gone.remove();
        if (!holder.querySelector("tbody tr")) reload();
      } else if (!entry) {
        reload(); // a VM this page has not listed yet
      } else if (change.part === "record") {
        entry.deleting = change.record.deleting === true;
        entry.host = change.record.spec ? change.record.spec.host : entry.host;
        showState(change.id);
      } else if (change.part === "status") {
        entry.status = change.type === "delete" ? null : change.status;
        showState(change.id);
      }
    },
    refresh: reload,
    stop: () => reload.cancel(),
  };
}
