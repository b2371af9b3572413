// Images: list and delete (uploading a disk file is the CLI's job: `nubes image upload`).

import * as api from "../api.js";
import { confirmButton, el, idText, stateBadge, table, when } from "../dom.js";
import { attempt, gib, reloadingView } from "./common.js";

export async function show({ root, notify }) {
  const holder = el("div", { id: "image-table" });

  async function load() {
    await attempt(notify, async () => {
      const images = await api.listAll("/images");
      const columns = [
        { title: "Name", cell: (image) => image.name },
        { title: "ID", cell: (image) => idText(image.id) },
        { title: "Format", cell: (image) => image.format },
        { title: "Size", cell: (image) => gib(image.virtual_size) },
        { title: "Boot", cell: (image) => (image.kernel ? "direct kernel" : "disk") },
        { title: "Visibility", cell: (image) => (image.public ? "public" : image.project) },
        { title: "State", cell: (image) => stateBadge(image.status ? image.status.state : "active") },
        { title: "Created", cell: (image) => when(image.created_at) },
        {
          title: "",
          class: "actions",
          cell: (image) =>
            confirmButton("Delete", async () =>
              attempt(notify, async () => {
                await api.del(`/images/${api.enc(image.id)}`);
                notify.info(`Image ${image.name} deleted.`);
                load();
              }),
            ),
        },
      ];
      holder.replaceChildren(table(columns, images, { empty: "No images yet." }));
    });
  }

  root.append(
    el("h1", { text: "Images" }),
    holder,
    el("p", { class: "muted", text: "Upload an image with `nubes image upload FILE --name NAME`, or have the API fetch one with `nubes image import`." }),
  );
  await load();
  return reloadingView(["images"], load);
}
