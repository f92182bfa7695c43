// embed.js: add "Launch interactive shell" to the code samples of any page.
//
//   <script src="https://console.example.org/embed.js" defer></script>
//   <pre data-shellserver>print("hello")</pre>
//
// On load it asks the service's /status whether consoles are being accepted
// and, only then, puts a button above each sample (elements matching the
// script tag's data-selector, or the service's configured selector). A click
// puts an iframe holding a console in the sample's place, in the page's own
// flow (so the host's sticky headers, modals, scrolling boxes, zoom, RTL and
// print treat it like the sample); "Close" gives the space back to the sample.
// Needs nothing from the host page, defines no globals, sets styles through
// the CSSOM only (so a strict host CSP needs just the service's origin in
// script-src, connect-src and frame-src). While the service is down or not
// accepting it shows nothing and asks /status again later, backing off; a
// page whose origin the service does not allow gets a console warning.
(function () {
  "use strict";

  var script = document.currentScript;
  if (!script || !script.src) {
    return;
  }
  var base = new URL(".", script.src);
  var statusUrl = new URL("status", base).href;
  var consoleUrl = new URL("console/", base).href;
  var label = script.getAttribute("data-label") || "Launch interactive shell";
  // data-run-sample on the script tag (every sample) or on a sample (that
  // one): the new console gets the sample's code at its first prompt.
  var runAll = script.hasAttribute("data-run-sample");
  // Look: data-theme="light|dark" (default: the visitor's prefers-color-scheme)
  // and data-font-size (pixels, 10 to 28), passed on to the console page.
  var looks = new URLSearchParams();
  var theme = script.getAttribute("data-theme");
  if (theme === "light" || theme === "dark") {
    looks.set("theme", theme);
  } else if (theme !== null && theme !== "auto") {
    console.warn("shellserver: data-theme must be light, dark or auto, not " +
                 JSON.stringify(theme) + "; following the visitor's preference.");
  }
  var fontSize = script.getAttribute("data-font-size");
  if (fontSize !== null) {
    if (/^[0-9]+$/.test(fontSize) && +fontSize >= 10 && +fontSize <= 28) {
      looks.set("font-size", fontSize);
    } else {
      console.warn("shellserver: data-font-size must be a whole number of pixels " +
                   "from 10 to 28, not " + JSON.stringify(fontSize) + "; using 14.");
    }
  }
  var serviceOrigin = base.origin;
  // How long Close waits for the console page to confirm that it has ended
  // its console before removing the frame anyway.
  var END_WAIT_MS = 1500;
  var MIN_HEIGHT = 360; // about 20 terminal rows
  // Re-checking /status while not accepting: first after FIRST_RETRY_MS,
  // doubling up to MAX_RETRY_MS, so a paused service sees at most one cheap
  // request a minute per open page.
  var FIRST_RETRY_MS = 2000;
  var MAX_RETRY_MS = 60000;
  var retryMs = FIRST_RETRY_MS;
  var embeds = [];
  var YELLOW = "#ffd343";
  var BLUE = "#306998";

  function css(element, styles) {
    Object.keys(styles).forEach(function (name) {
      element.style[name] = styles[name];
    });
    return element;
  }

  function button(text) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    return css(b, {
      font: "600 14px/1.2 system-ui, -apple-system, 'Segoe UI', sans-serif",
      padding: "6px 12px",
      margin: "0 0 6px 0",
      border: "1px solid " + BLUE,
      borderRadius: "4px",
      background: YELLOW,
      color: "#1e1e1e",
      cursor: "pointer",
    });
  }

  function Embed(sample) {
    this.sample = sample;
    this.frame = null;
    this.savedVisibility = "";
    this.savedMinHeight = "";
    this.toolbar = css(document.createElement("div"), { margin: "0", padding: "0" });
    this.toolbar.setAttribute("data-shellserver-toolbar", "");
    this.launch = button(label);
    this.close = button("Close");
    this.close.hidden = true;
    css(this.close, { background: "#f0f0f0" });
    this.toolbar.appendChild(this.launch);
    this.toolbar.appendChild(this.close);
    sample.parentNode.insertBefore(this.toolbar, sample);
    this.launch.addEventListener("click", this.open.bind(this));
    this.close.addEventListener("click", this.shut.bind(this));
    this.place = this.place.bind(this);
  }

  Embed.prototype.open = function () {
    if (this.frame) {
      return;
    }
    var sample = this.sample;
    var shown = window.getComputedStyle(sample);
    var height = Math.max(sample.getBoundingClientRect().height, MIN_HEIGHT);
    var frame = document.createElement("iframe");
    var query = new URLSearchParams(looks);
    query.set("host", location.origin);
    frame.src = consoleUrl + "?" + query.toString();
    frame.title = "Interactive Python shell";
    frame.setAttribute("allow", "clipboard-read; clipboard-write");
    // In the sample's place and in the page's flow: a block as wide as the
    // sample's box (its margins kept), no positioning and no z-index, so the
    // host's stacking, scrolling and direction apply to it as to the sample.
    css(frame, {
      display: "block",
      boxSizing: "border-box",
      width: "auto",
      maxWidth: "100%",
      height: height + "px",
      marginTop: shown.marginTop,
      marginBottom: shown.marginBottom,
      marginLeft: shown.marginLeft,
      marginRight: shown.marginRight,
      border: "0",
      borderRadius: "4px",
      padding: "0",
      background: "#14161a",
    });
    // An iframe is a replaced element: "auto" would give it 300px, so it
    // takes the sample's used width (in CSS px, so zoom keeps it right) and
    // follows the container when the page's layout changes.
    frame.style.width = sample.getBoundingClientRect().width + "px";
    this.frame = frame;
    this.savedDisplay = sample.style.display;
    sample.parentNode.insertBefore(frame, sample);
    sample.style.display = "none";
    this.observer = null;
    if (window.ResizeObserver) {
      // The hidden sample has no box; the container's width is what changes.
      this.observer = new ResizeObserver(this.place);
      this.observer.observe(sample.parentNode);
    }
    this.launch.hidden = true;
    this.close.hidden = false;
    frame.focus();
    var code = (runAll || sample.hasAttribute("data-run-sample")) ? sampleCode(sample) : "";
    frame.addEventListener("load", function () {
      frame.focus();
      if (code) {
        // Only the console page of our service may receive it.
        frame.contentWindow.postMessage({ shellserver: "sample", code: code }, serviceOrigin);
      }
    });
  };

  // The code of a sample: its text, or for an interactive transcript
  // (">>> " and "... " lines) just the input lines without their prompts.
  function sampleCode(sample) {
    var lines = sample.textContent.replace(/\s+$/, "").split("\n");
    var prompted = lines.filter(function (line) {
      return /^(>>>|\.\.\.)( |$)/.test(line);
    });
    if (prompted.length) {
      lines = prompted.map(function (line) {
        return line.slice(4);
      });
    }
    return lines.join("\n").replace(/\s+$/, "");
  }

  Embed.prototype.place = function () {
    if (!this.frame) {
      return;
    }
    // Measure what the sample would be now: shown for a moment, no paint.
    this.sample.style.display = this.savedDisplay;
    var width = this.sample.getBoundingClientRect().width;
    this.sample.style.display = "none";
    this.frame.style.width = width + "px";
  };

  Embed.prototype.shut = function () {
    if (!this.frame) {
      return;
    }
    // Closing is ending on purpose: the console page sends `q`, so that the
    // console ends now rather than wait for a reattach (docs/protocol.md),
    // and says "ended"; the frame goes then, or after a short wait.
    var frame = this.frame;
    frame.style.display = "none";
    var removed = false;
    function removeFrame(event) {
      if (event && (event.source !== frame.contentWindow || event.origin !== serviceOrigin ||
                    !event.data || event.data.shellserver !== "ended")) {
        return;
      }
      if (!removed) {
        removed = true;
        window.removeEventListener("message", removeFrame);
        frame.remove();
      }
    }
    window.addEventListener("message", removeFrame);
    window.setTimeout(removeFrame, END_WAIT_MS);
    if (frame.contentWindow) {
      frame.contentWindow.postMessage({ shellserver: "end" }, serviceOrigin);
    }
    this.frame = null;
    if (this.observer) {
      this.observer.disconnect();
      this.observer = null;
    }
    this.sample.style.display = this.savedDisplay;
    this.close.hidden = true;
    this.launch.hidden = false;
    this.launch.focus();
  };

  // The console page asks, after Escape then Shift-Tab, to hand the focus
  // back to the page: to the Close button just before the frame.
  window.addEventListener("message", function (event) {
    if (event.origin !== serviceOrigin || !event.data ||
        event.data.shellserver !== "leave") {
      return;
    }
    embeds.forEach(function (embed) {
      if (embed.frame && embed.frame.contentWindow === event.source) {
        embed.close.focus();
      }
    });
  });

  function decorate(status) {
    var selector = script.getAttribute("data-selector") || status.selector;
    var samples;
    try {
      samples = document.querySelectorAll(selector);
    } catch (e) {
      console.warn("shellserver: the selector " + JSON.stringify(selector) +
                   " is not valid CSS; no sample gets a button.");
      return;
    }
    Array.prototype.forEach.call(samples, function (sample) {
      if (!sample.hasAttribute("data-shellserver-ready")) {
        sample.setAttribute("data-shellserver-ready", "");
        embeds.push(new Embed(sample));
      }
    });
  }

  function later() {
    var delay = retryMs;
    retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    window.setTimeout(function () {
      if (document.hidden) {
        // Nobody is looking: ask again when somebody is.
        document.addEventListener("visibilitychange", ping, { once: true });
      } else {
        ping();
      }
    }, delay);
  }

  function warnIfRefusedOrigin() {
    // The CORS request failed. If the service answers a request that does
    // not need CORS, it is up and this page's origin is not allowed: say so
    // to the site owner (visitors see nothing either way).
    fetch(statusUrl, { mode: "no-cors", credentials: "omit" })
      .then(function () {
        console.warn("shellserver: " + location.origin + " is not in the " +
                     "service's embed.host_origins, so " + serviceOrigin +
                     " answers this page nothing and no button is shown. " +
                     "Ask its operator to add this origin.");
      })
      .catch(later); // unreachable: try again later
  }

  function ping() {
    fetch(statusUrl, { mode: "cors", credentials: "omit" })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (status) {
        if (status && status.accepting === true) {
          decorate(status);
        } else {
          later(); // busy, paused or failing: ask again, less and less often
        }
      }, warnIfRefusedOrigin);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", ping);
  } else {
    ping();
  }
}());
