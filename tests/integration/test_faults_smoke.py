"""make faults (scripts/faults.sh) itself, in short: one fault (kill -9 of
the event-processor) under a small load, on a stack of its own without
realtime (whose AMQP queues other suites consume). The full run is `make
faults`; this proves the script, its loads and its checks still work."""
import json
import os
import shutil
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
                            "--rate", "10", "--before", "2", "--after", "2", "--drain", "60", "--var", var, "--json", os.path.join(var, "rows.json")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        out = r.stdout + r.stderr
        self.assertEqual(r.returncode, 0, out)
        with open(os.path.join(var, "rows.json")) as f:
            res = json.load(f)
        self.assertEqual(res["failed"], [], out)
        self.assertEqual(sorted(r["path"] for r in res["rows"]),
                         ["SSE publish→client", "events→webhook", "proxy→upstream", "runtime appends"], out)
        for row in res["rows"]:
            self.assertEqual(row["fault"], "kill -9 event-processor", out)
            self.assertGreater(row["accepted"], 10, out)
            self.assertEqual((row["delivered"], row["lost"], row["duplicated"]), (row["accepted"], 0, 0), out)
        shutil.rmtree(var, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
