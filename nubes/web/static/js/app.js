// The dashboard's entry: log in and out, the nav bar, a hash router over the views, and
// one watch stream whose changes go to the view on screen.

import * as api from "./api.js";
import { el } from "./dom.js";
import { follow } from "./watch.js";
import * as floatingIps from "./views/floating-ips.js";
import * as images from "./views/images.js";
import * as networks from "./views/networks.js";
import * as securityGroups from "./views/security-groups.js";
import * as vmDetail from "./views/vm.js";
import * as vms from "./views/vms.js";
import * as volumes from "./views/volumes.js";

// "#/<kind>" shows the list, "#/<kind>/<id>" one resource (where there is such a view).
const ROUTES = {
  vms: { list: vms, one: vmDetail },
  networks: { list: networks },
  volumes: { list: volumes },
  images: { list: images },
  "floating-ips": { list: floatingIps },
  "security-groups": { list: securityGroups, one: securityGroups.detail },
};

const $ = (id) => document.getElementById(id);
let current = null; // the handle of the view on screen: {onChange, refresh, stop}
let shown = 0; // bumps on every navigation, so a slow view that lost the race stops
let watch = null;

const notify = {
  error(error) {
    const box = $("notice");
    const hint = error && error.hint ? el("span", { class: "hint", text: error.hint }) : null;
    const message = error && error.message ? error.message : String(error);
    box.replaceChildren(el("span", { class: "message", text: message }), hint);
    box.className = "notice error";
    box.hidden = false;
  },
  info(text) {
    const box = $("notice");
    box.replaceChildren(el("span", { class: "message", text }));
    box.className = "notice";
    box.hidden = false;
  },
  clear() {
    $("notice").hidden = true;
    $("notice").replaceChildren();
  },
};

function route() {
  const [kind, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const entry = ROUTES[kind];
  if (!entry) return { kind: "vms", view: vms, id: null };
  const id = rest.length ? decodeURIComponent(rest.join("/")) : null;
  if (id !== null && entry.one) return { kind, view: entry.one, id };
  return { kind, view: entry.list, id: null };
}

async function render() {
  if (current) current.stop();
  current = null;
  const ticket = ++shown;
  notify.clear();
  const { kind, view, id } = route();
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === kind);
  }
  // Each view draws into its own element: one that lost a race to a later navigation
  // draws into a detached element, never over the page on screen.
  const root = el("div");
  $("view").replaceChildren(root);
  $("view").dataset.view = id ? `${kind}-detail` : kind;
  const page = { root, id, notify, go: (hash) => (location.hash = hash) };
  try {
    const handle = await view.show(page);
    if (ticket !== shown) handle.stop();
    else current = handle;
  } catch (error) {
    if (ticket === shown) notify.error(error);
  }
}

function setLive(state) {
  const badge = $("live");
  badge.textContent = { live: "live", retry: "reconnecting", off: "offline" }[state];
  badge.className = `live ${{ live: "on", retry: "retry", off: "" }[state]}`;
  badge.dataset.state = state;
}

function startWatch() {
  watch = follow({
    onChange: (change) => current && current.onChange(change),
    onResync: () => current && current.refresh(),
    onState: setLive,
    onUnauthorized: () => endSession("your login expired or was revoked"),
  });
}

function showLoggedIn() {
  const who = api.session();
  $("login").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("identity").textContent = `${who.user} · project ${who.project}`;
  startWatch();
  if (location.hash) render();
  else location.hash = "#/vms"; // the hashchange renders it
}

function showLogin() {
  if (watch) watch.stop();
  watch = null;
  if (current) current.stop();
  current = null;
  $("view").replaceChildren();
  $("nav").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-password").value = "";
  $("login-totp").value = "";
  $("login-user").focus();
}

function endSession(reason) {
  api.forget();
  showLogin();
  notify.error({ message: reason, hint: "log in again" });
}

async function onLogin(event) {
  event.preventDefault();
  const button = $("login-submit");
  button.disabled = true;
  try {
    await api.login(
      $("login-user").value.trim(),
      $("login-password").value,
      $("login-project").value.trim(),
      $("login-totp").value.trim(),
    );
    notify.clear();
    $("login-totp-field").hidden = true;
    showLoggedIn();
  } catch (error) {
    if (error.code === "totp_required") $("login-totp-field").hidden = false;
    notify.error(error);
  } finally {
    button.disabled = false;
  }
}

async function onLogout() {
  // The stream first: once the token is revoked it would only come back refused.
  if (watch) watch.stop();
  watch = null;
  try {
    await api.logout();
  } catch (error) {
    // The token is forgotten here either way; say why the API did not revoke it.
    showLogin();
    notify.error(error);
    return;
  }
  showLogin();
  notify.info("Logged out.");
}

api.whenUnauthorized(() => endSession("your login expired or was revoked"));
$("login-form").addEventListener("submit", onLogin);
$("logout").addEventListener("click", onLogout);
window.addEventListener("hashchange", () => api.session() && render());
if (api.session()) showLoggedIn();
else showLogin();
