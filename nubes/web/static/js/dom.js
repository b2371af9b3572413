// Building the page from data without markup: every text from the API goes in through
// textContent or a text node, never innerHTML.

/** An element with properties (`class`, `text`, `on<event>`, attributes) and children. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

/** A table of `rows`, one <tr data-id> each, or a line saying there are none. */
export function table(columns, rows, { empty = "Nothing here yet.", key = (row) => row.id } = {}) {
  if (rows.length === 0) return el("p", { class: "empty", text: empty });
  const head = el("tr", {}, columns.map((column) => el("th", { text: column.title })));
  const body = rows.map((row) =>
    el(
      "tr",
      { "data-id": key(row) },
      columns.map((column) => el("td", { class: column.class }, column.cell(row))),
    ),
  );
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

export function stateBadge(state) {
  return el("span", { class: `state state-${state}`, "data-state": state, text: state });
}

export function idText(id) {
  return el("span", { class: "id", text: id });
}

/** A button that asks for a second click before `action` runs (no modal dialog). */
export function confirmButton(label, action, props = {}) {
  let armed = null;
  const button = el("button", { type: "button", class: "danger", ...props, text: label });
  button.addEventListener("click", async () => {
    if (armed === null) {
      button.textContent = `Really ${label.toLowerCase()}?`;
      button.classList.add("confirming");
      armed = setTimeout(() => {
        armed = null;
        button.textContent = label;
        button.classList.remove("confirming");
      }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
      button.textContent = label;
      button.classList.remove("confirming");
    }
  });
  return button;
}

/** A button whose action is awaited with the button disabled meanwhile. */
export function actionButton(label, action, props = {}) {
  const button = el("button", { type: "button", ...props, text: label });
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await action();
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

/** <option>s for a <select>: `choices` is [[value, label], ...]. */
export function options(choices, selected) {
  return choices.map(([value, label]) =>
    el("option", { value, selected: value === selected, text: label }),
  );
}

/** A form whose submit hands the fields' values to `submit` (awaited, button disabled). */
export function createForm(name, fields, submitLabel, submit) {
  const button = el("button", { type: "submit", class: "primary", text: submitLabel });
  const form = el("form", { class: "create", "data-form": name }, fields, button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    try {
      await submit(new FormData(form), form);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export function field(label, input) {
  return el("label", {}, label, input);
}

/** Formats an ISO time as the browser's local date and time. */
export function when(iso) {
  if (!iso) return "";
  const time = new Date(iso);
  return Number.isNaN(time.getTime()) ? String(iso) : time.toLocaleString();
}
