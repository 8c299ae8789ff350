// Header: the number of running and queued jobs, refreshed by polling the experiment list.
import { apiGet, items } from "kd/api.js";

async function refresh() {
  try {
    const list = items(await apiGet("/api/experiments/"));
    let running = 0, queued = 0;
    for (const e of list) {
      if (e.status === "running") running++;
      else if (e.status === "queued") queued++;
    }
    document.getElementById("jobs-running").textContent = running;
    document.getElementById("jobs-queued").textContent = queued;
  } catch { /* the header is a convenience; a failed poll just keeps the last numbers */ }
}

refresh();
setInterval(() => { if (!document.hidden) refresh(); }, 4000);
// A page that sees a job change state (its live status message, a stop from the list) says so: the header
// follows at once instead of at the next poll.
window.addEventListener("kd:jobs-changed", refresh);
