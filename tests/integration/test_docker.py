"""Issue 15: what the Dockerfiles and docker/docker-compose.yml promise,
checked without building an image (`make docker-test` builds and runs them).

- docker-compose accepts the compose file (and refuses it without a secret);
  the stack's wiring: health checks, the migrate job the services wait for,
  environment per SPEC 0, named volumes;
- every COPY source exists and enters the build context (.dockerignore as
  docker-py reads it), and var/, build*/, bin/, node_modules/ never do;
- every program a Dockerfile builds, copies and runs is one `make` builds;
- EXPOSE, ENV, HEALTHCHECK and compose's ports and health checks match the
  services' defaults (README's Ports table and the sources' cfg defaults);
- each runtime stage installs every shared library its programs need (the
  packages of what the built program loads, found with readelf, ldd and
  dpkg -S), and no library package that none of them links.
"""
import glob
import json
import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tools  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DOCKER = os.path.join(ROOT, "docker")
BINDIR = os.path.join(ROOT, os.environ.get("BINDIR", "bin"))

SERVICES = ["api-gateway", "realtime", "runtime", "event-processor", "action-workers"]
IMAGES = SERVICES + ["migrate"]
# The variable that sets each service's port, and the one for its address.
PORT_VAR = {"api-gateway": "SERVER_PORT", "realtime": "PORT", "runtime": "RUNTIME_BIND_ADDR",
            "event-processor": "METRICS_PORT", "action-workers": "METRICS_PORT"}
HOST_VAR = {"api-gateway": "SERVER_HOST", "realtime": "HOST", "event-processor": "METRICS_HOST",
            "action-workers": "METRICS_HOST"}
# What each service needs besides PostgreSQL (SPEC 0 and the service sections).
USES = {"api-gateway": {"postgres", "redis"}, "event-processor": {"postgres", "redis"},
        "action-workers": {"postgres", "redis"}, "realtime": {"postgres", "redis", "rabbitmq"},
        "runtime": {"postgres"}}
# Libraries a program loads with dlopen, which no ldd shows: libwebsockets
# 4.1 takes its libev event loop from a plugin.
PLUGINS = {"libwebsockets17": {"libwebsockets-evlib-ev"}}
SANITIZER_LIB = re.compile(r"^lib(asan|ubsan|tsan|lsan|hwasan)\.so")
SECRETS = ["JWT_SECRET", "INGEST_TOKEN", "INTERNAL_TOKEN", "RUNTIME_SYNC_TOKEN_SIGNING_KEY"]


# --------------------------------------------------------------------------- Dockerfile parsing

def instructions(path):
    """[(KEYWORD, argument text)] with continuation lines joined and
    comments dropped."""
    out, cur = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not cur and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if cur and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                cur += line[:-1] + " "
                continue
            cur += line
            kw, _, arg = cur.strip().partition(" ")
            out.append((kw.upper(), arg.strip()))
            cur = ""
    return out


