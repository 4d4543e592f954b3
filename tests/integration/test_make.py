"""The Makefile (issue 9.5): a user's CFLAGS only adds to the flags the
build needs, a package pkg-config does not know stops make at once with a
line naming it, and the lint rule exists. `make -n` only: nothing is built."""
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import ROOT  # noqa: E402
from tools import need  # noqa: E402


def make(*args, **env):
    e = dict(os.environ, **env)
    e.pop("MAKEFLAGS", None)
    e.pop("MFLAGS", None)
    return subprocess.run([need("make"), "--no-print-directory", "-C", ROOT] + list(args), env=e, capture_output=True,
                          text=True, timeout=120)


class MakefileTest(unittest.TestCase):
    def test_user_cflags_keep_the_required_flags(self):
        r = make("-n", "-B", "O=build-maketest", "CFLAGS=-O0", "V=1", "build-maketest/libshared/buf.o")
        self.assertEqual(r.returncode, 0, r.stderr)
        line = [ln for ln in r.stdout.splitlines() if "libshared/buf.c" in ln][0]
        for flag in ("-Werror", "-MMD", "-MP", "-pthread", "-std=c11", "-Wall", "-O0", "-Ilibshared"):
            self.assertIn(flag, line.split())
        self.assertNotIn("-O2", line.split())
        # Without CFLAGS the default optimisation is there.
        r = make("-n", "-B", "O=build-maketest", "V=1", "build-maketest/libshared/buf.o")
        self.assertIn("-O2", [ln for ln in r.stdout.splitlines() if "libshared/buf.c" in ln][0].split())

    def test_missing_package_named_at_once(self):
        r = make("-n", "all", PKG_CONFIG_LIBDIR="/nonexistent", PKG_CONFIG_PATH="/nonexistent")
        self.assertNotEqual(r.returncode, 0)
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        self.assertEqual(len(err), 1, r.stderr)
        self.assertIn("pkg-config does not know: libmicrohttpd libpq hiredis", err[0])
        self.assertIn("scripts/deps.sh", err[0])
        self.assertNotIn("cc ", r.stdout)  # stopped before any compile

    def test_goals_that_install_first_do_not_need_the_packages(self):
        """`make test` on a fresh machine runs deps.sh before pkg-config is asked."""
        r = make("-n", "deps", PKG_CONFIG_LIBDIR="/nonexistent", PKG_CONFIG_PATH="/nonexistent")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("scripts/deps.sh", r.stdout)

    def test_lint_rule_runs_both_linters(self):
        r = make("-n", "lint-run")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("cppcheck", r.stdout)
        self.assertIn("clang-tidy", r.stdout)
        self.assertIn("--error-exitcode=1", r.stdout)
        self.assertIn('--warnings-as-errors="*"', r.stdout)


if __name__ == "__main__":
    unittest.main()
