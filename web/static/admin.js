// The admin page: asks for the admin token once (kept in this tab's
// sessionStorage, sent as "Authorization: Bearer"), polls api/overview and
// draws the last hour with uPlot; the buttons POST to api/ACTION.
"use strict";

(function () {
  const TOKEN_KEY = "shellserver-admin-token";
  const POLL_MS = 5000;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                  "#e377c2", "#7f7f7f", "#17becf"];
  const nodes = new Map();  // node name -> {section, charts, table, drain}
  let pollTimer = null;

  const $ = (id) => document.getElementById(id);

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(path, body) {
    const init = {headers: {"Authorization": "Bearer " + token()}, cache: "no-store"};
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch("api/" + path, init);
    let answer = {};
    try {
      answer = await response.json();
    } catch (e) {
      answer = {error: "the server's answer was not JSON"};
    }
    return {status: response.status, answer: answer};
  }

  function showLogin(message) {
    if (pollTimer !== null) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
    sessionStorage.removeItem(TOKEN_KEY);
    $("dashboard").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("service").textContent = "";
    $("notice").textContent = "";
  }

  async function poll() {
    let result;
    try {
      result = await api("overview");
    } catch (e) {
      $("service").textContent = "The server does not answer; retrying.";
      return;
    }
    if (result.status === 401) {
      showLogin("The token was refused.");
      return;
    }
    if (result.status !== 200) {
      showLogin(result.answer.error || "Refused (" + result.status + ").");
      return;
    }
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("notice").textContent = result.answer.notice || "";
    render(result.answer.nodes);
  }

  function start() {
    poll();
    if (pollTimer === null) {
      pollTimer = setInterval(poll, POLL_MS);
    }
  }

  function chart(parent, name, title, seriesNames, unit) {
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.chart = name;
    parent.appendChild(box);
    const series = [{}];
    seriesNames.forEach((label, index) => {
      series.push({label: label, stroke: COLORS[index % COLORS.length], width: 2,
                   value: (u, v) => v === null || v === undefined ? "-" : v + unit});
    });
    const empty = seriesNames.map(() => []);
    return new uPlot({
      title: title, width: 540, height: 220, series: series,
      scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(1, max * 1.1)]}},
    }, [[], ...empty], box);
  }

  function nodeSection(name) {
    let node = nodes.get(name);
    if (node) {
      return node;
    }
    const section = document.createElement("section");
    section.className = "node";
    section.dataset.node = name;
    const heading = document.createElement("h2");
    heading.textContent = "Node " + name + " ";
    const state = document.createElement("span");
    heading.appendChild(state);
    section.appendChild(heading);
    const address = document.createElement("p");
    address.className = "node-url";
    section.appendChild(address);

    const drain = document.createElement("button");
    drain.type = "button";
    drain.className = "drain";
    drain.addEventListener("click", () => {
      act(drain.dataset.action, {node: name});
    });
    section.appendChild(drain);

    const charts = document.createElement("div");
    charts.className = "charts";
    section.appendChild(charts);
    $("nodes").appendChild(section);

    const consolesTitle = document.createElement("h3");
    consolesTitle.textContent = "Running consoles";
    section.appendChild(consolesTitle);
    const elsewhere = document.createElement("p");
    elsewhere.className = "elsewhere";
    elsewhere.textContent = "This page ends consoles of its own node only: " +
      "end this node's consoles from its own admin page.";
    elsewhere.hidden = true;
    section.appendChild(elsewhere);
    const table = document.createElement("table");
    table.className = "consoles";
    const head = table.createTHead().insertRow();
    for (const label of ["Console", "Age", "Client", "Transport", ""]) {
      const th = document.createElement("th");
      th.textContent = label;
      head.appendChild(th);
    }
    table.createTBody();
    section.appendChild(table);

    node = {section: section, state: state, drain: drain, table: table, reasons: null,
            address: address, elsewhere: elsewhere,
            charts: {
              consoles: chart(charts, "consoles", "Consoles", ["active", "capacity"], ""),
              latency: chart(charts, "latency", "Start latency (s, mean)", ["start"], " s"),
              memory: chart(charts, "memory", "Host memory (GB)",
                            ["used", "total", "capacity x console limit"], " GB"),
              cpu: chart(charts, "cpu", "Host CPU (cores)", ["busy", "cores"], ""),
            },
            chartsBox: charts};
    nodes.set(name, node);
    return node;
  }

  function formatAge(seconds) {
    const s = Math.floor(seconds);
    if (s < 60) {
      return s + " s";
    }
    if (s < 3600) {
      return Math.floor(s / 60) + " min " + (s % 60) + " s";
    }
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function render(views) {
    const paused = views.some((view) => view.state === "paused");
    $("service").textContent = paused
      ? "The service is paused: new consoles are refused."
      : "The service is accepting consoles.";
    const shown = new Set(views.map((view) => view.name));
    for (const [name, node] of nodes) {
      // A node that left the cluster (or Redis went down) is no longer shown.
      if (!shown.has(name)) {
        Object.values(node.charts).forEach((drawn) => drawn.destroy());
        node.section.remove();
        nodes.delete(name);
      }
    }
    for (const view of views) {
      const node = nodeSection(view.name);
      node.state.textContent = "(" + view.state + ", " + view.active + " of " +
        view.capacity + " consoles)";
      node.state.className = "state-" + view.state;
      node.address.textContent = view.url || "";
      node.elsewhere.hidden = view.local !== false;
      node.table.hidden = view.local === false;
      const draining = view.state === "draining";
      node.drain.textContent = draining ? "Admit new consoles again" : "Drain this node";
      node.drain.dataset.action = draining ? "undrain" : "drain";

      const s = view.samples;
      const reasons = Object.keys(s.refused_per_minute);
      if (node.reasons === null) {
        node.reasons = reasons;
        node.charts.rates = chart(node.chartsBox, "rates", "Starts and refusals per minute",
                                  ["starts", ...reasons.map((r) => "refused: " + r)], "/min");
      }
      node.charts.consoles.setData([s.time, s.active, s.capacity]);
      node.charts.rates.setData([s.time, s.starts_per_minute,
                                 ...node.reasons.map((r) => s.refused_per_minute[r] || [])]);
      node.charts.latency.setData([s.time, s.start_latency]);
      const gigabytes = (values) => values.map((mb) => Math.round(mb / 10.24) / 100);
      node.charts.memory.setData([s.time, gigabytes(s.memory_used_mb),
                                  gigabytes(s.memory_total_mb),
                                  gigabytes(s.memory_for_capacity_mb)]);
      node.charts.cpu.setData([s.time, s.cpu_used, s.cpu_cores]);

      const body = node.table.tBodies[0];
      body.replaceChildren();
      for (const console of view.consoles) {
        const row = body.insertRow();
        row.dataset.console = console.console;
        for (const text of [console.console, formatAge(console.age), console.client,
                            console.transport]) {
          row.insertCell().textContent = text;
        }
        const end = document.createElement("button");
        end.type = "button";
        end.textContent = "End";
        end.addEventListener("click", () => {
          act("end", {node: view.name, console: console.console});
        });
        row.insertCell().appendChild(end);
      }
    }
  }

  async function act(action, body) {
    let result;
    try {
      result = await api(action, body || {});
    } catch (e) {
      $("action-result").textContent = "The server does not answer.";
      return;
    }
    if (result.status === 401) {
      showLogin("The token was refused.");
      return;
    }
    $("action-result").textContent = result.status === 200
      ? "Done: " + action + "."
      : (result.answer.error || "Refused (" + result.status + ").");
    poll();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("login-error").textContent = "";
    start();
  });
  $("pause").addEventListener("click", () => act("pause"));
  $("resume").addEventListener("click", () => act("resume"));
  $("logout").addEventListener("click", () => showLogin(""));

  if (token()) {
    start();
  }
})();
