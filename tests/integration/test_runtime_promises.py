"""A server that builds its runtime with a package from sandbox.packages:
consoles import it, and what IPython offers there (%edit, F2, pip) is true."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile

import pytest
from conftest import sandbox_leftovers, start_server, wait_until
from console_client import ConsoleClient

pytestmark = pytest.mark.integration

UIDS = 241000
PACKAGE = "shellserver_demo_pkg"
GREETING = "hello from sandbox.packages"
NO_NETWORK = "pip install cannot reach the internet from this console: it has no network."
F2 = "\x1bOQ"
CTRL_X = "\x18"


def make_wheel(directory, name: str = PACKAGE, version: str = "1.0") -> str:
    """A pure-Python wheel built here (a zip with its metadata): no network."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"GREETING = {GREETING!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: shellserver-tests\n"
                          "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    record = []
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            data = text.encode()
            wheel.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{member},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    os.chmod(directory, 0o755)
    return path


def stamp(server) -> dict | None:
    try:
        with open(server.state_dir / "runtime" / ".shellserver-runtime") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def packaged_server(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("wheels")
    requirement = f"{PACKAGE} @ file://{make_wheel(str(wheels))}"
    srv = start_server(tmp_path_factory.mktemp("packages"), uid_min=UIDS, uid_max=UIDS + 9,
                       config=f"packages = [{json.dumps(requirement)}]", runtime=None)
    try:
        # One build (pip's cache makes it some seconds); the server writes
        # the stamp last, with the list it was built with.
        built = wait_until(lambda: stamp(srv), timeout=300, interval=0.5)
        assert built and built["packages"] == [requirement], srv.log()
        yield srv
    finally:
        srv.stop()
    assert sandbox_leftovers(srv) == []


@pytest.fixture
def console(packaged_server):
    client = ConsoleClient(packaged_server)
    client.login()
    assert client.wait_for_prompt(1, timeout=30), client.display()
    yield client
    client.close()


def test_package_from_config_is_importable(console):
    """A package named in sandbox.packages is installed in the runtime and imports."""
    screen = console.run(f"import {PACKAGE}; print({PACKAGE}.GREETING)", 2)
    assert GREETING in screen


def test_shell_pip_install_says_no_network(console):
    """!pip install prints the no-network message and what is installed,
    not a certificate error."""
    screen = console.run("!pip install requests", 2)
    assert NO_NETWORK in screen
    assert "Packages available:" in screen and PACKAGE in screen
    assert "certificate" not in screen.lower()


def test_pip_magic_says_no_network(console):
    """%pip install (python -m pip) prints the same message."""
    screen = console.run("%pip install requests", 2)
    assert NO_NETWORK in screen


def test_edit_magic_opens_the_editor(console):
    """%edit opens a real editor (nano, bound from /usr) instead of "vi: not found";
    what is saved there runs on exit."""
    console.type("%edit\r")
    assert console.wait_for_screen("GNU nano"), console.display()
    console.type("print(6 * 7)")
    console.type(CTRL_X)
    assert console.wait_for_screen("Save modified buffer?"), console.display()
    console.type("y")
    assert console.wait_for_screen("File Name to Write"), console.display()
    console.type("\r")
    assert console.wait_for_prompt(2), console.display()
    assert "42" in console.display()
    assert "not found" not in console.display()


def test_f2_edits_the_input_in_the_editor(console):
    """F2 opens the current input in the editor and brings it back."""
    console.type("answer = 40 + 2")
    console.type(F2)
    # nano draws its screen in pieces (its title bar before the text): wait
    # for the input itself in it
    assert console.wait_for(lambda c: "GNU nano" in c.display()
                            and "answer = 40 + 2" in c.display()), console.display()
    seen = len("".join(console.raw_output))
    console.type(CTRL_X)

    def prompt_redrawn(client) -> bool:
        # pyte keeps nano's drawing (no alternate screen): look at what
        # came after it, IPython drawing its prompt and the input again.
        after = "".join(client.raw_output)[seen:]
        return "In [" in after and "answer" in after

    assert console.wait_for(prompt_redrawn), console.display()
    console.run("", 2)  # Enter runs the input that came back from the editor
    assert "Out[2]: 42" in console.run("answer", 3)


def test_prebuilt_runtime_with_other_packages_is_refused(tmp_path):
    """A prebuilt sandbox.runtime not built with sandbox.packages stops the
    start with a message naming both lists and how to rebuild."""
    import subprocess

    from conftest import RUNTIME, TWISTD

    config = tmp_path / "shellserver.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[sandbox]\nruntime = "{RUNTIME}"\npackages = ["rich"]\n'
                      f"uid_min = {UIDS + 10}\nuid_max = {UIDS + 19}\n")
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "shellserver", "--config", str(config),
         "--listen", "tcp:0:interface=127.0.0.1"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "was built with packages [none], not with sandbox.packages [rich]" in output
    assert "python -m shellserver.sandbox.runtime --config FILE" in output
