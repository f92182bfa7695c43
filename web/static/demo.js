// The demo host page: "Launch interactive shell" puts the console page in an
// iframe over the code sample; "Close" removes it and brings the sample back.
(function () {
  "use strict";

  var CONSOLE_URL = "console/";  // relative: the site may live under a base path

  var launchButton = document.querySelector("[data-console-launch]");
  var closeButton = document.querySelector("[data-console-close]");
  var sample = document.querySelector("[data-console-sample]");
  var frame = null;

  function launch() {
    if (frame) {
      return;
    }
    frame = document.createElement("iframe");
    frame.className = "console-frame";
    frame.title = "Interactive Python shell";
    frame.src = CONSOLE_URL;
    frame.setAttribute("allow", "clipboard-write");
    // The sample keeps its place in the layout (only hidden) so the frame,
    // absolutely positioned inside the same box, covers exactly its area.
    sample.classList.add("is-live");
    sample.appendChild(frame);
    launchButton.hidden = true;
    closeButton.hidden = false;
    frame.focus();
    frame.addEventListener("load", function () {
      if (frame && document.activeElement !== frame) {
        frame.focus();
      }
    });
  }

  function close() {
    if (!frame) {
      return;
    }
    frame.remove();  // dropping the frame closes its connection too
    frame = null;
    sample.classList.remove("is-live");
    closeButton.hidden = true;
    launchButton.hidden = false;
    launchButton.focus();
  }

  launchButton.addEventListener("click", launch);
  closeButton.addEventListener("click", close);
}());
