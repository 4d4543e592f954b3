"""Issue 9.1: every command the tests run comes from scripts/deps.sh, and a
missing one fails its test with one line naming the package to install
(never a FileNotFoundError traceback, never a skip)."""
import os
import re
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tools  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def deps_packages():
    """The package names scripts/deps.sh installs (its *PACKAGES* arrays)."""
    with open(os.path.join(ROOT, "scripts", "deps.sh")) as f:
        text = f.read()
    names = set()
    for body in re.findall(r"^PACKAGES\w*=\(([^)]*)\)", text, re.M):
        names.update(body.split())
    return names | {"nodejs", "npm"}  # judged by their commands there


class ToolsTest(unittest.TestCase):
    def test_every_package_comes_from_deps_sh(self):
        have = deps_packages()
        for cmd, pkg in tools.PACKAGES.items():
            self.assertIn(pkg.split()[0], have | {"erlang-base"}, "%s: %s is not in scripts/deps.sh" % (cmd, pkg))
        # erlang-base comes with rabbitmq-server, which deps.sh installs.
        self.assertIn("rabbitmq-server", have)

    def test_every_command_is_installed(self):
        """After scripts/deps.sh (make test runs it) every command is there."""
        missing = []
        for cmd in tools.PACKAGES:
            try:
                tools.need(cmd)
            except AssertionError as e:
                missing.append(str(e))
        self.assertEqual(missing, [])

    def test_tests_run_commands_through_need(self):
        """A command named literally in subprocess (["promtool", ...]) would
        fail with FileNotFoundError when missing: each goes through need()."""
        pattern = re.compile(r"subprocess\.\w+\(\s*\[\s*[\"']([A-Za-z][\w.-]*)[\"']")
        found = []
        for d in (HERE, os.path.join(HERE, "peers")):
            for name in sorted(os.listdir(d)):
                if name.endswith(".py"):
                    with open(os.path.join(d, name)) as f:
                        for m in pattern.finditer(f.read()):
                            found.append("%s: %s" % (name, m.group(1)))
        self.assertEqual(found, [])

    def test_missing_command_fails_with_one_line(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "test_needs_promtool.py")
            with open(path, "w") as f:
                f.write("import sys, unittest\nsys.path.insert(0, %r)\nimport tools\n\n"
                        "class T(unittest.TestCase):\n"
                        "    def test_it(self):\n"
                        "        tools.need('promtool')\n" % HERE)
            env = dict(os.environ, PATH=d)  # nothing to find there
            r = subprocess.run([sys.executable, "-m", "unittest", "test_needs_promtool"], cwd=d, env=env,
                               capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        self.assertNotEqual(r.returncode, 0, out)
        self.assertIn("FAILED (failures=1)", out)
        self.assertNotIn("skip", out.lower())
        self.assertNotIn("FileNotFoundError", out)
        lines = [ln for ln in out.splitlines() if "prometheus" in ln]
        self.assertEqual(lines, ["AssertionError: promtool not found: install the Debian package prometheus "
                                 "(scripts/deps.sh does)"], out)
        # Only the test's own frame is shown, none of tools.py.
        self.assertNotIn("tools.py", out)


if __name__ == "__main__":
    unittest.main()
