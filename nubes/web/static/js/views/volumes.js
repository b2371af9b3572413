// Volumes: list, create, attach to and detach from a VM, delete.

import * as api from "../api.js";
import { actionButton, confirmButton, createForm, el, field, idText, options, stateBadge, table }
  from "../dom.js";
import { attempt, byId, nameOf, reloadingView } from "./common.js";

function volumeState(volume) {
  if (volume.deleting) return "deleting";
  return volume.status ? volume.status.state : "creating";
}

export async function show({ root, notify }) {
  const holder = el("div", { id: "volume-table" });
  const imageSelect = el("select", { name: "image", id: "volume-image" });

  function attachControls(volume, vms) {
    const choices = vms.filter((vm) => !vm.deleting).map((vm) => [vm.id, vm.spec.name]);
    if (choices.length === 0) return null;
    const select = el("select", { "data-role": "attach-vm" }, options(choices));
    const attach = actionButton("Attach", async () =>
      attempt(notify, async () => {
        await api.post(`/vms/${api.enc(select.value)}/volumes`, { volume: volume.id });
        notify.info(`Volume ${volume.spec.name} is being attached.`);
        load();
      }),
      { "data-action": "attach" },
    );
    return [select, attach];
  }

  function actions(volume, vms) {
    const attachedTo = volume.status ? volume.status.attached_to : null;
    const holderVm = attachedTo || vms.find((vm) => vm.spec.volumes.includes(volume.id))?.id;
    const controls = [];
    if (holderVm) {
      controls.push(
        actionButton("Detach", async () =>
          attempt(notify, async () => {
            await api.del(`/vms/${api.enc(holderVm)}/volumes/${api.enc(volume.id)}`);
            notify.info(`Volume ${volume.spec.name} is being detached.`);
            load();
          }),
          { "data-action": "detach" },
        ),
      );
    } else {
      controls.push(attachControls(volume, vms));
    }
    controls.push(
      confirmButton("Delete", async () =>
        attempt(notify, async () => {
          await api.del(`/volumes/${api.enc(volume.id)}`);
          notify.info(`Volume ${volume.spec.name} is being deleted.`);
          load();
        }),
        { "data-action": "delete" },
      ),
    );
    return controls;
  }

  async function load() {
    await attempt(notify, async () => {
      const [volumes, vms, images] = await Promise.all([
        api.listAll("/volumes"),
        api.listAll("/vms"),
        api.listAll("/images"),
      ]);
      const vmById = byId(vms);
      const columns = [
        { title: "Name", cell: (v) => v.spec.name },
        { title: "ID", cell: (v) => idText(v.id) },
        { title: "Size", cell: (v) => `${v.spec.size_gb} GB` },
        { title: "State", cell: (v) => stateBadge(volumeState(v)) },
        { title: "Attached to", cell: (v) => nameOf(vmById, v.status ? v.status.attached_to : null) },
        { title: "Host", cell: (v) => v.spec.host || "" },
        { title: "", class: "actions", cell: (v) => actions(v, vms) },
      ];
      holder.replaceChildren(table(columns, volumes, { empty: "No volumes yet." }));
      const chosen = imageSelect.value;
      const choices = [["", "(empty)"], ...images.map((image) => [image.id, image.name])];
      imageSelect.replaceChildren(...options(choices, chosen));
    });
  }

  const form = createForm(
    "volume",
    [
      field("Name", el("input", { name: "name", id: "volume-name", required: true })),
      field("Size (GB)", el("input", { name: "size_gb", id: "volume-size", type: "number", min: 1, value: 1 })),
      field("From image", imageSelect),
    ],
    "Create volume",
    async (values, made) => {
      const body = { name: values.get("name") };
      if (values.get("size_gb")) body.size_gb = Number(values.get("size_gb"));
      if (values.get("image")) body.image = values.get("image");
      await attempt(notify, async () => {
        const volume = await api.post("/volumes", body);
        notify.info(`Volume ${volume.spec.name} (${volume.id}) is being made.`);
        made.querySelector("#volume-name").value = "";
        load();
      });
    },
  );
  root.append(el("h1", { text: "Volumes" }), holder, el("h2", { text: "Create a volume" }), form);
  await load();
  return reloadingView(["volumes", "vms"], load);
}
