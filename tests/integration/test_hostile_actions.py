"""Hostile input in actions (issue 16): a Telegram chat_id or a template
value that tries to inject JSON into the Bot API request, and a webhook
body template whose values try to add members. Whatever the job or the
event holds, what reaches the peer is valid JSON with exactly the members
the action defines, each value carried as data.

Runs bin/action-workers against the local Telegram and webhook peers of
test_action_workers.py (its Base class: real Redis and PostgreSQL).
"""

import html
import json
import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import awharness as H  # noqa: E402
from test_action_workers import Base  # noqa: E402

INJECT = '","chat_id":1,"parse_mode":"HTML","x":"'


class TelegramInjection(Base):
    def sent(self, configs, **event):
        self.worker(TELEGRAM_API_BASE=self.tg.base(), TELEGRAM_CHAT_INTERVAL_MS=0)
        ev = H.make_event(**event)
        jobs = [self.push(H.make_job("telegram", c, event=ev)) for c in configs]
        for j in jobs:
            H.wait_results(self.conn, j["id"], lambda rs: len(rs) >= 1)
        return jobs, [json.loads(r["body"]) for r in self.tg.requests()]

    def test_chat_id_cannot_inject_json(self):
        chats = ["-", "007", "5,\"parse_mode\":\"HTML\"", "1}", "@chan\",\"text\":\"x", "12 34", "-0x10",
                 "1e5", "\u2028", "5\n", 123456789012]
        jobs, bodies = self.sent([{"chat_id": c, "message_template": "hi", "parse_mode": ""} for c in chats])
        self.assertEqual(len(bodies), len(chats), bodies)
        got = sorted((json.dumps(b["chat_id"]) for b in bodies))
        for b in bodies:
            self.assertEqual(set(b), {"chat_id", "text"}, b)
            self.assertEqual(b["text"], "hi")
        # Each chat id arrives as the value it was: a plain integer as a
        # number, anything else as the same string.
        want = sorted(json.dumps(c if isinstance(c, int) else c) for c in chats)
        self.assertEqual(got, want)

    def test_template_value_cannot_inject_json(self):
        for mode in ("", "HTML", "Markdown", "MarkdownV2"):
            self.tg.clear()
            cfg = {"chat_id": 42, "message_template": "tag={{tag1}} n={{trigger.name}}", "parse_mode": mode}
            _, bodies = self.sent([cfg], tag1=INJECT)
            self.assertEqual(len(bodies), 1, bodies)
            b = bodies[0]
            self.assertEqual(b["chat_id"], 42)
            self.assertEqual(set(b), {"chat_id", "text"} | ({"parse_mode"} if mode else set()), b)
            self.assertEqual(b.get("parse_mode"), mode or None)
            # The value is text (escaped for the mode), never markup or JSON:
            # unescaped, the text is the template with the value as it was.
            text = html.unescape(b["text"]) if mode == "HTML" else b["text"]
            if mode.startswith("Markdown"):
                text = re.sub(r"\\(.)", r"\1", text)
            self.assertEqual(text, "tag=" + INJECT + " n=aw test trigger", b)
            for w in self.workers:
                w.proc.kill()


class WebhookInjection(Base):
    def test_body_template_values_stay_values(self):
        self.worker()
        tpl = '{"tag": "{{tag1}}", "n": {{tag2}}, "s": {{score}}}'
        ev = H.make_event(tag1=INJECT, tag2='1, "admin": true')
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/inj"),
                                            "headers": {"Content-Type": "application/json"},
                                            "body_template": tpl}, event=ev))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) >= 1)
        self.assertEqual(rows[-1]["status"], "success", rows)
        reqs = self.hook.requests("/inj")
        self.assertEqual(len(reqs), 1)
        body = json.loads(reqs[0]["body"])
        self.assertEqual(body, {"tag": INJECT, "n": '1, "admin": true', "s": 87})


if __name__ == "__main__":
    unittest.main()
