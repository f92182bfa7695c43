"""Static file names a client cannot use to make the server fail or log tracebacks."""

import os
import shutil
import tempfile

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from shellserver.web import ShellSite, StaticFiles


class StaticNameTests(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="shellserver-static-")
        self.addCleanup(shutil.rmtree, self.directory)
        with open(os.path.join(self.directory, "app.js"), "wb") as f:
            f.write(b"app")
        self.site = ShellSite(StaticFiles(self.directory), reactor=Clock())

    def get(self, path):
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(10):  # files are written by a pull producer
            if not channel.requests or channel.requests[0].producer is None:
                break
            channel.requests[0].producer.resumeProducing()
        return transport.value()

    def test_nul_is_not_found(self):
        """A NUL in a name (%00) is a 404, not a 500."""
        for path in (b"/%00", b"/app.js%00.css"):
            self.assertTrue(self.get(path).startswith(b"HTTP/1.1 404"), path)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_not_utf8_is_not_found_quietly(self):
        """A name that is not UTF-8 (%ff) is a 404 without a logged error."""
        self.assertTrue(self.get(b"/%ff").startswith(b"HTTP/1.1 404"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_real_file_served(self):
        """Real files are still served."""
        response = self.get(b"/app.js")
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response)
        self.assertTrue(response.endswith(b"\r\n\r\napp"), response)
