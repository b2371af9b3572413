// Live changes from GET /v1/watch. EventSource cannot send an Authorization header, so
// the stream is read with fetch and parsed here; a lost stream is resumed after the
// last event id, with a growing pause between tries.

import { authHeaders } from "./api.js";

const FIRST_PAUSE_MS = 1000;
const LONGEST_PAUSE_MS = 30000;

/** Parses complete SSE blocks out of `buffer`; returns the events and what is left. */
export function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.replace(/\r\n?/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    const event = { type: "message", id: null, data: "" };
    const data = [];
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (name === "event") event.type = value;
      else if (name === "id") event.id = value;
      else if (name === "data") data.push(value);
    }
    if (data.length === 0) continue;
    event.data = data.join("\n");
    events.push(event);
  }
  return { events, rest };
}

/**
 * Follows the watch until stop() is called.
 * onChange({type, kind, id, part, record, status}) gets each change; onResync() is called
 * whenever changes may have been missed (first connection, compaction), so views reload;
 * onState("live" | "retry" | "off") drives the indicator; onUnauthorized() ends it.
 */
export function follow({ onChange, onResync, onState, onUnauthorized }) {
  const controller = new AbortController();
  let lastId = null;
  let pause = FIRST_PAUSE_MS;
  let stopped = false;

  async function readStream() {
    const headers = { Accept: "text/event-stream", ...authHeaders() };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    const response = await fetch("/v1/watch", {
      headers,
      cache: "no-store",
      signal: controller.signal,
    });
    if (response.status === 401) {
      stopped = true;
      onUnauthorized();
      return;
    }
    if (!response.ok) {
      lastId = null; // e.g. a revision the store no longer knows: start afresh
      throw new Error(`watch answered ${response.status}`);
    }
    const resumed = lastId !== null;
    onState("live");
    pause = FIRST_PAUSE_MS;
    if (!resumed) onResync();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const parsed = parseEvents(buffer);
      buffer = parsed.rest;
      for (const event of parsed.events) {
        if (event.type === "error") {
          lastId = null; // compacted history: list again and watch from now
          return;
        }
        if (event.id !== null) lastId = event.id;
        try {
          onChange({ type: event.type, ...JSON.parse(event.data) });
        } catch (error) {
          console.error("a watch event could not be applied", error);
        }
      }
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await readStream();
      } catch (error) {
        if (stopped) break;
        console.warn("watch interrupted:", error);
      }
      if (stopped) break;
      onState("retry");
      const jitter = Math.random() * 0.3 * pause;
      await new Promise((resolve) => setTimeout(resolve, pause + jitter));
      pause = Math.min(pause * 2, LONGEST_PAUSE_MS);
    }
    onState("off");
  })();

  return {
    stop() {
      stopped = true;
      controller.abort();
    },
  };
}
