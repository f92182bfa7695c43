// The terminal page: xterm.js on one side, a SockJS connection speaking the
// console protocol (docs/protocol.md) on the other, and a status line that
// tells the visitor what is going on. Nothing is exported; tests read the
// state from <body data-state="connecting|ready|ended|error">.
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

  var state = "connecting";
  var socket = null;
  var authenticated = false;  // `a` has been sent on the open socket
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
    newConsoleButton.hidden = !finished;
    if (finished) {
      authenticated = false;
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
    setState(next, message);
  }

  function onMessage(event) {
    var data = String(event.data);
    var type = data.charAt(0);
    var payload = data.slice(1);
    switch (type) {
      case "o":
        receivedUnits += payload.length;
        term.write(payload, function () {
          pasteSampleWhenPrompted();
          writtenUnits += payload.length;
          acknowledge();
        });
        break;
      case "s":
        if (payload === "ready") {
          setState("ready");
        } else if (state === "connecting") {
          statusText.textContent = STATUS_TEXT[payload] || payload;
        }
        break;
      case "n":
        statusText.textContent = payload;
        break;
      case "x":
        finish("ended", payload);
        break;
      case "e":
        finish("error", payload);
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
    if (authenticated && writtenUnits > ackedUnits) {
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
    var reason = event.reason || "";
    if (event.code === 3000) {
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

  function connect() {
    var token = metaContent("shellserver-token");
    var url = metaContent("shellserver-sockjs-url");
    if (!token || !url || token.indexOf("{{") === 0) {
      setState("error", "This page is missing its console token.");
      return;
    }
    var transports = requestedTransports();
    // The page gives a URL relative to itself (the site may be under a base
    // path); sockjs-client wants an absolute one.
    socket = new SockJS(new URL(url, location.href).href, null, transports ? {transports: transports} : {});
    socket.onopen = function () {
      send("a", token);
      authenticated = true;
      reportSize();
      send("k", "0");  // this page acknowledges output
    };
    socket.onmessage = onMessage;
    socket.onclose = onClose;
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
        event.origin !== hostOrigin || !event.data ||
        event.data.shellserver !== "sample" || typeof event.data.code !== "string") {
      return;
    }
    pendingSample = event.data.code;
    pasteSampleWhenPrompted();
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
