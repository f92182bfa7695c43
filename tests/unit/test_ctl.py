"""Tests for shellserver.ctl, the operator's CLI (its Redis side is tested
on a real Redis in tests/integration/test_cluster_core_real.py)."""

import argparse
import io
import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from shellserver.cluster.store import NodeInfo, View
from shellserver.ctl import CtlError, describe_view, parse_arguments, run


class CtlTests(SynchronousTestCase):
    def config(self, text: str) -> str:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "shellserver.toml")
        with open(path, "w") as file:
            file.write(text)
        return path

    def test_commands(self) -> None:
        """drain and undrain take a node; the others take nothing."""
        arguments = parse_arguments(["--config", "/x.toml", "drain", "n1"])
        self.assertEqual((arguments.command, arguments.node), ("drain", "n1"))
        self.assertEqual(parse_arguments(["-c", "/x.toml", "pause"]).command, "pause")
        with self.assertRaises(SystemExit) as caught:
            parse_arguments(["--config", "/x.toml", "drain"])
        self.assertEqual(caught.exception.code, 2)

    def test_no_cluster_is_refused(self) -> None:
        """A configuration without cluster.redis_url is a clear error (exit 2)."""
        arguments = argparse.Namespace(config=self.config(""), command="status")
        failure = self.failureResultOf(run(None, arguments, io.StringIO()), CtlError)
        self.assertIn("configures no cluster", str(failure.value))

    def test_bad_config_is_refused(self) -> None:
        """A configuration that does not load is refused naming the key."""
        arguments = argparse.Namespace(config=self.config("[cluster]\nnode_ttl = -1\n"),
                                       command="status")
        failure = self.failureResultOf(run(None, arguments, io.StringIO()), CtlError)
        self.assertIn("cluster.node_ttl", str(failure.value))

    def test_status_lines(self) -> None:
        """status prints the switch and one line per live node with its state."""
        view = View(nodes=(
            NodeInfo("a", "https://a.example", True, 1, 4, False, 0.0),
            NodeInfo("b", "https://b.example", False, 0, 4, True, 0.0),
        ), switch="pause", drained=False)
        self.assertEqual(describe_view(view), [
            "kill switch: pause",
            "a  https://a.example  1/4 consoles  accepting",
            "b  https://b.example  0/4 consoles  draining",
        ])
        self.assertEqual(describe_view(View((), None, False)),
                         ["kill switch: on (consoles are admitted)", "no live nodes"])
