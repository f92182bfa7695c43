"""Declares the `twistd shellserver` command; everything else is in shellserver.tap."""

from twisted.application.service import ServiceMaker

shellserver = ServiceMaker(
    "shellserver",
    "shellserver.tap",
    "Sandboxed IPython consoles for the browser, over SockJS.",
    "shellserver",
)
