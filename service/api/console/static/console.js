// The ApiOps console's live updates. Every page works without this script; with it, the jobs list and a job's
// page follow the service's event streams (one EventSource per page) instead of being reloaded, and a cancel asks
// for confirmation in a dialog rather than on a page of its own.
"use strict";

function debounce(action, ms) {
  let timer = null;
  return () => {
    if (timer === null) {
      timer = setTimeout(() => { timer = null; action(); }, ms);
    }
  };
}

async function fetchDocument(url) {
  const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
  if (!response.ok || response.redirected) {
    return null; // signed out or gone: the next navigation shows why
  }
  return new DOMParser().parseFromString(await response.text(), "text/html");
}

function listen(url, kinds, onEvent) {
  const source = new EventSource(url);
  for (const kind of kinds) {
    source.addEventListener(kind, onEvent);
  }
  return source;
}

// The jobs list: an event for a job on the page, or for a new job this view would show, has its row fetched
// (a burst at a time) from /ui/rows, rendered by the server exactly as the page renders it.
function followList(table) {
  const statuses = table.dataset.statuses ? table.dataset.statuses.split(",") : [];
  const newestFirst = table.dataset.live === "1";
  const changed = new Set();
  const refresh = debounce(async () => {
    const ids = [...changed];
    changed.clear();
    const doc = await fetchDocument(`${table.dataset.rows}&ids=${encodeURIComponent(ids.join(","))}`);
    if (doc === null) {
      return;
    }
    const body = table.tBodies[0];
    const returned = new Set();
    for (const row of [...doc.querySelectorAll("tr[id]")].reverse()) {
      returned.add(row.id);
      const fresh = document.importNode(row, true);
      const shown = document.getElementById(row.id);
      if (shown) {
        shown.replaceWith(fresh);
      } else {
        body.prepend(fresh);
      }
    }
    for (const id of ids) {
      const shown = document.getElementById(`job-${id}`);
      if (shown && !returned.has(shown.id)) {
        shown.remove(); // it no longer matches this view's filters
      }
    }
    const counts = doc.getElementById("counts");
    if (counts) {
      document.getElementById("counts").replaceWith(document.importNode(counts, true));
    }
    document.querySelector(".empty")?.toggleAttribute("hidden", body.rows.length > 0);
  }, 250);
  listen(table.dataset.stream, table.dataset.kinds.split(","), (event) => {
    const data = JSON.parse(event.data);
    const onPage = document.getElementById(`job-${data.job_id}`) !== null;
    const wanted = newestFirst && (statuses.length === 0 || statuses.includes(data.job_status));
    if (onPage || wanted) {
      changed.add(data.job_id);
      refresh();
    }
  });
}

// A job's page: each event of the job has the page's live part fetched again and swapped in; the stream is closed
// once the job has finished.
function followJob(live) {
  if (live.dataset.finished === "1") {
    return;
  }
  const source = listen(live.dataset.stream, live.dataset.kinds.split(","), debounce(async () => {
    const doc = await fetchDocument(window.location.href);
    const fresh = doc?.getElementById("live");
    if (!fresh) {
      return;
    }
    document.getElementById("live").replaceWith(document.importNode(fresh, true));
    if (fresh.dataset.finished === "1") {
      source.close();
    }
  }, 150));
}

// Durations of what still runs, ticking; the same format as the server's (service.api.console.present).
function humanDuration(seconds) {
  const s = Math.max(seconds, 0);
  if (s < 60) {
    return `${s.toFixed(1)}s`;
  }
  const minutes = Math.floor(s / 60);
  if (minutes < 60) {
    return `${minutes}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  }
  return `${Math.floor(minutes / 60)}h ${String(minutes % 60).padStart(2, "0")}m`;
}

function tick() {
  const now = Date.now();
  for (const cell of document.querySelectorAll("[data-since]")) {
    cell.textContent = humanDuration((now - Date.parse(cell.dataset.since)) / 1000);
  }
}

document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.dataset.confirm) {
    return;
  }
  if (!window.confirm(form.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  const confirmed = document.createElement("input");
  Object.assign(confirmed, { type: "hidden", name: "confirmed", value: "yes" });
  form.append(confirmed);
});

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("jobs");
  if (table) {
    followList(table);
  }
  const live = document.getElementById("live");
  if (live) {
    followJob(live);
  }
  setInterval(tick, 1000);
});
