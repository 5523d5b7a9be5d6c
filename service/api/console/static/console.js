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

// The jobs list. An event for a job on the page updates its row in place, from what the event says (its status,
// the step it is on, the step's detail): no request at all, however many consoles are open. A job that is not on
// the page but that this view would show (a new job, or one that now has a status the view filters on) has its
// row fetched from /ui/rows, a burst at a time, rendered by the server as the page renders rows, with fresh counts.
function followList(table) {
  const statuses = table.dataset.statuses ? table.dataset.statuses.split(",") : [];
  const newestFirst = table.dataset.live === "1";
  const missing = new Set();
  const fetchMissing = debounce(async () => {
    const ids = [...missing];
    missing.clear();
    const doc = await fetchDocument(`${table.dataset.rows}&ids=${encodeURIComponent(ids.join(","))}`);
    if (doc === null) {
      return;
    }
    for (const row of [...doc.querySelectorAll("tr[id]")].reverse()) {
      const fresh = document.importNode(row, true);
      const shown = document.getElementById(row.id);
      if (shown) {
        shown.replaceWith(fresh);
      } else {
        table.tBodies[0].prepend(fresh);
      }
    }
    const counts = doc.getElementById("counts");
    if (counts) {
      document.getElementById("counts").replaceWith(document.importNode(counts, true));
    }
    document.querySelector(".empty")?.toggleAttribute("hidden", table.tBodies[0].rows.length > 0);
  }, 250);
  listen(table.dataset.stream, table.dataset.kinds.split(","), (event) => {
    const data = JSON.parse(event.data);
    const wanted = statuses.length === 0 || statuses.includes(data.job_status);
    const row = document.getElementById(`job-${data.job_id}`);
    if (row && wanted) {
      updateRow(row, data);
    } else if (row) {
      countMove(row.dataset.status, null);
      row.remove(); // it no longer matches this view's filters
    } else if (newestFirst && wanted) {
      missing.add(data.job_id);
      fetchMissing();
    }
  });
}

function updateRow(row, data) {
  if (data.job_status !== row.dataset.status) {
    countMove(row.dataset.status, data.job_status);
    row.dataset.status = data.job_status;
    const status = row.querySelector(".status");
    status.className = `status s-${data.job_status}`;
    status.textContent = data.job_status.replace("_", " ");
  }
  const step = row.querySelector(".step");
  if (data.kind === "retried") {
    step.replaceChildren();
  } else if ((data.kind === "step" || data.kind === "progress") && data.step) {
    const done = data.kind === "step" && data.status === "success";
    step.replaceChildren();
    if (!done) {
      step.append(data.step);
      if (data.detail) {
        const detail = document.createElement("span");
        detail.className = "detail";
        detail.textContent = data.detail.length > 80 ? `${data.detail.slice(0, 77)}...` : data.detail;
        step.append(" ", detail);
      }
    }
  }
  const duration = row.querySelector(".duration");
  if (data.kind === "claimed") {
    duration.dataset.since = data.created_at;
  } else if (data.kind === "finished" && duration.dataset.since) {
    duration.textContent = humanDuration((Date.parse(data.created_at) - Date.parse(duration.dataset.since)) / 1000);
    delete duration.dataset.since;
  }
}

// The counts by status follow the rows' moves (a count shown as "1000+" is left as it is).
function countMove(from, to) {
  for (const [status, change] of [[from, -1], [to, 1]]) {
    const count = status && document.querySelector(`#counts a.s-${status} b`);
    if (count && /^[0-9]+$/.test(count.textContent)) {
      count.textContent = String(Math.max(0, Number(count.textContent) + change));
    }
  }
}

// A job's page: each event of the job has the page's live part fetched again and swapped in; the stream is closed
// once the job has finished, and opened again when an action (a retry) starts it anew.
let jobStream = null;

function followJob(live) {
  jobStream?.close();
  jobStream = null;
  if (live.dataset.finished === "1") {
    return;
  }
  jobStream = listen(live.dataset.stream, live.dataset.kinds.split(","), debounce(async () => {
    swapLive(await fetchDocument(window.location.href), false);
  }, 150));
}

// Put a fresh rendering of the job page's live part in place; with `restart`, follow the job from there on.
function swapLive(doc, restart) {
  const fresh = doc?.getElementById("live");
  if (!fresh) {
    return false;
  }
  const imported = document.importNode(fresh, true);
  document.getElementById("live").replaceWith(imported);
  if (restart) {
    followJob(imported);
  } else if (fresh.dataset.finished === "1") {
    jobStream?.close();
  }
  return true;
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

// A cancel asks first. A job page's own actions (cancel, retry, approve) are sent without leaving the page: the
// answer is the job page, whose live part is swapped in, and the job is followed from there. Anything else (a
// reject, which asks why on a page of its own; any other form) is an ordinary navigation.
document.addEventListener("submit", async (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  const body = new URLSearchParams(new FormData(form));
  if (form.dataset.confirm) {
    body.set("confirmed", "yes");
  }
  if (!("inplace" in form.dataset)) {
    if (form.dataset.confirm) {
      const confirmed = document.createElement("input");
      Object.assign(confirmed, { type: "hidden", name: "confirmed", value: "yes" });
      form.append(confirmed);
    }
    return;
  }
  event.preventDefault();
  const response = await fetch(form.action, { method: "POST", body, credentials: "same-origin" });
  const doc = new DOMParser().parseFromString(await response.text(), "text/html");
  if (!swapLive(doc, true)) {
    window.location.assign(response.url); // signed out meanwhile, or an answer without the job: show it whole
  }
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
