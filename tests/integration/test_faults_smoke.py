"""make faults (scripts/faults.sh) itself, in short: one fault (kill -9 of
the event-processor) under a small load, on a stack of its own without
realtime (whose AMQP queues other suites consume). The full run is `make
faults`; this proves the script, its loads and its checks still work."""
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import ROOT  # noqa: E402


class FaultsSmoke(unittest.TestCase):
    def test_one_fault_nothing_lost(self):
        var = tempfile.mkdtemp(prefix="ae-faults-")
        env = {k: v for k, v in os.environ.items() if not k.endswith("_URL")}
        r = subprocess.run([os.path.join(ROOT, "scripts", "faults.sh"), "--faults", "kill9:event-processor",
                            "--services", "api-gateway runtime event-processor action-workers",
                            "--rate", "10", "--before", "2", "--after", "2", "--drain", "60", "--var", var],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 0, out)
        rows = [l.split() for l in r.stdout.splitlines() if l.startswith("kill -9 event-processor")]
        self.assertEqual(len(rows), 2, out)
        for row in rows:
            # fault(3 words) path(2) load(2) accepted delivered lost duplicated ...
            accepted, delivered, lost, dup = (int(x) for x in row[7:11])
            self.assertGreater(accepted, 10, out)
            self.assertEqual((delivered, lost, dup), (accepted, 0, 0), out)


if __name__ == "__main__":
    unittest.main()
