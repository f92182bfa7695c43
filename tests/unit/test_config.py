"""Tests for shellserver.config: TOML loading and validation."""

import os

import attrs
from twisted.trial.unittest import SynchronousTestCase

from shellserver.config import (
    Config,
    ConfigError,
    ConsoleConfig,
    SandboxConfig,
    ServerConfig,
    TLSConfig,
    load_config,
    load_config_file,
)

EXAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    os.pardir,
    os.pardir,
    "etc",
    "shellserver.toml",
)


class DefaultsTests(SynchronousTestCase):
    def test_none_gives_defaults(self) -> None:
        """No text at all gives the default configuration."""
        self.assertEqual(load_config(None), Config.defaults())

    def test_empty_text_gives_defaults(self) -> None:
        """An empty file gives the default configuration."""
        self.assertEqual(load_config(""), Config.defaults())

    def test_default_values(self) -> None:
        """The defaults are the documented ones."""
        config = Config.defaults()
        self.assertEqual(config.server.state_dir, "/var/lib/shellserver")
        self.assertEqual(config.server.public_origins, ())
        self.assertEqual((config.tls.certificate, config.tls.private_key), ("", ""))
        self.assertEqual(config.console.token_ttl, 60.0)
        self.assertEqual(config.console.idle_timeout, 600.0)
        self.assertEqual(
            (config.sandbox.uid_min, config.sandbox.uid_max), (200000, 200999)
        )
        self.assertEqual(config.sandbox.cpu_quota, 0.5)

    def test_example_file_is_the_defaults(self) -> None:
        """etc/shellserver.toml sets every key to its default, so it cannot drift."""
        self.assertEqual(load_config_file(EXAMPLE), Config.defaults())

    def test_example_file_lists_every_key(self) -> None:
        """etc/shellserver.toml names every key of every section."""
        import tomllib

        with open(EXAMPLE, "rb") as file:
            document = tomllib.load(file)
        expected = {
            name: {a.name for a in attrs.fields(type(section))}
            for name, section in attrs.asdict(Config.defaults(), recurse=False).items()
        }
        self.assertEqual(
            {name: set(table) for name, table in document.items()}, expected
        )

    def test_values_are_frozen(self) -> None:
        """Configuration values cannot be changed after loading."""
        config = Config.defaults()
        with self.assertRaises(attrs.exceptions.FrozenInstanceError):
            config.console.idle_timeout = 1.0  # type: ignore[misc]

    def test_fields_are_keyword_only(self) -> None:
        """Sections are built with keyword arguments only."""
        with self.assertRaises(TypeError):
            ConsoleConfig(5.0)  # type: ignore[misc]


