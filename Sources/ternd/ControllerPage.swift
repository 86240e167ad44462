/// The controller's web page (GET / on `ternd controller --http`): hosts, VMs and
/// migrations with their progress, redrawn every second from the API's GET routes.
/// One self-contained file: no script or style from elsewhere.
enum ControllerPage {
    static let html = #"""
    <!DOCTYPE html>
    <html lang="en">
    <head>
    <meta charset="utf-8">
    <title>Tern cluster</title>
    <style>
      body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2733; background: #f7f8fa; }
      h1 { font-size: 1.4em; margin: 0 0 .2em; }
      h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
      #summary { color: #4a5866; }
      #status.error { color: #b3261e; font-weight: 600; }
      table { border-collapse: collapse; background: #fff; box-shadow: 0 1px 2px #0002; min-width: 40em; }
      th, td { padding: .3em .8em; text-align: left; border-bottom: 1px solid #e3e7ec; white-space: nowrap; }
      th { background: #eef1f5; font-weight: 600; }
      td.number { text-align: right; font-variant-numeric: tabular-nums; }
      .bar { width: 10em; height: .8em; background: #e3e7ec; border-radius: .4em; overflow: hidden; display: inline-block; vertical-align: middle; }
      .bar > span { display: block; height: 100%; background: #2f6fde; }
      .phase-completed { color: #1e7a34; } .phase-failed, .state-unreachable, .state-lost { color: #b3261e; }
      .phase-running, .phase-starting, .state-draining { color: #9a5b00; }
      .empty { color: #8895a3; font-style: italic; }
    </style>
    </head>
    <body>
    <h1>Tern cluster</h1>
    <div id="summary">loading…</div>
    <div id="status"></div>
    <h2>Hosts</h2>
    <table id="hosts"><thead><tr><th>Host</th><th>Address</th><th>State</th><th>Memory used</th><th>Free MiB</th><th>VMs</th></tr></thead><tbody></tbody></table>
    <h2>Migrations</h2>
    <table id="migrations"><thead><tr><th>VM</th><th>From</th><th>To</th><th>Phase</th><th>Try</th><th>Progress</th><th>Sent MiB</th><th>Downtime ms</th><th>Total s</th><th>Note</th></tr></thead><tbody></tbody></table>
    <h2>VMs</h2>
    <table id="vms"><thead><tr><th>VM</th><th>Host</th><th>State</th><th>Memory MiB</th><th>CPU s</th></tr></thead><tbody></tbody></table>
    <script>
    "use strict";
    function cell(text, className) {
      const td = document.createElement("td");
      td.textContent = text;
      if (className) td.className = className;
      return td;
    }
    function bar(fraction) {
      const td = document.createElement("td"), outer = document.createElement("span"), inner = document.createElement("span");
      outer.className = "bar";
      inner.style.width = Math.round(Math.max(0, Math.min(1, fraction)) * 100) + "%";
      outer.appendChild(inner);
      td.appendChild(outer);
      td.appendChild(document.createTextNode(" " + Math.round(fraction * 100) + "%"));
      return td;
    }
    function fill(id, rows, columns) {
      const body = document.querySelector("#" + id + " tbody");
      body.replaceChildren();
      if (rows.length === 0) {
        const tr = document.createElement("tr"), td = cell("none", "empty");
        td.colSpan = columns;
        tr.appendChild(td);
        body.appendChild(tr);
      }
      for (const row of rows) body.appendChild(row);
    }
    const mib = bytes => (bytes / 1048576).toFixed(1);
    async function get(path) {
      const response = await fetch(path, { cache: "no-store" });
      if (!response.ok) throw new Error(path + ": HTTP " + response.status);
      return response.json();
    }
    async function refresh() {
      try {
        const [hosts, vms, migrations] = await Promise.all([get("/v1/hosts"), get("/v1/vms"), get("/v1/migrations")]);
        fill("hosts", hosts.map(h => {
          const tr = document.createElement("tr"), state = h.reachable ? (h.draining ? "draining" : "ready") : "unreachable";
          tr.dataset.host = h.name;
          tr.dataset.state = state;
          const used = h.memory_capacity_mib ? (h.memory_capacity_mib - h.memory_free_mib) / h.memory_capacity_mib : 0;
          tr.append(cell(h.name), cell(h.address), cell(state + (h.error ? ": " + h.error : ""), "state-" + state), bar(used),
                    cell(h.memory_free_mib ?? "-", "number"), cell(h.vms ?? "-", "number"));
          return tr;
        }), 6);
        const recent = migrations.filter(m => !m.finished_at || Date.now() - Date.parse(m.finished_at) < 3600e3).reverse();
        fill("migrations", recent.map(m => {
          const tr = document.createElement("tr");
          tr.dataset.migration = m.vm;
          tr.dataset.phase = m.phase;
          const left = m.remaining_bytes ?? 0, sent = m.transferred_bytes ?? 0;
          const fraction = m.phase === "completed" ? 1 : (sent + left > 0 ? sent / (sent + left) : 0);
          const note = m.reason ?? (m.escalations.length ? "escalated: " + m.escalations.join(", ") : "");
          tr.append(cell(m.vm), cell(m.source), cell(m.destination), cell(m.phase, "phase-" + m.phase), cell(m.attempt, "number"), bar(fraction),
                    cell(mib(sent), "number"), cell(m.downtime_ms != null ? m.downtime_ms.toFixed(1) : "-", "number"),
                    cell(m.total_ms != null ? (m.total_ms / 1000).toFixed(2) : "-", "number"), cell(note));
          return tr;
        }), 10);
        fill("vms", vms.map(p => {
          const tr = document.createElement("tr");
          tr.dataset.vm = p.vm.spec.name;
          tr.append(cell(p.vm.spec.name), cell(p.host), cell(p.vm.state, "state-" + p.vm.state), cell(p.vm.spec.memory_mib, "number"),
                    cell(p.vm.cpu_seconds.toFixed(1), "number"));
          return tr;
        }), 5);
        const inFlight = migrations.filter(m => m.phase === "starting" || m.phase === "running").length;
        document.getElementById("summary").textContent =
          hosts.length + " hosts, " + vms.length + " VMs, " + inFlight + " migrations in flight; updated " + new Date().toLocaleTimeString();
        const status = document.getElementById("status");
        status.textContent = "";
        status.className = "ok";
      } catch (error) {
        const status = document.getElementById("status");
        status.textContent = "cannot reach the controller: " + error.message;
        status.className = "error";
      }
    }
    refresh();
    setInterval(refresh, 1000);
    </script>
    </body>
    </html>
    """#
}