def stages(path):
    """[{"from", "name", "ins": [(KW, arg)]}], one per FROM."""
    out = []
    for kw, arg in instructions(path):
        if kw == "FROM":
            parts = arg.split()
            out.append({"from": parts[0], "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                        "ins": []})
        else:
            out[-1]["ins"].append((kw, arg))
    return out


def dockerfile(name):
    return os.path.join(DOCKER, name + ".Dockerfile")


def final(name):
    return stages(dockerfile(name))[-1]


def args(stage, kw):
    return [a for k, a in stage["ins"] if k == kw]


def apt_installs(stage):
    """The packages of the stage's `apt-get install` commands."""
    pkgs = []
    for run in args(stage, "RUN"):
        for cmd in re.split(r"&&|;", run):
            words = cmd.split()
            if "apt-get" in words and "install" in words:
                pkgs += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return pkgs


def exec_form(arg):
    return json.loads(arg) if arg.startswith("[") else ["/bin/sh", "-c", arg]


def copies(stage):
    """[(from_stage or None, [sources], dest)] of the stage's COPY lines."""
    out = []
    for a in args(stage, "COPY"):
        words = a.split()
        src_stage = None
        while words and words[0].startswith("--"):
            if words[0].startswith("--from="):
                src_stage = words[0][len("--from="):]
            words.pop(0)
        out.append((src_stage, words[:-1], words[-1]))
    return out


def env_of(stage):
    env = {}
    for a in args(stage, "ENV"):
        for item in a.split():
            k, _, v = item.partition("=")
            env[k] = v
    return env


# --------------------------------------------------------------------------- the services' defaults

def readme_ports():
    """{service: (port, first health route)} from README's Ports table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text.split("## Ports", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in SERVICES:
            port = int(re.match(r"\d+", cells[1]).group(0))
            route = re.search(r"`GET (/[^`]*)`", cells[2]).group(1)
            out[cells[0]] = (port, route)
    return out


def source_default(service):
    """The port the service listens on with nothing configured, read from
    its main.c's cfg call."""
    with open(os.path.join(ROOT, service, "main.c")) as f:
        text = f.read()
    var = PORT_VAR[service]
    if var == "RUNTIME_BIND_ADDR":
        m = re.search(r'cfg_str\(\w+, "RUNTIME_BIND_ADDR", "[^"]*:(\d+)"', text)
    else:
        m = re.search(r'cfg_int\(\w+, "%s", (\d+),' % var, text)
    if not m:
        raise AssertionError("%s/main.c: no default for %s found" % (service, var))
    return int(m.group(1))


def stack_health_route(service):
    """scripts/stack.sh's health URL for the service (what `make up` waits on)."""
    with open(os.path.join(ROOT, "scripts", "stack.sh")) as f:
        text = f.read()
    body = text.split("health_url() {", 1)[1].split("\n}", 1)[0]
    for m in re.finditer(r"^\s*([a-z| -]+)\)\s*echo \"http://127\.0\.0\.1:\$port(/[^\"]*)\"", body, re.M):
        if service in [s.strip() for s in m.group(1).split("|")]:
            return m.group(2)
    raise AssertionError("scripts/stack.sh has no health URL for %s" % service)


# --------------------------------------------------------------------------- libraries and packages

def ldd_map(path):
    """{soname: resolved path} of everything the program loads."""
    r = subprocess.run([tools.need("ldd"), path], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError("ldd %s: %s" % (path, r.stderr.strip()))
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m:
            if m.group(2) == "not":
                raise AssertionError("%s: %s is not found" % (path, m.group(1)))
            out[m.group(1)] = m.group(2)
    return out


def needed(path):
    r = subprocess.run([tools.need("readelf"), "-d", path], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError("readelf -d %s: %s" % (path, r.stderr.strip()))
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)


def libraries(program):
    """The resolved paths of every library the program needs, walking
    DT_NEEDED from the binary (so the sanitizer runtime of a SANITIZE build,
    and only what it pulls in, is left out)."""
    where = ldd_map(program)
    seen, todo = {}, [n for n in needed(program)]
    while todo:
        so = todo.pop()
        if so in seen or SANITIZER_LIB.match(so):
            continue
        path = where.get(so)
        if path is None:  # the dynamic loader itself
            continue
        seen[so] = path
        todo += needed(path)
    return seen


def owner_packages(paths):
    """{path: Debian package} with dpkg -S, which knows /usr/lib/... while ldd
    may say /lib/... (merged /usr), or a symlink's target."""
    paths = sorted(set(paths))
    cands = {p: [p, "/usr" + p if not p.startswith("/usr/") else p[4:], os.path.realpath(p)] for p in paths}
    r = subprocess.run([tools.need("dpkg"), "-S"] + sorted({c for cs in cands.values() for c in cs}),
                       capture_output=True, text=True, timeout=60)
    owner = {}
    for line in r.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        owner[path.strip()] = pkg.split(":")[0].split(",")[0].strip()
    out = {}
    for p, cs in cands.items():
        hit = next((owner[c] for c in cs if c in owner), None)
        if hit is None:
            raise AssertionError("no Debian package owns %s" % p)
        out[p] = hit
    return out


_STATUS = None


def dpkg_status():
    """{package: (essential, [dependency alternatives])} of every installed package."""
    global _STATUS
    if _STATUS is None:
        r = subprocess.run([tools.need("dpkg-query"), "-W", "-f",
                            "${Package}\t${Essential}\t${Pre-Depends}, ${Depends}\n"],
                           capture_output=True, text=True, timeout=60)
        _STATUS = {}
        for line in r.stdout.splitlines():
            name, ess, deps = line.split("\t")
            alts = []
            for d in deps.split(","):
                d = d.strip()
                if d:
                    alts.append([re.sub(r"[\s(:].*", "", a.strip()) for a in d.split("|")])
            _STATUS[name] = (ess == "yes", alts)
    return _STATUS


def closure(pkgs):
    """The packages apt installs with pkgs (their Pre-Depends and Depends,
    the first installed alternative of each), judged from this host's dpkg
    database: the same Debian release as the images."""
    st = dpkg_status()
    out, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        if p not in st:
            continue
        for alts in st[p][1]:
            pick = next((a for a in alts if a in st), alts[0])
            todo.append(pick)
    return out


def base_packages():
    """What debian:bookworm-slim (debootstrap --variant=minbase) has before
    a stage installs anything: the Essential packages and apt, with what
    they depend on."""
    return closure([p for p, (ess, _) in dpkg_status().items() if ess] + ["apt"])


# --------------------------------------------------------------------------- tests

def compose_env():
    env = dict(os.environ)
    for s in SECRETS:
        env[s] = "test-" + s.lower() + "-0123456789abcdef0123456789abcdef"
    return env


def compose(*argv, env=None):
    return subprocess.run([tools.need("docker-compose"), "-f", os.path.join(DOCKER, "docker-compose.yml")] + list(argv),
                          capture_output=True, text=True, timeout=120, env=env or compose_env(), cwd=DOCKER)


class Compose(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import yaml  # python3-yaml (scripts/deps.sh)
        r = compose("config")
        if r.returncode != 0:
            raise AssertionError("docker-compose config: " + r.stderr)
        cls.cfg = yaml.safe_load(r.stdout)

    def test_config_is_accepted(self):
        r = compose("config", "-q")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "")

    def test_every_secret_is_required(self):
        for s in SECRETS:
            with self.subTest(secret=s):
                env = compose_env()
                del env[s]
                r = compose("config", "-q", env=env)
                self.assertNotEqual(r.returncode, 0)
                self.assertIn("set " + s, r.stderr)

    def test_servers_have_health_checks_and_volumes(self):
        svcs = self.cfg["services"]
        for name, data in [("postgres", "/var/lib/postgresql/data"), ("redis", "/data"),
                           ("rabbitmq", "/var/lib/rabbitmq")]:
            with self.subTest(server=name):
                self.assertEqual(svcs[name]["healthcheck"]["test"][0], "CMD")
                vols = svcs[name]["volumes"]
                self.assertEqual(len(vols), 1)
                source, _, target = vols[0].partition(":")  # compose 1.x prints the short form
                self.assertEqual(target, data + ":rw")
                self.assertIn(source, self.cfg["volumes"])

    def test_migrate_job(self):
        m = self.cfg["services"]["migrate"]
        self.assertEqual(m["build"]["dockerfile"], "docker/migrate.Dockerfile")
        self.assertEqual(os.path.realpath(m["build"]["context"]), os.path.realpath(ROOT))
        self.assertEqual(m["depends_on"], {"postgres": {"condition": "service_healthy"}})
        self.assertEqual(m["environment"]["DATABASE_URL"], "postgres://erc8004:erc8004@postgres:5432/erc8004_backend")
        self.assertEqual(m.get("restart", "no"), "no")

    def test_services(self):
        ports = readme_ports()
        for name in SERVICES:
            with self.subTest(service=name):
                s = self.cfg["services"][name]
                self.assertEqual(s["build"]["dockerfile"], "docker/%s.Dockerfile" % name)
                self.assertEqual(os.path.realpath(s["build"]["context"]), os.path.realpath(ROOT))
                want = {"migrate": {"condition": "service_completed_successfully"}}
                for dep in USES[name]:
                    want[dep] = {"condition": "service_healthy"}
                self.assertEqual(s["depends_on"], want)
                port, route = ports[name]
                self.assertEqual(s["healthcheck"]["test"],
                                 ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:%d%s" % (port, route)])
                env = s["environment"]
                self.assertEqual(env["DATABASE_URL"], "postgres://erc8004:erc8004@postgres:5432/erc8004_backend")
                self.assertEqual(env["REDIS_URL"], "redis://redis:6379/0")
                self.assertEqual(env["AMQP_URL"], "amqp://guest:guest@rabbitmq:5672/%2f")
                self.assertEqual(env["APP_ENV"], "production")
                for sec in SECRETS:
                    self.assertEqual(env[sec], compose_env()[sec])
                want_port = "0.0.0.0:%d" % port if PORT_VAR[name] == "RUNTIME_BIND_ADDR" else str(port)
                self.assertEqual(env[PORT_VAR[name]], want_port)
                for p in s.get("ports", []):
                    self.assertEqual(int(p["target"]), port)


class Dockerfiles(unittest.TestCase):
    def test_every_image_has_a_dockerfile(self):
        have = sorted(os.path.basename(p)[:-len(".Dockerfile")] for p in glob.glob(os.path.join(DOCKER, "*.Dockerfile")))
        self.assertEqual(have, sorted(IMAGES))

    def test_two_stages_on_bookworm(self):
        for name in IMAGES:
            with self.subTest(image=name):
                st = stages(dockerfile(name))
                self.assertEqual(len(st), 2)
                self.assertEqual(st[0]["name"], "build")
                for s in st:
                    self.assertEqual(s["from"], "debian:bookworm-slim")
                self.assertIn("build-essential", apt_installs(st[0]))
                self.assertNotIn("build-essential", apt_installs(st[1]))
                self.assertFalse([p for p in apt_installs(st[1]) if p.endswith("-dev")])

    def test_runtime_stage_runs_as_a_user(self):
        for name in IMAGES:
            with self.subTest(image=name):
                st = final(name)
                users = args(st, "USER")
                self.assertEqual(len(users), 1)
                self.assertNotIn(users[0], ("root", "0"))
                self.assertTrue(any("useradd" in r and re.search(r"\b%s\s*$" % re.escape(users[0]), r.split("&&")[-1])
                                    for r in args(st, "RUN")), "no useradd for %s" % users[0])
                # USER comes after every RUN: nothing runs as root at start.
                kws = [k for k, _ in st["ins"]]
                self.assertGreater(kws.index("USER"), max(i for i, k in enumerate(kws) if k == "RUN"))

    def test_copy_sources_exist_and_enter_the_context(self):
        from docker.utils.build import exclude_paths  # python3-docker, what docker-compose sends
        with open(os.path.join(ROOT, ".dockerignore")) as f:
            patterns = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        context = set(exclude_paths(ROOT, patterns))
        for name in IMAGES:
            st = stages(dockerfile(name))
            names = [s["name"] for s in st]
            for s in st:
                for src_stage, srcs, _dest in copies(s):
                    for src in srcs:
                        with self.subTest(image=name, src=src):
                            if src_stage is not None:
                                self.assertIn(src_stage, names)
                                continue
                            rel = os.path.normpath(src)
                            self.assertTrue(os.path.exists(os.path.join(ROOT, rel)), "%s does not exist" % src)
                            self.assertIn(rel, context, "%s is left out of the build context" % src)
        for bad in ("var", "build", "build-san", "bin", "tests/integration/node_modules", ".git"):
            for p in context:
                self.assertFalse(p == bad or p.startswith(bad + "/"), "%s enters the build context" % p)
        # Sources do, and a .d directory of scripts is not taken for a dependency file.
        self.assertIn("libshared/cfg.c", context)
        self.assertIn("scripts/bench.d", context)

    def test_programs_are_what_make_builds(self):
        with open(os.path.join(ROOT, "Makefile")) as f:
            mk = f.read()
        progs = re.search(r"^PROGRAMS\s*:=\s*((?:.*\\\n)*.*)$", mk, re.M).group(1).replace("\\", " ").split()
        for name in IMAGES:
            with self.subTest(image=name):
                build, run = stages(dockerfile(name))
                made = []
                for r in args(build, "RUN"):
                    if re.search(r"\bmake\b", r):
                        made += [w[4:] for w in r.split() if w.startswith("bin/")]
                self.assertTrue(made)
                for p in made:
                    self.assertIn(p, progs)
                    self.assertTrue(os.access(os.path.join(BINDIR, p), os.X_OK), "make did not build bin/%s" % p)
                copied = []
                for src_stage, srcs, dest in copies(run):
                    if src_stage == "build":
                        self.assertEqual(dest, "/app/bin/")
                        copied += [os.path.basename(s) for s in srcs]
                self.assertEqual(sorted(copied), sorted(made))
                entry = exec_form(args(run, "ENTRYPOINT")[0])
                self.assertEqual(len(entry), 1)
                self.assertTrue(entry[0].startswith("/app/bin/"))
                self.assertIn(entry[0][len("/app/bin/"):], copied)
                self.assertEqual(os.path.basename(entry[0]), name)

    def test_migrations_where_a_program_applies_them(self):
        # A service that migrates at start finds database/migrations beside
        # its binary's directory (migrate_default_dir); one that does not
        # needs none.
        for name in IMAGES:
            with self.subTest(image=name):
                srcdir = os.path.join(ROOT, "database" if name == "migrate" else name)
                wants = False
                for src in glob.glob(os.path.join(srcdir, "*.c")):
                    with open(src) as f:
                        wants = wants or "migrate_default_dir" in f.read()
                has = any(srcs == ["database/migrations"] and dest == "/app/database/migrations"
                          for _s, srcs, dest in copies(final(name)))
                self.assertEqual(has, wants)

    def test_ports_env_and_health_match_the_defaults(self):
        ports = readme_ports()
        self.assertEqual(sorted(ports), sorted(SERVICES))
        for name in SERVICES:
            with self.subTest(service=name):
                port, route = ports[name]
                self.assertEqual(source_default(name), port)
                self.assertEqual(stack_health_route(name), route)
                st = final(name)
                self.assertEqual(args(st, "EXPOSE"), [str(port)])
                env = env_of(st)
                if PORT_VAR[name] == "RUNTIME_BIND_ADDR":
                    self.assertEqual(env["RUNTIME_BIND_ADDR"], "0.0.0.0:%d" % port)
                else:
                    self.assertEqual(env[PORT_VAR[name]], str(port))
                    self.assertEqual(env[HOST_VAR[name]], "0.0.0.0")
                hc = args(st, "HEALTHCHECK")
                self.assertEqual(len(hc), 1)
                cmd = exec_form(hc[0].split(" CMD ", 1)[1].strip())
                self.assertEqual(cmd, ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:%d%s" % (port, route)])
                self.assertIn("curl", apt_installs(st))
        self.assertEqual(args(final("migrate"), "EXPOSE"), [])
        self.assertEqual(args(final("migrate"), "HEALTHCHECK"), [])

    def test_runtime_stage_has_every_library_and_no_other(self):
        base = base_packages()
        for name in IMAGES:
            with self.subTest(image=name):
                st = final(name)
                installs = apt_installs(st)
                have = closure(installs) | base
                programs = [os.path.basename(s) for src_stage, srcs, _ in copies(st) if src_stage == "build"
                            for s in srcs]
                needs = set()
                for prog in programs:
                    libs = libraries(os.path.join(BINDIR, prog))
                    self.assertTrue(libs, prog)
                    needs |= set(owner_packages(libs.values()).values())
                self.assertEqual(sorted(needs - have), [], "%s needs these packages, which its image lacks" % name)
                # Only what the programs link (and the plugins those load).
                linked = needs | set().union(*[PLUGINS.get(p, set()) for p in needs])
                extra = [p for p in installs if p not in ("curl", "ca-certificates") and p not in linked]
                self.assertEqual(extra, [], "%s installs packages none of its programs link" % name)
        self.assertFalse([p for p in apt_installs(final("api-gateway")) if p.startswith("libwebsockets")])
        self.assertNotIn("libwebsockets17", closure(apt_installs(final("api-gateway"))))

    def test_base_image_is_what_docker_test_makes(self):
        # make docker-test imports its own debootstrap as this tag.
        with open(os.path.join(ROOT, "scripts", "docker-test.sh")) as f:
            self.assertIn("docker.io/library/debian:bookworm-slim", f.read())


if __name__ == "__main__":
    unittest.main()