class LoadingTests(SynchronousTestCase):
    def test_values_are_read(self) -> None:
        """Keys given in the file replace the defaults; the others stay."""
        config = load_config(
            """
            [server]
            state_dir = "/srv/shell"
            node = "node-1"
            public_origins = ["https://www.python.org", "http://localhost:8080"]

            [console]
            idle_timeout = 0
            token_ttl = 30

            [sandbox]
            memory_mb = 512
            cpu_quota = 1
            """
        )
        self.assertEqual(config.server.state_dir, "/srv/shell")
        self.assertEqual(config.server.node, "node-1")
        self.assertEqual(
            config.server.public_origins,
            ("https://www.python.org", "http://localhost:8080"),
        )
        self.assertEqual(config.console.idle_timeout, 0)
        self.assertEqual(config.console.token_ttl, 30)
        self.assertEqual(config.console.auth_timeout, 5.0)
        self.assertEqual(config.sandbox.memory_mb, 512)
        self.assertEqual(config.sandbox.pids_max, 64)

    def test_both_tls_files(self) -> None:
        """A certificate and a key given together are accepted."""
        config = load_config(
            '[tls]\ncertificate = "/etc/ssl/chain.pem"\n'
            'private_key = "/etc/ssl/key.pem"'
        )
        self.assertEqual(
            config.tls,
            TLSConfig(certificate="/etc/ssl/chain.pem", private_key="/etc/ssl/key.pem"),
        )
        self.assertFalse(config.tls.self_signed)

    def test_missing_file(self) -> None:
        """A missing file is a ConfigError naming the path."""
        path = os.path.join(os.path.dirname(EXAMPLE), "no-such-file.toml")
        error = self.assertRaises(ConfigError, load_config_file, path)
        self.assertIn(path, str(error))
        self.assertIsNone(error.key)

    def test_syntax_error_names_the_line(self) -> None:
        """A TOML syntax error is a ConfigError carrying its line."""
        error = self.assertRaises(
            ConfigError,
            load_config,
            "[server]\nnode = 'a'\nstate_dir /x\n",
            source="/etc/s.toml",
        )
        self.assertEqual(error.line, 3)
        self.assertTrue(str(error).startswith("/etc/s.toml, line 3: invalid TOML"))

    def test_syntax_error_at_end_of_document(self) -> None:
        """An unterminated value still reports a line."""
        error = self.assertRaises(ConfigError, load_config, "[server]\nnode = 'a\n\n")
        self.assertEqual(error.line, 2)

    def test_unknown_section(self) -> None:
        """An unknown section is an error naming it."""
        error = self.assertRaises(ConfigError, load_config, "[consoles]\nmax_age = 1")
        self.assertEqual(error.key, "consoles")
        self.assertIn("did you mean 'console'", str(error))

    def test_unknown_key(self) -> None:
        """An unknown key is an error naming section.key, with a suggestion."""
        error = self.assertRaises(
            ConfigError, load_config, "[console]\nidle_timout = 3"
        )
        self.assertEqual(error.key, "console.idle_timout")
        self.assertIn("did you mean 'idle_timeout'", error.message)

    def test_top_level_key(self) -> None:
        """A key outside any section is unknown."""
        error = self.assertRaises(ConfigError, load_config, "node = 'x'")
        self.assertEqual(error.key, "node")

    def test_section_not_a_table(self) -> None:
        """A section given as a plain value is an error."""
        error = self.assertRaises(ConfigError, load_config, "console = 3")
        self.assertEqual(error.key, "console")


