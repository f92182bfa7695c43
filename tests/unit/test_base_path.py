"""The site under a base path (server.base_path): the mount, the key's
checks, and pages that name no absolute URL outside the prefix."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from shellserver.config import ConfigError, load_config
from shellserver.tap import DEFAULT_WEB_DIR
from shellserver.web import under_base_path

# An absolute URL path of ours in an attribute, a string or a fetch():
# "/static/..", '/sockjs', "/console/", "/status", "/embed.js".
ABSOLUTE = re.compile(r"""["'(]/(static|sockjs|console|status|embed\.js)\b""")
PAGES = ("index.html", "console.html", "refused.html", "static/console.js",
         "static/demo.js", "static/embed.js")


class PagesTests(SynchronousTestCase):
    def test_no_absolute_urls_in_pages(self):
        """No page or script names an absolute /static/, /sockjs, /console/,
        /status or /embed.js URL (they would miss the base path)."""
        for name in PAGES:
            with open(os.path.join(DEFAULT_WEB_DIR, name), encoding="utf-8") as f:
                text = f.read()
            code = "\n".join(line for line in text.splitlines()
                             if not line.lstrip().startswith("//"))
            self.assertEqual(ABSOLUTE.findall(code), [], name)

    def test_server_defaults_are_relative(self):
        """The console page's SockJS URL and the SockJS iframe's client URL
        are relative by default."""
        from shellserver.sockjs import SockJSOptions
        from shellserver.web import ConsolePage

        self.assertFalse(SockJSOptions().client_url.startswith("/"))
        defaults = ConsolePage.__init__.__kwdefaults__
        self.assertFalse(defaults["sockjs_url"].startswith("/"))


class Leaf(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request) -> bytes:
        return self.body


def resolve(root: Resource, path: bytes) -> Resource:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    resource = root
    while request.postpath and not resource.isLeaf:
        segment = request.postpath.pop(0)
        request.prepath.append(segment)
        resource = resource.getChildWithDefault(segment, request)
    return resource


class MountTests(SynchronousTestCase):
    def setUp(self):
        self.site_root = Resource()
        self.status = Leaf(b"status")
        self.site_root.putChild(b"status", self.status)

    def test_no_base_path_is_the_tree(self):
        """An empty base path serves the tree at the top."""
        self.assertIs(under_base_path(self.site_root, ""), self.site_root)

    def test_tree_under_prefix(self):
        """/a/b/status reaches the tree's /status; /status alone does not."""
        mounted = under_base_path(self.site_root, "/a/b")
        self.assertIs(resolve(mounted, b"/a/b/status"), self.status)
        self.assertIsNot(resolve(mounted, b"/status"), self.status)

    def test_mount_point_redirects_to_slash(self):
        """The prefix without its slash redirects to it (relative URLs need it)."""
        mounted = under_base_path(self.site_root, "/console-svc")
        mount = resolve(mounted, b"/console-svc")
        request = DummyRequest([])
        request.uri = request.path = b"/console-svc"
        mount.render(request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"location"),
                         [b"/console-svc/"])


class BasePathConfigTests(SynchronousTestCase):
    def test_accepts_prefixes(self):
        """"" and /prefix paths are accepted."""
        for value in ("", "/console-svc", "/a/b.c"):
            config = load_config(f'[server]\nbase_path = "{value}"\n')
            self.assertEqual(config.server.base_path, value)

    def test_refuses_bad_paths(self):
        """A trailing slash, a relative path, dot segments or odd characters
        are refused naming server.base_path."""
        for value in ("/", "/svc/", "svc", "/a/../b", "/a b", "/a?x"):
            with self.assertRaises(ConfigError) as caught:
                load_config(f'[server]\nbase_path = "{value}"\n')
            self.assertEqual(caught.exception.key, "server.base_path", value)
