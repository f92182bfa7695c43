"""Tests for the [cluster] section of shellserver.config and the Redis URL parser."""

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from shellserver.cluster.redis import RedisAddressError, parse_redis_url
from shellserver.config import ConfigError, load_config

CLUSTER = """
[cluster]
redis_url = "redis://127.0.0.1:6379"
node_name = "a"
public_url = "https://a.example:8443"
"""


class ClusterConfigTests(SynchronousTestCase):
    def assert_refused(self, text: str, key: str, words: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config(text)
        self.assertEqual(caught.exception.key, key)
        self.assertIn(words, str(caught.exception))

    def test_default_is_a_single_node(self) -> None:
        """Without [cluster] the cluster is off and the secret is the state dir's."""
        config = load_config("")
        self.assertFalse(config.cluster.enabled)
        self.assertEqual(config.secret_path, "/var/lib/shellserver/secret")

    def test_complete_cluster(self) -> None:
        """A Redis URL, a node name and a public URL make a cluster node."""
        config = load_config(CLUSTER + 'secret_file = "/etc/shellserver/secret"\n')
        self.assertTrue(config.cluster.enabled)
        self.assertEqual(config.cluster.public_origin, "https://a.example:8443")
        self.assertEqual(config.secret_path, "/etc/shellserver/secret")

    def test_public_url_with_base_path(self) -> None:
        """public_url may carry the base path the node is served under."""
        config = load_config(CLUSTER.replace(":8443", ":8443/consoles"))
        self.assertEqual(config.cluster.public_origin, "https://a.example:8443")

    def test_node_name_required(self) -> None:
        """redis_url without node_name is refused, naming node_name."""
        self.assert_refused(CLUSTER.replace('node_name = "a"', ""), "cluster.node_name",
                            "must be set when cluster.redis_url is set")

    def test_public_url_required(self) -> None:
        """redis_url without public_url is refused, naming public_url."""
        self.assert_refused(CLUSTER.replace('public_url = "https://a.example:8443"', ""),
                            "cluster.public_url", "must be set")

    def test_bad_node_names(self) -> None:
        """Node names are 1 to 64 of [A-Za-z0-9_.-]."""
        for name in ("a b", "x" * 65, "é", "a/b"):
            self.assert_refused(CLUSTER.replace('"a"', repr(name).replace("'", '"')),
                                "cluster.node_name", "64 letters")

    def test_bad_public_urls(self) -> None:
        """public_url must be https with a host, no query, no trailing slash."""
        for url in ("http://a.example", "https://", "https://a.example/", "https://a.example?x",
                    "ftp://a.example", "https://a.example:443"):
            self.assert_refused(CLUSTER.replace("https://a.example:8443", url),
                                "cluster.public_url", "https://host")

    def test_bad_redis_urls(self) -> None:
        """A Redis URL of another scheme, without host, or a bad db is refused by key."""
        for url, words in (("http://x", "scheme"), ("redis://", "no host"),
                           ("redis://h/x", "database"), ("unix://rel/sock", "unix:///"),
                           ("unix:///s?tls=1", "unknown unix:// parameter"),
                           ("redis://h:99999", "not a URL")):
            self.assert_refused(CLUSTER.replace("redis://127.0.0.1:6379", url),
                                "cluster.redis_url", words)

    def test_node_ttl_above_two_heartbeats(self) -> None:
        """node_ttl must be more than twice heartbeat_interval."""
        self.assert_refused(CLUSTER + "heartbeat_interval = 2.0\nnode_ttl = 4.0\n",
                            "cluster.node_ttl", "more than twice")

    def test_timeouts_positive(self) -> None:
        """redis_timeout and heartbeat_interval are positive seconds."""
        self.assert_refused(CLUSTER + "redis_timeout = 0\n", "cluster.redis_timeout",
                            "positive")
        self.assert_refused(CLUSTER + "heartbeat_interval = -1\n",
                            "cluster.heartbeat_interval", "positive")

    def test_key_prefix_printable(self) -> None:
        """key_prefix has no spaces and at most 64 characters."""
        self.assert_refused(CLUSTER + 'key_prefix = "a b"\n', "cluster.key_prefix",
                            "printable")

    def test_paths_absolute(self) -> None:
        """secret_file and redis_ca_file are absolute paths."""
        self.assert_refused(CLUSTER + 'secret_file = "secret"\n', "cluster.secret_file",
                            "absolute")
        self.assert_refused(CLUSTER + 'redis_ca_file = "ca.pem"\n', "cluster.redis_ca_file",
                            "absolute")


    def test_ca_file_must_be_a_certificate(self) -> None:
        """redis_ca_file must be a readable PEM certificate, checked at start-up."""
        self.assert_refused(CLUSTER + 'redis_ca_file = "/nonexistent/ca.pem"\n',
                            "cluster.redis_ca_file", "cannot read")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        junk = os.path.join(directory, "ca.pem")
        with open(junk, "w") as file:
            file.write("not a certificate\n")
        self.assert_refused(CLUSTER + f'redis_ca_file = "{junk}"\n',
                            "cluster.redis_ca_file", "no PEM certificate")


class RedisUrlTests(SynchronousTestCase):
    def test_tcp_with_password_and_db(self) -> None:
        """redis://:password@host:port/db gives all four; describe() hides the password."""
        address = parse_redis_url("redis://:s%40cret@10.0.0.5:6380/2")
        self.assertEqual((address.transport, address.host, address.port, address.db,
                          address.password), ("tcp", "10.0.0.5", 6380, 2, "s@cret"))
        self.assertNotIn("cret", address.describe())
        self.assertNotIn("cret", repr(address))

    def test_tls_default_port(self) -> None:
        """rediss:// is TLS on 6379 unless a port is given."""
        address = parse_redis_url("rediss://user:pw@redis.example")
        self.assertEqual((address.transport, address.port, address.username),
                         ("tls", 6379, "user"))

    def test_unix_socket(self) -> None:
        """unix:///path?db=N&password=P gives a socket path, db and password."""
        address = parse_redis_url("unix:///run/redis/redis.sock?db=3&password=pw")
        self.assertEqual((address.transport, address.path, address.db, address.password),
                         ("unix", "/run/redis/redis.sock", 3, "pw"))

    def test_refusals_are_errors(self) -> None:
        """Unusable URLs raise RedisAddressError with a reason."""
        with self.assertRaises(RedisAddressError):
            parse_redis_url("redis://h/1#x")