class ValidationTests(SynchronousTestCase):
    def assertInvalid(self, text: str, key: str) -> ConfigError:
        error = self.assertRaises(ConfigError, load_config, text)
        self.assertEqual(error.key, key)
        return error

    def test_error_message_format(self) -> None:
        """The error's text is 'section.key: what is wrong, got value'."""
        error = self.assertInvalid(
            "[console]\nidle_timeout = -3", "console.idle_timeout"
        )
        self.assertEqual(
            str(error),
            "console.idle_timeout: must be a positive number of seconds, got -3",
        )
        self.assertEqual(error.message, "must be a positive number of seconds, got -3")

    def test_zero_means_never_only_where_allowed(self) -> None:
        """0 is accepted for idle_timeout and max_age, not for the other times."""
        config = load_config("[console]\nidle_timeout = 0\nmax_age = 0")
        self.assertEqual((config.console.idle_timeout, config.console.max_age), (0, 0))
        self.assertInvalid("[console]\nauth_timeout = 0", "console.auth_timeout")
        self.assertInvalid("[console]\ntoken_ttl = 0", "console.token_ttl")

    def test_seconds_must_be_numbers(self) -> None:
        """A time given as a string or a boolean is refused."""
        error = self.assertInvalid('[console]\nmax_age = "10"', "console.max_age")
        self.assertIn("got '10'", str(error))
        error = self.assertInvalid("[console]\nmax_age = true", "console.max_age")
        self.assertIn("got true", str(error))

    def test_infinite_and_nan_seconds(self) -> None:
        """inf and nan are not durations."""
        self.assertInvalid("[console]\nmax_age = inf", "console.max_age")
        self.assertInvalid("[console]\ntoken_ttl = nan", "console.token_ttl")

    def test_booleans_are_not_integers(self) -> None:
        """TOML true does not pass as the integer 1."""
        error = self.assertInvalid("[sandbox]\nmemory_mb = true", "sandbox.memory_mb")
        self.assertEqual(str(error), "sandbox.memory_mb: must be an integer, got true")

    def test_floats_are_not_integers(self) -> None:
        """A size must be a whole number."""
        self.assertInvalid("[sandbox]\ntmp_mb = 64.0", "sandbox.tmp_mb")

    def test_sizes_positive(self) -> None:
        """Every size and count must be a positive integer."""
        for key in (
            "memory_mb",
            "pids_max",
            "tmp_mb",
            "home_mb",
            "max_open_files",
            "max_file_mb",
            "max_processes",
        ):
            error = self.assertInvalid(f"[sandbox]\n{key} = 0", f"sandbox.{key}")
            self.assertIn("must be a positive integer, got 0", str(error))

    def test_cpu_shares_range(self) -> None:
        """cpu.shares must be within what cgroup v1 accepts."""
        self.assertInvalid("[sandbox]\ncpu_shares = 1", "sandbox.cpu_shares")
        self.assertInvalid("[sandbox]\ncpu_shares = 262145", "sandbox.cpu_shares")
        self.assertEqual(load_config("[sandbox]\ncpu_shares = 2").sandbox.cpu_shares, 2)

    def test_cpu_quota_range(self) -> None:
        """The CPU quota is above 0 and at most the number of CPUs."""
        self.assertInvalid("[sandbox]\ncpu_quota = 0", "sandbox.cpu_quota")
        self.assertInvalid("[sandbox]\ncpu_quota = -0.5", "sandbox.cpu_quota")
        too_many = (os.cpu_count() or 1) + 1
        self.assertInvalid(f"[sandbox]\ncpu_quota = {too_many}", "sandbox.cpu_quota")
        self.assertInvalid("[sandbox]\ncpu_quota = false", "sandbox.cpu_quota")

    def test_uid_min_at_least_1000(self) -> None:
        """Session uids never reach into system accounts."""
        self.assertInvalid(
            "[sandbox]\nuid_min = 999\nuid_max = 2000", "sandbox.uid_min"
        )
        config = load_config("[sandbox]\nuid_min = 1000\nuid_max = 1000")
        self.assertEqual((config.sandbox.uid_min, config.sandbox.uid_max), (1000, 1000))

    def test_uid_range_ordered(self) -> None:
        """uid_max below uid_min is an error on uid_max."""
        error = self.assertInvalid(
            "[sandbox]\nuid_min = 300000\nuid_max = 299999", "sandbox.uid_max"
        )
        self.assertIn("300000", str(error))

    def test_uid_max_below_2_31_minus_1(self) -> None:
        """uid_max must stay below 2**31 - 1."""
        self.assertInvalid("[sandbox]\nuid_max = 2147483647", "sandbox.uid_max")
        config = load_config("[sandbox]\nuid_max = 2147483646")
        self.assertEqual(config.sandbox.uid_max, 2147483646)

    def test_uid_range_excludes_nobody(self) -> None:
        """A uid range containing 65534 (nobody) is refused."""
        error = self.assertInvalid(
            "[sandbox]\nuid_min = 65000\nuid_max = 66000", "sandbox.uid_max"
        )
        self.assertIn("65534", str(error))
        self.assertInvalid(
            "[sandbox]\nuid_min = 65534\nuid_max = 65534", "sandbox.uid_max"
        )
        load_config("[sandbox]\nuid_min = 65535\nuid_max = 70000")

    def test_paths_absolute(self) -> None:
        """Paths must be absolute."""
        self.assertInvalid('[server]\nstate_dir = "state"', "server.state_dir")
        self.assertInvalid('[server]\nstate_dir = ""', "server.state_dir")
        self.assertInvalid('[sandbox]\nruntime = "venv"', "sandbox.runtime")
        self.assertInvalid(
            '[sandbox]\nsystem_python = "python3"', "sandbox.system_python"
        )
        self.assertInvalid('[sandbox]\nsystem_python = ""', "sandbox.system_python")
        self.assertInvalid("[sandbox]\nruntime = 3", "sandbox.runtime")

    def test_tls_certificate_without_key(self) -> None:
        """A certificate without a private key is refused."""
        error = self.assertInvalid('[tls]\ncertificate = "/c.pem"', "tls.private_key")
        self.assertIn("tls.certificate", str(error))

    def test_tls_key_without_certificate(self) -> None:
        """A private key without a certificate is refused."""
        error = self.assertInvalid('[tls]\nprivate_key = "/k.pem"', "tls.certificate")
        self.assertIn("tls.private_key", str(error))

    def test_tls_paths_absolute(self) -> None:
        """TLS file paths must be absolute."""
        self.assertInvalid(
            '[tls]\ncertificate = "c.pem"\nprivate_key = "/k.pem"', "tls.certificate"
        )

    def test_node_name(self) -> None:
        """A node name is a host-name-like word."""
        self.assertInvalid('[server]\nnode = "a b"', "server.node")
        self.assertInvalid('[server]\nnode = "-x"', "server.node")
        self.assertInvalid("[server]\nnode = 1", "server.node")
        self.assertEqual(load_config('[server]\nnode = "eu-1.x"').server.node, "eu-1.x")

    def test_valid_origins(self) -> None:
        """Canonical http and https origins, with ports and IPv6, are accepted."""
        origins = (
            "https://www.python.org",
            "http://localhost:8080",
            "https://[::1]:8443",
            "http://127.0.0.1",
        )
        listed = ", ".join(f'"{o}"' for o in origins)
        text = f"[server]\npublic_origins = [{listed}]"
        self.assertEqual(load_config(text).server.public_origins, origins)

    def test_invalid_origins(self) -> None:
        """Anything but a canonical scheme://host[:port] origin is refused."""
        for origin in (
            "ftp://example.org",
            "example.org",
            "https://example.org/",
            "https://example.org/path",
            "https://example.org?q",
            "https://user@example.org",
            "https://",
            "https://example.org:99999",
            "https://example.org:443",
            "https://Example.org",
            "https://exa mple.org",
            "null",
        ):
            error = self.assertInvalid(
                f'[server]\npublic_origins = ["{origin}"]', "server.public_origins"
            )
            self.assertIn(repr(origin), str(error))

    def test_origin_canonical_form_suggested(self) -> None:
        """A non-canonical origin error says how browsers write it."""
        error = self.assertInvalid(
            '[server]\npublic_origins = ["HTTPS://Example.org:443"]',
            "server.public_origins",
        )
        self.assertIn("'https://example.org'", str(error))

    def test_origins_must_be_an_array_of_strings(self) -> None:
        """public_origins is an array of strings."""
        self.assertInvalid(
            '[server]\npublic_origins = "https://a.org"', "server.public_origins"
        )
        self.assertInvalid("[server]\npublic_origins = [1]", "server.public_origins")

    def test_direct_construction_validates(self) -> None:
        """Sections built in Python are checked like loaded ones."""
        error = self.assertRaises(ConfigError, SandboxConfig, pids_max=-1)
        self.assertEqual(error.key, "sandbox.pids_max")
        error = self.assertRaises(ConfigError, ServerConfig, public_origins=["x"])
        self.assertEqual(error.key, "server.public_origins")


