// embed.js: add "Launch interactive shell" to the code samples of any page.
//
//   <script src="https://console.example.org/embed.js" defer></script>
//   <pre data-shellserver>print("hello")</pre>
//
// On load it asks the service's /status whether consoles are being accepted
// and, only then, puts a button above each sample (elements matching the
// script tag's data-selector, or the service's configured selector). A click
// covers the sample with an iframe holding a console; "Close" restores it.
// Needs nothing from the host page, defines no globals, sets styles through
// the CSSOM only (so a strict host CSP needs just the service's origin in
// script-src, connect-src and frame-src), and stays silent when the service
// is down or not accepting.
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
  var MIN_HEIGHT = 360; // about 20 terminal rows
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
    var frame = document.createElement("iframe");
    frame.src = consoleUrl + "?host=" + encodeURIComponent(location.origin);
    frame.title = "Interactive Python shell";
    frame.setAttribute("allow", "clipboard-read; clipboard-write");
    css(frame, {
      position: "absolute",
      border: "0",
      borderRadius: "4px",
      boxShadow: "0 2px 12px rgba(0, 0, 0, 0.35)",
      background: "#14161a",
      zIndex: "2147483000",
      margin: "0",
      padding: "0",
    });
    this.frame = frame;
    this.savedVisibility = this.sample.style.visibility;
    this.savedMinHeight = this.sample.style.minHeight;
    // The sample keeps its place (hidden, at least terminal-sized) so the
    // page's layout does not jump and the frame covers exactly its box.
    css(this.sample, { visibility: "hidden", minHeight: MIN_HEIGHT + "px" });
    document.body.appendChild(frame);
    this.place();
    window.addEventListener("resize", this.place);
    if (window.ResizeObserver) {
      this.observer = new ResizeObserver(this.place);
      this.observer.observe(this.sample);
      this.observer.observe(document.body);
    }
    this.launch.hidden = true;
    this.close.hidden = false;
    frame.focus();
    frame.addEventListener("load", function () {
      frame.focus();
    });
  };

  Embed.prototype.place = function () {
    if (!this.frame) {
      return;
    }
    var box = this.sample.getBoundingClientRect();
    css(this.frame, {
      left: box.left + window.scrollX + "px",
      top: box.top + window.scrollY + "px",
      width: box.width + "px",
      height: Math.max(box.height, MIN_HEIGHT) + "px",
    });
  };

  Embed.prototype.shut = function () {
    if (!this.frame) {
      return;
    }
    this.frame.remove(); // the console ends with its connection
    this.frame = null;
    window.removeEventListener("resize", this.place);
    if (this.observer) {
      this.observer.disconnect();
      this.observer = null;
    }
    css(this.sample, { visibility: this.savedVisibility, minHeight: this.savedMinHeight });
    this.close.hidden = true;
    this.launch.hidden = false;
    this.launch.focus();
  };

  function start(status) {
    if (!status || status.accepting !== true) {
      return;
    }
    var selector = script.getAttribute("data-selector") || status.selector;
    var samples;
    try {
      samples = document.querySelectorAll(selector);
    } catch (e) {
      return; // a bad selector: nothing to decorate
    }
    Array.prototype.forEach.call(samples, function (sample) {
      if (!sample.hasAttribute("data-shellserver-ready")) {
        sample.setAttribute("data-shellserver-ready", "");
        new Embed(sample);
      }
    });
  }

  function ping() {
    fetch(statusUrl, { mode: "cors", credentials: "omit" })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(start)
      .catch(function () {
        // The service is unreachable: show nothing, say nothing.
      });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", ping);
  } else {
    ping();
  }
}());
