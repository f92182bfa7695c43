"""sandbox.packages: validation, the runtime's stamp, and the console promises."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from shellserver.config import ConfigError, load_config
from shellserver.sandbox import console_promises
from shellserver.sandbox.runtime import (
    RUNTIME_FORMAT,
    main,
    make_stamp,
    parse_stamp,
    waiter_build_command,
)

WHEEL = "demo @ file:///srv/wheels/demo-1.0-py3-none-any.whl"


class IPythonConfig:
    """Like traitlets' Config (``c.Class.trait = value``), which the server's
    venv does not have: sections appear when first named."""

    def __getattr__(self, name: str):
        section = type(self)()
        setattr(self, name, section)
        return section


def packages_config(line: str):
    return load_config(f"[sandbox]\npackages = {line}\n")


class PackagesConfigTests(SynchronousTestCase):
    def test_default_is_no_packages(self) -> None:
        """Without the key, the runtime gets no extra packages."""
        self.assertEqual(load_config(None).sandbox.packages, ())

    def test_requirements_are_kept_as_written(self) -> None:
        """Names, pinned versions and file URLs are accepted, in order, as a tuple."""
        config = packages_config(f'["rich", "attrs==23.1", "{WHEEL}"]')
        self.assertEqual(config.sandbox.packages, ("rich", "attrs==23.1", WHEEL))

    def test_invalid_requirement_is_named(self) -> None:
        """A string pip could not read is refused, naming the key and the entry."""
        with self.assertRaises(ConfigError) as caught:
            packages_config('["numpy>=", "rich"]')
        message = str(caught.exception)
        self.assertIn("sandbox.packages", message)
        self.assertIn("'numpy>=' is not a valid requirement", message)

    def test_pip_options_are_refused(self) -> None:
        """An entry that pip would take as an option (an index URL, say) is refused."""
        with self.assertRaises(ConfigError) as caught:
            packages_config('["--index-url=http://evil.example/"]')
        self.assertIn("is a pip option, not a requirement", str(caught.exception))

    def test_not_an_array(self) -> None:
        """A single string instead of an array gets a clear error."""
        with self.assertRaises(ConfigError) as caught:
            packages_config('"rich"')
        self.assertIn("sandbox.packages: must be an array of requirement strings",
                      str(caught.exception))

    def test_empty_and_non_string_entries(self) -> None:
        """Empty strings and numbers are refused."""
        for line in ('[""]', "[3]"):
            with self.assertRaises(ConfigError) as caught:
                packages_config(line)
            self.assertIn("each entry must be a non-empty requirement string",
                          str(caught.exception))


class StampTests(SynchronousTestCase):
    def test_stamp_round_trip(self) -> None:
        """What a build writes reads back equal to what the same list expects."""
        import json

        written = json.dumps(make_stamp(("rich", WHEEL)))
        self.assertEqual(parse_stamp(written), make_stamp(("rich", WHEEL)))

    def test_changed_list_does_not_match(self) -> None:
        """Another list, another order or fewer packages mean a rebuild."""
        import json

        built = parse_stamp(json.dumps(make_stamp(("rich", "attrs"))))
        for wanted in ((), ("rich",), ("attrs", "rich"), ("rich", "attrs", "x")):
            self.assertNotEqual(built, make_stamp(wanted))

    def test_old_marker_means_format_one(self) -> None:
        """A runtime from before stamps (a line of text) is rebuilt by the server."""
        old = parse_stamp("built by shellserver\n")
        self.assertEqual(old, {"format": 1, "packages": []})
        self.assertNotEqual(old, make_stamp(()))
        self.assertGreater(RUNTIME_FORMAT, 1)

    def test_relative_path_is_refused(self) -> None:
        """The runtime tool refuses a relative path with status 2 and says why."""
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(main(["--check", "relative/runtime"]), 2)
        self.assertIn("the runtime path must be absolute", err.getvalue())


class ConsolePromisesTests(SynchronousTestCase):
    def test_editor_is_configured(self) -> None:
        """With an editor, %edit and F2 (EDITOR/VISUAL) both use its real path."""
        config = IPythonConfig()
        environ = dict(console_promises.os.environ)
        self.addCleanup(lambda: (console_promises.os.environ.clear(),
                                 console_promises.os.environ.update(environ)))
        console_promises.configure(config, editor="/usr/bin/nano")
        self.assertEqual(config.TerminalInteractiveShell.editor, "/usr/bin/nano")
        self.assertEqual(console_promises.os.environ["EDITOR"], "/usr/bin/nano")
        self.assertEqual(console_promises.os.environ["VISUAL"], "/usr/bin/nano")

    def test_no_editor_no_tips(self) -> None:
        """Without an editor, tips (which advertise F2 and %edit) are off and
        %edit is replaced by an explanation."""
        self.assertIsNone(console_promises.find_editor(("/nonexistent/editor",)))
        config = IPythonConfig()
        self.patch(console_promises, "find_editor", lambda: None)
        console_promises.configure(config)
        self.assertIs(config.InteractiveShell.enable_tip, False)
        self.assertEqual(config.InteractiveShellApp.extensions, ["shellserver_console"])

    def test_pip_says_no_network(self) -> None:
        """pip install fails with the no-network message and the package list."""
        self.patch(console_promises, "installed_packages", lambda: ["ipython 9.0", "rich 13.0"])
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(console_promises.pip_main(["install", "requests"]), 1)
        self.assertEqual(err.getvalue(), console_promises.NO_NETWORK + "\n"
                         "Packages available: ipython 9.0, rich 13.0\n")

    def test_pip_list_lists(self) -> None:
        """pip list still works: it prints what is installed."""
        self.patch(console_promises, "installed_packages", lambda: ["ipython 9.0"])
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(console_promises.pip_main(["list"]), 0)
        self.assertEqual(out.getvalue(), "ipython 9.0\n")


class WaiterBuildTests(SynchronousTestCase):
    def test_static_into_the_runtimes_libexec(self) -> None:
        """The waiter is compiled static (init runs it inside the sandbox, with
        no loader promised there) from the package's waiter.c, into the
        runtime's libexec/."""
        compiler, args = waiter_build_command("/srv/runtime")
        self.assertEqual(compiler, "/usr/bin/cc")
        self.assertIn("-static", args)
        self.assertEqual(args[args.index("-o") + 1], "/srv/runtime/libexec/shellserver-waiter")
        self.assertTrue(args[-1].endswith("shellserver/sandbox/waiter.c"))