class ConfigMethodTests(SynchronousTestCase):
    def test_with_state_dir(self) -> None:
        """with_state_dir returns a copy with only the state directory changed."""
        config = load_config('[server]\nnode = "n1"\n[console]\nmax_age = 10')
        moved = config.with_state_dir("/tmp/state")
        self.assertEqual(moved.server.state_dir, "/tmp/state")
        self.assertEqual(moved.server.node, "n1")
        self.assertEqual(moved.console, config.console)
        self.assertEqual(config.server.state_dir, "/var/lib/shellserver")

    def test_with_state_dir_validates(self) -> None:
        """with_state_dir refuses a relative path."""
        error = self.assertRaises(ConfigError, Config.defaults().with_state_dir, "rel")
        self.assertEqual(error.key, "server.state_dir")

    def test_derived_paths(self) -> None:
        """TLS, secret and runtime live under the state directory by default."""
        config = Config.defaults().with_state_dir("/s")
        self.assertEqual(config.tls_dir, "/s/tls")
        self.assertEqual(config.secret_path, "/s/secret")
        self.assertEqual(config.runtime_dir, "/s/runtime")

    def test_runtime_setting_wins(self) -> None:
        """An explicit sandbox.runtime is used as it is."""
        config = load_config('[sandbox]\nruntime = "/opt/runtime"')
        self.assertEqual(config.runtime_dir, "/opt/runtime")

    def test_node_name_defaults_to_host_name(self) -> None:
        """An empty node name means the host name; a set one is kept."""
        import socket

        self.assertEqual(ServerConfig().node_name(), socket.gethostname())
        self.assertEqual(ServerConfig(node="n7").node_name(), "n7")
