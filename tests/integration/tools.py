"""The commands the tests run and the Debian package of each.

need("promtool") gives the command's path, or fails the test with one line
that names the package to install (scripts/deps.sh installs them all), not
a FileNotFoundError traceback from deep in subprocess, and never a skip.
"""
import os
import shutil
import unittest

# unittest leaves the frames of modules that set this out of a failure's
# traceback: what is shown is the test's own line and the message.
__unittest = True

# command -> Debian package (scripts/deps.sh's PACKAGES).
PACKAGES = {
    "promtool": "prometheus",
    "openssl": "openssl",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "rabbitmq-server": "rabbitmq-server",
    "rabbitmqctl": "rabbitmq-server",
    "epmd": "erlang-base (with rabbitmq-server)",
    "node": "nodejs",
    "npm": "npm",
    "psql": "postgresql-client",
    "pg_config": "libpq-dev",
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "curl": "curl",
    "make": "build-essential",
    "clang": "clang",
    "valgrind": "valgrind",
    "ss": "iproute2",
}

# Debian installs some server commands outside PATH.
EXTRA_DIRS = {
    "rabbitmq-server": ["/usr/lib/rabbitmq/bin"],
    "initdb": ["/usr/lib/postgresql/15/bin"],
    "pg_ctl": ["/usr/lib/postgresql/15/bin"],
}


def missing_line(cmd):
    return "%s not found: install the Debian package %s (scripts/deps.sh does)" % (
        cmd, PACKAGES.get(cmd, "that provides it"))


def need(cmd):
    """The path of `cmd`, or a test failure (AssertionError itself: unittest
    trims its frames only for exactly that class) naming its package."""
    for d in EXTRA_DIRS.get(cmd, []):
        p = os.path.join(d, cmd)
        if os.access(p, os.X_OK):
            return p
    p = shutil.which(cmd)
    if p is None:
        raise unittest.TestCase.failureException(missing_line(cmd))
    return p
