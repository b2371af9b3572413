// One VM: its facts and live state, ports and addresses, console log and history.

import * as api from "../api.js";
import { el, idText, stateBadge, table, when } from "../dom.js";
import { attempt, debounce } from "./common.js";
import { powerButtons, stateOf } from "./vms.js";

const CONSOLE_LINES = 200;
const CONSOLE_EVERY_MS = 5000;

function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.flatMap(([term, value]) => [
    el("dt", { text: term }),
    el("dd", {}, value),
  ]));
}

async function consoleText(id) {
  try {
    const answer = await api.get(`/vms/${api.enc(id)}/console?lines=${CONSOLE_LINES}`);
    if (answer.lines.length === 0) return { text: "(nothing on the console yet)", ok: true };
    return { text: answer.lines.join("\n"), ok: true };
  } catch (error) {
    // The console is not there yet (no host) or on another host: say so in its place.
    return { text: error.hint ? `${error.message}\n${error.hint}` : error.message, ok: false };
  }
}

async function historyTable(id) {
  let page;
  try {
    page = await api.get(`/events?resource=${api.enc(id)}&limit=100`);
  } catch (error) {
    if (error.status === 404) return el("p", { class: "empty", text: "No history." });
    return el("p", { class: "empty", text: error.hint ? `${error.message} (${error.hint})` : error.message });
  }
  const columns = [
    { title: "When", cell: (event) => when(event.at) },
    { title: "What", cell: (event) => event.type },
    { title: "Who", cell: (event) => event.actor || "" },
    { title: "State", cell: (event) => event.state || "" },
    { title: "", cell: (event) => event.message },
  ];
  return table(columns, page.items, { empty: "No history." });
}

export async function show({ root, id, notify, go }) {
  let vm = await api.get(`/vms/${api.enc(id)}`);
  const entry = { deleting: vm.deleting, host: vm.spec.host, status: vm.status };
  const state = el("span", { id: "vm-state" }, stateBadge(vm.state));
  const reason = el("span", { class: "muted", id: "vm-reason" });
  const host = el("span", { text: vm.spec.host || "" });
  const ports = el("div", { id: "vm-ports" });
  const pre = el("pre", { class: "console", id: "console" }, "loading…");
  const history = el("div", { id: "vm-history" });

  function showState() {
    state.replaceChildren(stateBadge(stateOf(entry)));
    reason.textContent = entry.status && entry.status.reason ? ` ${entry.status.reason}` : "";
    host.textContent = (entry.status && entry.status.host) || entry.host || "";
  }
  const after = (view) => {
    if (!view) return;
    Object.assign(entry, { deleting: view.deleting, host: view.spec.host, status: view.status });
    showState();
  };

  async function loadPorts() {
    await attempt(notify, async () => {
      const found = await api.listAll("/ports", { vm: vm.id });
      const columns = [
        { title: "Port", cell: (port) => idText(port.id) },
        { title: "Addresses", cell: (port) => port.spec.fixed_ips.join(", ") },
        { title: "MAC", cell: (port) => port.spec.mac },
        { title: "Network", cell: (port) => idText(port.spec.network) },
        { title: "Subnet", cell: (port) => idText(port.spec.subnet) },
        { title: "State", cell: (port) => stateBadge(port.status ? port.status.state : "down") },
      ];
      ports.replaceChildren(table(columns, found, { empty: "No ports." }));
    });
  }
  async function loadConsole() {
    const { text, ok } = await consoleText(vm.id);
    pre.textContent = text;
    pre.classList.toggle("muted", !ok);
    pre.scrollTop = pre.scrollHeight;
  }
  async function loadHistory() {
    history.replaceChildren(await historyTable(vm.id));
  }

  const flavor = vm.spec.flavor;
  root.append(
    el("p", {}, el("a", { href: "#/vms", text: "← all VMs" })),
    el("h1", {}, `VM ${vm.spec.name} `, idText(vm.id)),
    el("div", { class: "toolbar" }, powerButtons(vm, notify, after)),
    facts([
      ["State", el("span", {}, state, reason)],
      ["Flavor", `${flavor.name}: ${flavor.vcpus} vCPU, ${flavor.memory_mb} MB, ${flavor.disk_gb} GB`],
      ["Image", vm.spec.image || ""],
      ["Host", host],
      ["Addresses", vm.addresses.map((a) => a.ip).join(", ") || "none"],
      ["Volumes", vm.spec.volumes.join(", ") || "none"],
      ["Key pairs", vm.spec.key_names.join(", ") || "none"],
      ["Created", when(vm.created_at)],
      ["Notes", vm.notes.join("; ") || "none"],
    ]),
    el("h2", { text: "Ports" }),
    ports,
    el("h2", {}, "Console log ", el("button", { type: "button", id: "console-refresh", text: "Refresh", onclick: loadConsole })),
    pre,
    el("h2", { text: "History" }),
    history,
  );
  showState();
  await Promise.all([loadPorts(), loadConsole(), loadHistory()]);
  const timer = setInterval(() => {
    if (stateOf(entry) === "running") loadConsole();
  }, CONSOLE_EVERY_MS);
  const reloadHistory = debounce(loadHistory, 1000);
  const reloadPorts = debounce(loadPorts);

  return {
    onChange(change) {
      if (change.kind === "ports") reloadPorts();
      if (change.kind !== "vms" || change.id !== vm.id) return;
      if (change.part === "record" && change.type === "delete") {
        notify.info(`VM ${vm.spec.name} is gone.`);
        go("#/vms");
        return;
      }
      if (change.part === "record") {
        entry.deleting = change.record.deleting === true;
        entry.host = change.record.spec ? change.record.spec.host : entry.host;
      } else if (change.part === "status") {
        entry.status = change.type === "delete" ? null : change.status;
      }
      showState();
      reloadHistory();
    },
    async refresh() {
      vm = await api.get(`/vms/${api.enc(id)}`).catch(() => vm);
      after(vm);
      reloadPorts();
      reloadHistory();
    },
    stop() {
      clearInterval(timer);
      reloadHistory.cancel();
      reloadPorts.cancel();
    },
  };
}
