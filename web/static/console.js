// The terminal page: xterm.js on one side, a SockJS connection speaking the
// console protocol (docs/protocol.md) on the other, and a status line that
// tells the visitor what is going on. Nothing is exported; tests read the
// state from <body data-state="connecting|ready|reconnecting|ended|error">.
(function () {
  "use strict";

  // Every SockJS transport by default (visitors behind proxies that break
  // WebSockets fall back to streaming, then polling); the page's CSP allows
  // the iframe and JSONP ones for our own origin. ?transports=a,b forces a list.
  var DEFAULT_TRANSPORTS = null;

  var STATUS_TEXT = {
    connecting: "Connecting…",
    starting: "Starting Python…",
    ready: "Ready. Type Python; exit() or Ctrl-D ends the session.",
    reconnecting: "Connection lost; reconnecting…",
    ended: "The console has ended.",
    error: "Something went wrong."
  };

  var body = document.body;
  var terminalElement = document.getElementById("terminal");
  var statusText = document.getElementById("status-text");
  var newConsoleButton = document.getElementById("new-console");
  var screenReaderButton = document.getElementById("screen-reader");

  // The way out of the terminal for keyboard users (WCAG 2.1.2): Escape and
  // then, within LEAVE_WINDOW_MS, Tab or Shift-Tab. Escape itself still
  // reaches IPython, and a Tab that does not follow Escape completes code as
  // always; only the pair leaves. Announced in the status line (#keys-hint).
  var LEAVE_WINDOW_MS = 2000;
  var escapePressedAt = -Infinity;
  // xterm.js's screen-reader mode, per visitor, remembered in this origin.
  var SCREEN_READER_KEY = "shellserver.screenReaderMode";

  // Flow control (docs/protocol.md): tell the server how much output xterm.js
  // has written, every ACK_UNITS or shortly after it has caught up, so that
  // the server can stop reading a runaway program instead of flooding us.
  var ACK_UNITS = 32768;
  var ACK_IDLE_MS = 40;
  var receivedUnits = 0;
  var writtenUnits = 0;
  var ackedUnits = 0;
  var ackTimer = null;

  // Reattach (docs/protocol.md): a console outlives its connection for its
  // grace, so a dropped connection is retried with backoff, and a reload of
  // this tab takes the console back with the screen saved on `pagehide`.
  var RECONNECT_FIRST_MS = 250;
  var RECONNECT_MAX_MS = 5000;
  // Bounded so that saving fits sessionStorage and pagehide stays quick
  // (docs/protocol.md has the measured size and time).
  var SAVED_SCROLLBACK_LINES = 1000;
  var REFUSED = 4005;  // reattach refused: the console, if any, is untouched
  // Closes after which the console is gone or belongs elsewhere (bad token,
  // no sandbox, not admitted, taken over by a newer window): never retried.
  var FINAL_CLOSES = { 3000: true, 4001: true, 4002: true, 4003: true, 4004: true, 4006: true };

  var state = "connecting";
  var socket = null;
  var authenticated = false;  // `a` or a successful `A` on the open socket
  var pageTokenUsed = false;  // the page's token is single-use
  var attached = null;        // this tab's console: {id, secret, grace, url}
  var droppedAt = null;       // Date.now() when the connection went, if it has
  var reconnectDelay = RECONNECT_FIRST_MS;
  var leaving = false;        // pagehide: the screen is saved, touch nothing
  // An `e` during a reattach waits for its close: with 4005 it only means
  // "start a new console" (the server sends `e` before 4005 as well).
  var reattaching = false;    // `A` sent, no `s resumed` yet
  var reattachError = null;
  var userTyped = false;
  var lastSize = "";

  function metaContent(name) {
    var element = document.querySelector('meta[name="' + name + '"]');
    return element ? element.getAttribute("content") : "";
  }

  function requestedTransports() {
    var value = new URLSearchParams(window.location.search).get("transports");
    if (!value) {
      return DEFAULT_TRANSPORTS;
    }
    var names = value.split(",").map(function (name) {
      return name.trim();
    }).filter(Boolean);
    return names.length ? names : DEFAULT_TRANSPORTS;
  }

  function storedScreenReaderMode() {
    try {
      return window.localStorage.getItem(SCREEN_READER_KEY) === "on";
    } catch (e) {
      return false;  // storage blocked (third-party frame settings)
    }
  }

  // Look, from the page's query (embed.js passes the host's choices):
  // ?theme=light|dark, else the visitor's prefers-color-scheme; ?font-size=N.
  var query = new URLSearchParams(window.location.search);
  var themeName = query.get("theme");
  if (themeName !== "light" && themeName !== "dark") {
    themeName = window.matchMedia("(prefers-color-scheme: light)").matches ? "light" : "dark";
  }
  body.setAttribute("data-theme", themeName);
  var fontSize = parseInt(query.get("font-size"), 10);
  if (!(fontSize >= 10 && fontSize <= 28)) {
    fontSize = 14;
  }
  // IPython's colours on white: the dark palette's yellows and light cyans
  // would vanish, so every colour here is dark enough for text on white.
  var LIGHT_THEME = {
    background: "#fbfbfd",
    foreground: "#1f2328",
    cursor: "#1f2328",
    cursorAccent: "#fbfbfd",
    selectionBackground: "#b6d4fb",
    black: "#1f2328",
    red: "#b3261e",
    green: "#116329",
    yellow: "#7a4e00",
    blue: "#0550ae",
    magenta: "#8250df",
    cyan: "#0a6a78",
    white: "#57606a",
    brightBlack: "#57606a",
    brightRed: "#a40e26",
    brightGreen: "#1a7f37",
    brightYellow: "#633c01",
    brightBlue: "#0349b4",
    brightMagenta: "#6e40c9",
    brightCyan: "#1b7c83",
    brightWhite: "#1f2328"
  };
  var DARK_THEME = {
    background: "#14171c",
    foreground: "#d8dee9",
    cursor: "#ffd43b",
    cursorAccent: "#14171c",
    selectionBackground: "#3b4a5e",
    black: "#1c1f26",
    red: "#e06c75",
    green: "#98c379",
    yellow: "#e5c07b",
    blue: "#61afef",
    magenta: "#c678dd",
    cyan: "#56b6c2",
    white: "#d8dee9",
    brightBlack: "#6b7280",
    brightRed: "#ef8b93",
    brightGreen: "#b5e08f",
    brightYellow: "#f0d39a",
    brightBlue: "#8cc8f5",
    brightMagenta: "#d99ee8",
    brightCyan: "#7fd0da",
    brightWhite: "#ffffff"
  };

  var term = new Terminal({
    screenReaderMode: storedScreenReaderMode(),
    cursorBlink: true,
    fontFamily: 'ui-monospace, "SFMono-Regular", Menlo, Consolas, ' +
      '"DejaVu Sans Mono", "Liberation Mono", monospace',
    fontSize: fontSize,
    lineHeight: 1.15,
    scrollback: 2000,
    theme: themeName === "light" ? LIGHT_THEME : DARK_THEME
  });
  var fitAddon = new FitAddon.FitAddon();
  term.loadAddon(fitAddon);
  // URLs in the output open in a new tab (without an opener) on click.
  term.loadAddon(new WebLinksAddon.WebLinksAddon());
  var serializeAddon = new SerializeAddon.SerializeAddon();
  term.loadAddon(serializeAddon);
  term.open(terminalElement);

  // Keys a browser would otherwise lose to the terminal: Ctrl-C with a
  // selection copies it (as in most desktop terminals), and Ctrl-V /
  // Ctrl-Shift-V paste instead of sending ^V. Returning false lets the
  // browser's own copy/paste run; xterm.js handles those events itself.
  term.attachCustomKeyEventHandler(function (event) {
    if (event.type !== "keydown") {
      return true;
    }
    if (event.key === "Escape") {
      escapePressedAt = event.timeStamp;
      return true;
    }
    if (event.key === "Tab" && !event.ctrlKey && !event.altKey && !event.metaKey &&
        event.timeStamp - escapePressedAt <= LEAVE_WINDOW_MS) {
      escapePressedAt = -Infinity;
      event.preventDefault();
      leaveTerminal(event.shiftKey);
      return false;
    }
    if (event.key !== "Shift") {
      escapePressedAt = -Infinity;  // only Escape directly before Tab counts
    }
    if (!event.ctrlKey || event.altKey || event.metaKey) {
      return true;
    }
    var key = event.key.toLowerCase();
    if (key === "c" && !event.shiftKey && term.hasSelection()) {
      window.setTimeout(function () { term.clearSelection(); }, 0);
      return false;
    }
    return key !== "v";
  });

  function leaveTerminal(backward) {
    term.blur();
    if (backward && window.parent !== window) {
      // Before the frame on the host page is its Close button; only the host
      // page can move focus there. The message carries nothing secret.
      window.parent.postMessage({ shellserver: "leave" }, "*");
    } else {
      screenReaderButton.focus();
    }
  }

  function showScreenReaderMode() {
    var on = term.options.screenReaderMode === true;
    screenReaderButton.setAttribute("aria-pressed", on ? "true" : "false");
  }

  screenReaderButton.addEventListener("click", function () {
    var on = term.options.screenReaderMode !== true;
    term.options.screenReaderMode = on;
    try {
      window.localStorage.setItem(SCREEN_READER_KEY, on ? "on" : "off");
    } catch (e) {
      // Not remembered where storage is blocked; it still applies now.
    }
    showScreenReaderMode();
  });
  showScreenReaderMode();

  function send(type, payload) {
    if (socket && socket.readyState === SockJS.OPEN) {
      socket.send(type + payload);
    }
  }

  function reportSize() {
    var size = term.cols + "," + term.rows;
    if (authenticated && size !== lastSize) {
      lastSize = size;
      send("r", size);
    }
  }

  var fitPending = false;
  function scheduleFit() {
    if (fitPending) {
      return;
    }
    fitPending = true;
    window.requestAnimationFrame(function () {
      fitPending = false;
      fitAddon.fit();  // fires onResize (and so reportSize) if the grid changed
    });
  }

  function setState(next, message) {
    state = next;
    body.setAttribute("data-state", next);
    statusText.textContent = message || STATUS_TEXT[next];
    var finished = next === "ended" || next === "error";
    // While reconnecting, the visitor may give up waiting (the server may be
    // down for longer than the grace) and start afresh.
    newConsoleButton.hidden = !finished && next !== "reconnecting";
    if (finished) {
      authenticated = false;
      cancelReconnect();
      clearWarnings();
      term.options.disableStdin = true;
      term.options.cursorBlink = false;
      term.options.cursorInactiveStyle = "none";
      if (document.hasFocus()) {
        newConsoleButton.focus();
      }
    } else if (next === "ready") {
      term.focus();
    }
  }

  function finish(next, message) {
    // The first `x`/`e`/close wins; the close that follows `x` or `e`
    // repeats the reason and must not overwrite it.
    if (state === "ended" || state === "error") {
      return;
    }
    // An ended console cannot be taken back: a reload starts a new one.
    forgetConsole();
    setState(next, message);
  }

  // --- This tab's console in sessionStorage ---------------------------------
  //
  // sessionStorage is per tab (and per origin), so another tab or browser
  // never sees the secret. One host page may frame several consoles in the
  // same tab, so every console has an entry that the live page "holds"; a
  // page takes over only an entry nobody holds (its own, released on
  // pagehide just before its reload).
  var CONSOLES_KEY = "shellserver.consoles";
  var SCREEN_KEY_PREFIX = "shellserver.screen.";

  function readEntries() {
    try {
      var entries = JSON.parse(window.sessionStorage.getItem(CONSOLES_KEY));
      return entries && typeof entries === "object" ? entries : {};
    } catch (e) {
      return {};  // blocked storage, or not ours to parse: no reattach
    }
  }

  function writeEntries(entries) {
    try {
      window.sessionStorage.setItem(CONSOLES_KEY, JSON.stringify(entries));
    } catch (e) {
      // Blocked storage: reconnects within this page still work.
    }
  }

  function updateEntry(id, change) {
    var entries = readEntries();
    if (change === null) {
      delete entries[id];
    } else {
      entries[id] = Object.assign(entries[id] || {}, change);
    }
    writeEntries(entries);
  }

  function newConsoleId() {
    var bytes = new Uint8Array(8);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) {
      return (b + 256).toString(16).slice(1);
    }).join("");
  }

  // `t GRACE,SECRET`: the secret for the next attach replaces the last one.
  function rememberSecret(payload, url) {
    var comma = payload.indexOf(",");
    var grace = parseInt(payload.slice(0, comma), 10);
    var secret = payload.slice(comma + 1);
    if (comma < 1 || !(grace >= 0) || !secret) {
      return;  // malformed: keep what we have rather than store garbage
    }
    if (attached === null) {
      attached = { id: newConsoleId() };
    }
    attached.secret = secret;
    attached.grace = grace;
    attached.url = url;
    updateEntry(attached.id, { secret: secret, grace: grace, url: url, held: true,
                               updatedAt: Date.now() });
  }

  function forgetConsole() {
    if (attached === null) {
      return;
    }
    updateEntry(attached.id, null);
    try {
      window.sessionStorage.removeItem(SCREEN_KEY_PREFIX + attached.id);
    } catch (e) {
      // nothing stored
    }
    attached = null;
  }

  // The newest console of this tab that no live page holds and whose grace
  // has not run out since it was left; it is held from now on.
  function claimLeftConsole() {
    var entries = readEntries();
    var now = Date.now();
    var best = null;
    Object.keys(entries).forEach(function (id) {
      var entry = entries[id];
      if (entry.held || typeof entry.secret !== "string") {
        return;
      }
      if (!(now - entry.leftAt < entry.grace * 1000)) {
        delete entries[id];  // its console has ended by now
        window.sessionStorage.removeItem(SCREEN_KEY_PREFIX + id);
        return;
      }
      if (best === null || entry.leftAt > entries[best].leftAt) {
        best = id;
      }
    });
    var claimed = null;
    if (best !== null) {
      entries[best].held = true;
      claimed = { id: best, secret: entries[best].secret, grace: entries[best].grace,
                  url: entries[best].url, count: entries[best].count,
                  leftAt: entries[best].leftAt };
    }
    writeEntries(entries);
    return claimed;
  }

  // On pagehide: the screen as xterm.js has written it, and the COUNT of
  // output that screen contains, so that the next page asks the server
  // for exactly the output after it.
  function saveScreen() {
    var key = SCREEN_KEY_PREFIX + attached.id;
    var saved = { count: writtenUnits, screen: serializeAddon.serialize({
      scrollback: SAVED_SCROLLBACK_LINES }) };
    try {
      window.sessionStorage.setItem(key, JSON.stringify(saved));
    } catch (e) {
      // Over the storage quota: reattach with an empty screen rather than
      // not at all (the console and its variables are what matter).
      window.sessionStorage.removeItem(key);
    }
    updateEntry(attached.id, { held: false, count: writtenUnits, leftAt: Date.now() });
  }

  function savedScreen(id, count) {
    try {
      var saved = JSON.parse(window.sessionStorage.getItem(SCREEN_KEY_PREFIX + id));
      return saved && saved.count === count ? saved.screen : "";
    } catch (e) {
      return "";
    }
  }

  // --- Warnings before an ending (`w KIND,SECONDS`, withdrawn by `c KIND`) ---
  //
  // The visible countdown ticks every second but is aria-hidden; screen
  // readers get one sentence per warning instead of one per second.
  var warningElement = document.getElementById("warning");
  var warningShown = document.getElementById("warning-shown");
  var warningSpoken = document.getElementById("warning-spoken");
  var WARNING_TEXT = {
    idle: ["Idle: the console ends in ", " unless you press a key.",
           "The console has been idle and ends in about {s} seconds unless you press a key."],
    age: ["Time limit: the console ends in ", ".",
          "The console reaches its time limit in about {s} seconds."],
    shutdown: ["The server is shutting down: the console ends in ", ".",
               "The server is shutting down; the console ends in about {s} seconds."]
  };
  var warnings = {};  // kind -> Date.now() at which the console ends
  var warningTimer = null;

  function warnEnding(payload) {
    var comma = payload.indexOf(",");
    var kind = payload.slice(0, comma);
    var seconds = parseInt(payload.slice(comma + 1), 10);
    if (comma < 1 || !(seconds >= 0)) {
      return;
    }
    warnings[kind] = Date.now() + seconds * 1000;
    var text = WARNING_TEXT[kind] || ["The console ends in ", ".",
                                      "The console ends in about {s} seconds."];
    warningSpoken.textContent = text[2].replace("{s}", String(seconds));
    showWarnings();
  }

  function withdrawWarning(kind) {
    if (warnings[kind] === undefined) {
      return;
    }
    delete warnings[kind];
    warningSpoken.textContent = kind === "idle" ? "The console stays open." : "";
    showWarnings();
  }

  function clearWarnings() {
    warnings = {};
    warningSpoken.textContent = "";
    showWarnings();
  }

  function formatSeconds(seconds) {
    var minutes = Math.floor(seconds / 60);
    var rest = seconds % 60;
    return minutes + ":" + (rest < 10 ? "0" : "") + rest;
  }

  // The soonest ending is the one shown.
  function showWarnings() {
    var soonest = null;
    Object.keys(warnings).forEach(function (kind) {
      if (soonest === null || warnings[kind] < warnings[soonest]) {
        soonest = kind;
      }
    });
    warningElement.hidden = soonest === null;
    if (soonest === null) {
      warningElement.removeAttribute("data-kind");
      window.clearInterval(warningTimer);
      warningTimer = null;
      return;
    }
    var left = Math.max(0, Math.ceil((warnings[soonest] - Date.now()) / 1000));
    var text = WARNING_TEXT[soonest] || ["The console ends in ", "."];
    warningElement.setAttribute("data-kind", soonest);
    warningShown.textContent = text[0] + formatSeconds(left) + text[1];
    if (warningTimer === null) {
      warningTimer = window.setInterval(showWarnings, 1000);
    }
  }

  // --- The connection --------------------------------------------------------

  function onMessage(event) {
    var data = String(event.data);
    var type = data.charAt(0);
    var payload = data.slice(1);
    switch (type) {
      case "o":
        receivedUnits += payload.length;
        // COUNT is what xterm.js has written (its write callback), never
        // merely received: that is what the screen shows and what a
        // reattach asks the server to continue after.
        term.write(payload, function () {
          pasteSampleWhenPrompted();
          writtenUnits += payload.length;
          acknowledge();
        });
        break;
      case "s":
        if (payload === "ready") {
          setState("ready");
        } else if (payload === "resumed") {
          resumed();
        } else if (state === "connecting") {
          statusText.textContent = STATUS_TEXT[payload] || payload;
        }
        break;
      case "t":
        rememberSecret(payload, socketUrl);
        break;
      case "w":
        warnEnding(payload);
        break;
      case "c":
        withdrawWarning(payload);
        break;
      case "n":
        statusText.textContent = payload;
        break;
      case "x":
        finish("ended", payload);
        break;
      case "e":
        if (reattaching) {
          reattachError = payload;
        } else {
          finish("error", payload);
        }
        break;
      default:
        // Unknown types are ignored, so that the server can add messages
        // without breaking older pages.
        break;
    }
  }

  function sendAck() {
    if (ackTimer !== null) {
      clearTimeout(ackTimer);
      ackTimer = null;
    }
    // After pagehide the saved screen's COUNT must stay at or above what the
    // server has seen acknowledged, or the next page's `A` is refused.
    if (authenticated && !leaving && writtenUnits > ackedUnits) {
      ackedUnits = writtenUnits;
      send("k", String(writtenUnits));
    }
  }

  function acknowledge() {
    if (writtenUnits - ackedUnits >= ACK_UNITS) {
      sendAck();
    } else if (writtenUnits === receivedUnits && ackTimer === null) {
      ackTimer = setTimeout(sendAck, ACK_IDLE_MS);
    }
  }

  function onClose(event) {
    var wasOpen = authenticated;
    authenticated = false;
    socket = null;
    if (state === "ended" || state === "error") {
      return;  // `x` or `e` came first and said why
    }
    var reason = event.reason || "";
    var refusal = reattachError;
    reattaching = false;
    reattachError = null;
    if (event.code === REFUSED) {
      reattachRefused();
    } else if (refusal !== null) {
      finish("error", refusal);
    } else if (attached !== null && !FINAL_CLOSES[event.code]) {
      reconnectLater();
    } else if (event.code === 3000) {
      finish("ended", reason);
    } else if (event.code >= 4000 && event.code < 5000) {
      finish("error", reason);
    } else if (state === "ready") {
      finish("ended", "The connection closed. Start a new console to continue.");
    } else if (wasOpen) {
      finish("error", "The connection closed before Python started.");
    } else {
      finish("error", "Could not reach the console server" +
        (reason ? " (" + reason + ")." : "."));
    }
  }

  var socketUrl = "";  // the SockJS URL of the socket in use (stored with `t`)

  // One SockJS connection; `greet` sends its first message once it is open.
  // A replaced socket's late events are ignored.
  function openSocket(url, greet) {
    var transports = requestedTransports();
    // The page gives a URL relative to itself (the site may be under a base
    // path); sockjs-client wants an absolute one.
    var opened = new SockJS(new URL(url, location.href).href, null,
                            transports ? {transports: transports} : {});
    socket = opened;
    socketUrl = url;
    lastSize = "";  // every connection gets the size once
    opened.onopen = function () {
      if (opened === socket) {
        greet(opened);
      }
    };
    opened.onmessage = function (event) {
      if (opened === socket && !leaving) {
        onMessage(event);
      }
    };
    opened.onclose = function (event) {
      if (opened === socket && !leaving) {
        onClose(event);
      }
    };
  }

  function greetWithToken() {
    pageTokenUsed = true;
    send("a", metaContent("shellserver-token"));
    authenticated = true;
    reportSize();
    send("k", "0");  // this page acknowledges output
  }

  // `A SECRET,COUNT` once every output received has been written: xterm.js
  // calls back in order, so an empty write's callback comes after them all.
  function greetWithSecret(opened) {
    term.write("", function () {
      if (opened !== socket || attached === null) {
        return;
      }
      receivedUnits = writtenUnits;
      ackedUnits = writtenUnits;  // COUNT acknowledges everything before it
      reattaching = true;
      reattachError = null;
      send("A", attached.secret + "," + writtenUnits);
    });
  }

  // `s resumed`: the output from COUNT on follows, then live output.
  function resumed() {
    reattaching = false;
    authenticated = true;
    droppedAt = null;
    reconnectDelay = RECONNECT_FIRST_MS;
    setState("ready");
    reportSize();
    send("k", String(ackedUnits));  // this connection acknowledges output too
  }

  var reconnectTimer = null;

  function cancelReconnect() {
    if (reconnectTimer !== null) {
      window.clearTimeout(reconnectTimer);
      reconnectTimer = null;
    }
  }

  // Backoff from 0.25 s doubling to 5 s, until the console's grace has
  // passed since the drop; the terminal stays as it is meanwhile.
  function reconnectLater() {
    if (state !== "reconnecting") {
      reconnectDelay = RECONNECT_FIRST_MS;
      setState("reconnecting");
    }
    if (droppedAt === null) {
      droppedAt = Date.now();
    }
    if (Date.now() - droppedAt >= attached.grace * 1000) {
      finish("ended", "The connection was lost for longer than the console waits. " +
        "Start a new console to continue.");
      return;
    }
    cancelReconnect();
    reconnectTimer = window.setTimeout(function () {
      reconnectTimer = null;
      openSocket(attached.url, greetWithSecret);
    }, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, RECONNECT_MAX_MS);
  }

  // 4005: the console is gone (or this secret no longer opens it). A fresh
  // page still has its token and starts a new console on a clean terminal;
  // a page that has used its token can only say so.
  function reattachRefused() {
    forgetConsole();
    if (pageTokenUsed) {
      finish("ended", "The console ended while the connection was down. " +
        "Start a new console to continue.");
      return;
    }
    droppedAt = null;
    term.reset();
    receivedUnits = writtenUnits = ackedUnits = 0;
    setState("connecting");
    openSocket(metaContent("shellserver-sockjs-url"), greetWithToken);
  }

  // After a reload: the saved screen first, then `A` for the output after it.
  function reattachLeftConsole(left) {
    attached = { id: left.id, secret: left.secret, grace: left.grace, url: left.url };
    var screen = savedScreen(left.id, left.count);
    if (screen) {
      term.write(screen);
    }
    receivedUnits = writtenUnits = ackedUnits = left.count;
    droppedAt = left.leftAt;  // the grace has been running since the reload
    openSocket(left.url, greetWithSecret);
  }

  function connect() {
    var token = metaContent("shellserver-token");
    var url = metaContent("shellserver-sockjs-url");
    if (!token || !url || token.indexOf("{{") === 0) {
      setState("error", "This page is missing its console token.");
      return;
    }
    var left = claimLeftConsole();
    if (left !== null && typeof left.count === "number") {
      reattachLeftConsole(left);
    } else {
      openSocket(url, greetWithToken);
    }
  }

  window.addEventListener("pagehide", function () {
    if (leaving) {
      return;
    }
    leaving = true;
    cancelReconnect();
    if (attached !== null && state !== "ended" && state !== "error") {
      saveScreen();
    }
  });
  // A page restored from the back/forward cache has a dead connection and a
  // used token: load it afresh, which takes the console back.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) {
      window.location.reload();
    }
  });

  // The host page's Close button (embed.js) ends the console on purpose:
  // `q` ends it at once instead of leaving it waiting for a reattach.
  // `done` runs once the server has closed the connection (or at once when
  // there is none), so that the host does not cut a `q` still in flight.
  function endOnPurpose(done) {
    forgetConsole();
    cancelReconnect();
    if (!authenticated || socket === null) {
      done();
      return;
    }
    socket.addEventListener("close", done);
    send("q", "");
  }

  // The touch key bar: what each button sends. Arrows follow the terminal's
  // cursor-key mode (IPython's prompt_toolkit switches it), as xterm.js does.
  var keyBar = document.getElementById("key-bar");
  var ctrlButton = keyBar.querySelector('[data-key="ctrl"]');
  var ctrlLatched = false;  // Ctrl tapped: the next typed letter is a control key
  var ARROWS = { up: "A", down: "B", right: "C", left: "D" };
  var KEY_SEQUENCES = { tab: "\t", escape: "\x1b", "ctrl-c": "\x03", "ctrl-d": "\x04" };

  function latchCtrl(on) {
    ctrlLatched = on;
    ctrlButton.setAttribute("aria-pressed", on ? "true" : "false");
  }

  function keyBarSequence(name) {
    if (ARROWS[name]) {
      return (term.modes.applicationCursorKeysMode ? "\x1bO" : "\x1b[") + ARROWS[name];
    }
    return KEY_SEQUENCES[name];
  }

  // Tapping a key must not take the focus (and the on-screen keyboard) away
  // from the terminal.
  keyBar.addEventListener("pointerdown", function (event) {
    event.preventDefault();
  });
  keyBar.addEventListener("click", function (event) {
    var target = event.target.closest("button[data-key]");
    if (!target) {
      return;
    }
    var name = target.getAttribute("data-key");
    if (name === "ctrl") {
      latchCtrl(!ctrlLatched);
    } else if (authenticated && state === "ready") {
      latchCtrl(false);
      userTyped = true;
      send("i", keyBarSequence(name));
    }
    term.focus();
  });

  // A sample's code from the embedding page (embed.js, data-run-sample),
  // pasted at the first prompt: bracketed, so IPython takes it as one
  // input to run with Enter or edit first, never runs it by itself.
  var hostOrigin = new URLSearchParams(window.location.search).get("host");
  var pendingSample = null;
  window.addEventListener("message", function (event) {
    if (event.source !== window.parent || window.parent === window ||
        event.origin !== hostOrigin || !event.data) {
      return;
    }
    if (event.data.shellserver === "end") {
      endOnPurpose(function () {
        // The host removes this frame once told (or after a short wait).
        window.parent.postMessage({ shellserver: "ended" }, hostOrigin);
      });
    } else if (event.data.shellserver === "sample" && typeof event.data.code === "string") {
      pendingSample = event.data.code;
      pasteSampleWhenPrompted();
    }
  });

  function pasteSampleWhenPrompted() {
    // prompt_toolkit turns bracketed paste on when it draws its prompt.
    if (pendingSample !== null && state === "ready" && term.modes.bracketedPasteMode) {
      var code = pendingSample;
      pendingSample = null;
      term.paste(code);
    }
  }

  term.onData(function (data) {
    if (ctrlLatched && data.length === 1 && /[a-z@\[\\\]^_]/i.test(data)) {
      // Ctrl + letter is the letter's code with the top bits cleared.
      data = String.fromCharCode(data.toUpperCase().charCodeAt(0) & 0x1f);
      latchCtrl(false);
    }
    if (authenticated) {
      if (state === "ready") {
        userTyped = true;
      }
      send("i", data);
    }
  });
  term.onResize(reportSize);

  window.addEventListener("resize", scheduleFit);
  if (window.ResizeObserver) {
    new ResizeObserver(scheduleFit).observe(terminalElement);
  }
  window.addEventListener("focus", function () {
    if (state === "ready") {
      term.focus();
    }
  });
  terminalElement.addEventListener("mousedown", function () {
    term.focus();
  });
  newConsoleButton.addEventListener("click", function () {
    // A new page load mints a new token; but reloading while the service is
    // down would replace this frame with the browser's own error page, so
    // ask /status first and explain here if no console can start now.
    newConsoleButton.disabled = true;
    fetch("../status", { cache: "no-store", credentials: "omit" })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (status) {
        // The service answered: reload unless it says it would refuse (its
        // refusal page would explain too, but here the visitor keeps the
        // transcript of the console that ended).
        if (!status || status.accepting !== false) {
          // Asked for a new console: the reload must not take this one back.
          forgetConsole();
          cancelReconnect();
          window.location.reload();
          return;
        }
        statusText.textContent = (status.message ||
          "No console can start right now.") + " Try again in a moment.";
        newConsoleButton.disabled = false;
      }, function () {
        statusText.textContent = "The console service cannot be reached " +
          "right now. Try again in a moment.";
        newConsoleButton.disabled = false;
      });
  });
  // Ctrl-W and friends close the tab before the page sees them; at least
  // ask before a session the visitor has typed into goes away.
  window.addEventListener("beforeunload", function (event) {
    if (state === "ready" && userTyped) {
      event.preventDefault();
      event.returnValue = "";
    }
  });

  fitAddon.fit();
  connect();
}());
