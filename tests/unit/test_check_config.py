"""`twistd shellserver --check-config FILE`: validation only, "ok" or the key at fault."""

import os
import shutil
import tempfile
from io import StringIO

from twisted.trial.unittest import SynchronousTestCase

from shellserver.startup import EXIT_CONFIG_INVALID, check_config
from shellserver.tap import Options


class CheckConfigTests(SynchronousTestCase):
    def write(self, text):
        directory = tempfile.mkdtemp(prefix="shellserver-check-config-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "shellserver.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_good_file_is_ok(self):
        """A valid file prints "ok" and exits 0."""
        out, err = StringIO(), StringIO()
        exit = check_config(self.write('[console]\nidle_timeout = 300\n'), out, err)
        self.assertEqual(exit.code, 0)
        self.assertTrue(out.getvalue().startswith("ok: "))
        self.assertEqual(err.getvalue(), "")

    def test_bad_value_names_the_key(self):
        """A bad value exits non-zero naming section.key and why."""
        out, err = StringIO(), StringIO()
        exit = check_config(self.write('[admission]\ncapacity = "many"\n'), out, err)
        self.assertEqual(exit.code, EXIT_CONFIG_INVALID)
        self.assertIn("admission.capacity", err.getvalue())
        self.assertIn("integer", err.getvalue())
        self.assertEqual(out.getvalue(), "")

    def test_unknown_key_and_syntax_error(self):
        """An unknown key is named; a TOML syntax error gives its line."""
        err = StringIO()
        check_config(self.write('[server]\nlisten_port = 1\n'), StringIO(), err)
        self.assertIn("server.listen_port", err.getvalue())
        err = StringIO()
        exit = check_config(self.write('[server]\nnode = \n'), StringIO(), err)
        self.assertEqual(exit.code, EXIT_CONFIG_INVALID)
        self.assertIn("line 2", err.getvalue())

    def test_option_exits_before_anything_else(self):
        """--check-config exits from option parsing: nothing else is checked or prepared."""
        path = self.write('[server]\nstate_dir = "/nonexistent/never/made"\n')
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--check-config", path])
        self.assertEqual(caught.exception.code, 0)
