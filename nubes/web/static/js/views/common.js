// What the views share: reloading on relevant changes, names for ids, small formats.

/** Calls `action` once, `ms` after the last of a burst of calls. */
export function debounce(action, ms = 300) {
  let timer = null;
  const debounced = () => {
    clearTimeout(timer);
    timer = setTimeout(action, ms);
  };
  debounced.cancel = () => clearTimeout(timer);
  return debounced;
}

/**
 * The handle of a view that reloads itself (debounced) whenever a change of one of
 * `kinds` arrives; `load` reports its own errors.
 */
export function reloadingView(kinds, load, extra = {}) {
  const reload = debounce(load);
  return {
    onChange(change) {
      if (kinds.includes(change.kind)) reload();
    },
    refresh: reload,
    stop() {
      reload.cancel();
      if (extra.stop) extra.stop();
    },
  };
}

/** Runs `work`; an API error goes to the notice instead of up. Returns whether it worked. */
export async function attempt(notify, work) {
  try {
    await work();
    return true;
  } catch (error) {
    notify.error(error);
    return false;
  }
}

export function byId(items) {
  return new Map(items.map((item) => [item.id, item]));
}

export function nameOf(map, id) {
  const found = id ? map.get(id) : null;
  return found ? found.spec.name : id || "";
}

export function gib(bytes) {
  return bytes ? `${(bytes / 2 ** 30).toFixed(bytes < 2 ** 30 ? 2 : 1)} GiB` : "";
}

export function isExternal(network) {
  return Boolean(network.spec.external);
}
