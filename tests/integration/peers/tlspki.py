"""A throwaway PKI for the https tests, made with the openssl command when
the tests start (nothing is committed): a CA, and server certificates signed
by it or not.

    pki = tlspki.get()          # made once per process, removed at exit
    pki.ca                      # the CA certificate (PEM): CA_BUNDLE for the workers
    pki.pair("good")            # (cert, key) for 127.0.0.1 and localhost, signed by the CA
    pki.pair("wrong_host")      # signed by the CA, for wrong-host.example only
    pki.pair("expired")         # signed by the CA, valid in 2020 only
    pki.pair("unknown_ca")      # for 127.0.0.1, signed by a CA nobody trusts
    pki.server_context("good")  # an ssl.SSLContext serving that pair

A missing openssl fails with one line naming the package.
"""
import atexit
import os
import shutil
import ssl
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import need  # noqa: E402

_pki = None


class PkiError(RuntimeError):
    pass


def _run(args, cwd):
    r = subprocess.run([need("openssl")] + args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise PkiError("openssl %s failed: %s" % (" ".join(args), r.stderr.strip()))


class Pki:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="aw-pki-")
        atexit.register(shutil.rmtree, self.dir, True)
        d = self.dir
        self.ca = os.path.join(d, "ca.pem")
        self._pairs = {}
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _run(["req", "-x509"] + ec + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "3", "-subj", "/CN=aw test CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
        # `openssl ca` is the one subcommand of OpenSSL 3.0 that sets a
        # start date in the past (for the expired certificate).
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca = aw\n[aw]\ndatabase = index.txt\nserial = serial\nnew_certs_dir = .\n"
                    "certificate = ca.pem\nprivate_key = ca.key\ndefault_md = sha256\npolicy = any\n"
                    "copy_extensions = none\nunique_subject = no\n[any]\ncommonName = supplied\n")
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "serial"), "w") as f:
            f.write("1000\n")
        for name, san, dates in (("good", "DNS:localhost,IP:127.0.0.1", None),
                                 ("wrong_host", "DNS:wrong-host.example", None),
                                 ("expired", "DNS:localhost,IP:127.0.0.1", ("20200101000000Z", "20200201000000Z"))):
            key, csr, crt = name + ".key", name + ".csr", name + ".pem"
            ext = name + ".ext"
            with open(os.path.join(d, ext), "w") as f:
                f.write("basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n"
                        "extendedKeyUsage = serverAuth\nsubjectAltName = %s\n" % san)
            _run(["req"] + ec + ["-keyout", key, "-out", csr, "-subj", "/CN=aw test " + name], d)
            when = ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "3"]
            _run(["ca", "-batch", "-config", "ca.cnf", "-notext", "-in", csr, "-out", crt, "-extfile", ext] + when, d)
            self._pairs[name] = (os.path.join(d, crt), os.path.join(d, key))
        _run(["req", "-x509"] + ec + ["-keyout", "unknown_ca.key", "-out", "unknown_ca.pem", "-days", "3",
              "-subj", "/CN=aw untrusted", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], d)
        self._pairs["unknown_ca"] = (os.path.join(d, "unknown_ca.pem"), os.path.join(d, "unknown_ca.key"))

    def pair(self, name):
        return self._pairs[name]

    def server_context(self, name="good"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self._pairs[name])
        return ctx


def get():
    """The process's PKI, made on first use."""
    global _pki
    if _pki is None:
        _pki = Pki()
    return _pki
