#!/usr/bin/env python3
"""Load scenarios for scorefront, each one command (see loadtest/README.md).

    python3 loadtest/scenarios.py overhead [--reps 5]   direct vs scorefront vs the peers
    python3 loadtest/scenarios.py tls [--reps 5]        the same over TLS 1.3, and handshakes
    python3 loadtest/scenarios.py split                 10k requests over a 3-version endpoint
    python3 loadtest/scenarios.py memory [--soak-seconds 600]
                                                        RSS idle, with 10k idle connections,
                                                        1 s and 15 s after they closed, and
                                                        over a long steady run
    python3 loadtest/scenarios.py syscalls              syscalls per request (strace -c)
    python3 loadtest/scenarios.py instructions          instructions per request (callgrind)
    python3 loadtest/scenarios.py spike                 an open-loop step to 10x what one
                                                        replica serves, against autoscaled
                                                        local replicas; chart over time
    python3 loadtest/scenarios.py soak [--soak-seconds 600]
                                                        a steady rate with reloads, a killed
                                                        replica, SIGHUP, key rotation and
                                                        replica command changes along the way

overhead, tls, memory, syscalls and instructions compare scorefront with its peers, the
reverse proxies chosen by --peers (nginx, and HAProxy when it is installed).
Every run builds the release binaries, starts its own servers on loopback ports, stops
them at the end, and writes `results.json` (and `report.md`) into `--out` (default
target/scenarios/NAME). On two or more cores the load generator runs on core 0 and
everything it loads (model and proxies) on core 1, each proxy with one worker.
Only the Python standard library is used.
"""

import argparse
import atexit
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
KEY = "scenario-primary-key-0123456789"
CHILDREN = []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cores():
    """(core for the load generator, core for everything under load), or None."""
    n = len(os.sched_getaffinity(0))
    return ("0", "1") if n >= 2 else None


def pinned(core, argv):
    return (["taskset", "-c", core] + argv) if core and shutil.which("taskset") else argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}; see its log in the run folder")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on port {port} within {timeout} s")


def start(argv, log_path, env=None, core=None):
    out = open(log_path, "wb")
    proc = subprocess.Popen(
        pinned(core, argv), stdout=out, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )
    CHILDREN.append(proc)
    return proc


@atexit.register
def stop_all():
    for p in CHILDREN:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in CHILDREN:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def build():
    log("building release binaries (cargo build --release) ...")
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "scorefront", "-p", "loadtest"],
        cwd=ROOT, check=True,
    )


def installed(name):
    """The path of a program on PATH or in /usr/sbin, or None."""
    found = shutil.which(name) or f"/usr/sbin/{name}"
    return found if Path(found).exists() else None


def peer_binary(name):
    """A peer proxy's binary, installed from its Debian package when missing (as root)."""
    found = installed(name)
    if found:
        return found
    package = PEERS[name].package
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {package} ...")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True)
        return installed(name) or sys.exit(f"{package} installed no {name} binary")
    sys.exit(f"{name} is needed for this scenario: apt-get install {package}")


# ---------------------------------------------------------------------------------------
# Process accounting from /proc

def family(pid):
    """pid and its descendants (nginx: master and workers)."""
    kids = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_ns(pid):
    """CPU time of a process family so far, in ns, summed over every thread."""
    total = 0
    for p in family(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def rss_kib(pid):
    total = 0
    for p in family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


# ---------------------------------------------------------------------------------------
# The servers

class Model:
    """The sample model, one thread, answering at once."""

    def __init__(self, run, core, args=()):
        self.port = free_port()
        self.proc = start(
            [str(RELEASE / "sample-model"), "--listen", f"127.0.0.1:{self.port}", *args],
            run / f"model-{self.port}.log", core=core,
        )
        wait_port(self.port, "sample-model", self.proc)
        self.url = f"http://127.0.0.1:{self.port}/score"


def endpoint_doc(name, versions):
    lines = [
        "apiVersion: scorefront.io/v1", "kind: ScoringEndpoint", f"metadata: {{name: {name}}}",
        "spec:", f"  keys: {{primaryKey: {KEY}}}", "  versions:",
    ]
    for vname, pct, addr in versions:
        lines.append(
            f"    - {{name: {vname}, trafficPercentile: {pct}, "
            f"maxConcurrentRequestsPerContainer: 1024, maxPendingRequests: 4096, "
            f"replicas: ['{addr}']}}"
        )
    return "\n".join(lines) + "\n"


SCORE_PATH = "/api/v1/endpoint/bench/score"


def ready(proxy, name, tls, wrap):
    """Waits for a proxy under test (its `port`, `proc`, and `tls_port` with `tls`) to
    listen, and names its scoring URLs. Under `wrap` starting takes longer."""
    wait_port(proxy.port, name, proxy.proc, timeout=60 if wrap else 20)
    proxy.url = f"http://127.0.0.1:{proxy.port}{SCORE_PATH}"
    if tls:
        proxy.tls_url = f"https://localhost:{proxy.tls_port}{SCORE_PATH}"


class Scorefront:
    """scorefront with key auth, the given versions, metrics and the access log at its
    default level (written to a file), one worker thread."""

    def __init__(self, run, core, versions, tls=None, wrap=()):
        self.port, self.admin = free_port(), free_port()
        listen = f"  http: 127.0.0.1:{self.port}\n"
        extra = ""
        if tls:
            self.tls_port = free_port()
            listen += f"  https: 127.0.0.1:{self.tls_port}\n"
            extra = f"tls: {{certFile: {tls[0]}, keyFile: {tls[1]}}}\n"
        (run / "scorefront.yaml").write_text(
            f"listen:\n{listen}  admin: 127.0.0.1:{self.admin}\n"
            f"endpoints: {{file: endpoints.yaml}}\n{extra}"
        )
        (run / "endpoints.yaml").write_text(endpoint_doc("bench", versions))
        self.proc = start_scorefront(run, core, wrap)
        ready(self, "scorefront", tls, wrap)


class Nginx:
    """nginx as a reverse proxy: one worker, keep-alive to the model, access log on.
    With `wrap` (a command to run it under), the worker is the master process itself."""

    package = "nginx-light"

    def __init__(self, run, core, model_port, tls=None, wrap=()):
        self.port = free_port()
        nginx = run / "nginx"
        nginx.mkdir(exist_ok=True)
        ssl = ""
        if tls:
            self.tls_port = free_port()
            ssl = (
                f"listen 127.0.0.1:{self.tls_port} ssl; ssl_certificate {tls[0]}; "
                f"ssl_certificate_key {tls[1]}; ssl_protocols TLSv1.3; "
                f"ssl_ecdh_curve X25519; ssl_session_cache off; ssl_session_tickets off;"
            )
        temp = " ".join(
            f"{d}_temp_path {nginx}/{d};"
            for d in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        )
        single = "master_process off;" if wrap else ""
        (nginx / "nginx.conf").write_text(f"""
{single}
worker_processes 1;
worker_rlimit_nofile 19000;
daemon off;
pid {nginx}/nginx.pid;
error_log {nginx}/error.log warn;
events {{ worker_connections 18000; }}
http {{
    access_log {nginx}/access.log;
    {temp}
    upstream model {{ server 127.0.0.1:{model_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{self.port};
        {ssl}
        keepalive_requests 1000000;
        location /api/v1/endpoint/bench/ {{
            proxy_pass http://model/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        self.proc = start(
            [*wrap, peer_binary("nginx"), "-p", str(nginx), "-e", str(nginx / "error.log"),
             "-c", str(nginx / "nginx.conf")],
            run / "nginx.log", core=core,
        )
        ready(self, "nginx", tls, wrap)


class Haproxy:
    """HAProxy set up like the nginx peer: one process with one thread, keep-alive to the
    model (idle server connections shared by all clients), an access log line per request
    (to its stdout, a file), the same path prefix routed and stripped."""

    package = "haproxy"

    def __init__(self, run, core, model_port, tls=None, wrap=()):
        self.port = free_port()
        home = run / "haproxy"
        home.mkdir(exist_ok=True)
        ssl = ""
        if tls:
            # HAProxy takes the certificate and its key from one PEM file.
            self.tls_port = free_port()
            pem = home / "server.pem"
            pem.write_bytes(Path(tls[0]).read_bytes() + Path(tls[1]).read_bytes())
            ssl = (f"    bind 127.0.0.1:{self.tls_port} ssl crt {pem} ssl-min-ver TLSv1.3 "
                   f"curves X25519 no-tls-tickets\n")
        # maxconn matches nginx's worker_connections; the timeouts its defaults
        # (keepalive_timeout 75 s, proxy_read_timeout 60 s). HAProxy wants two descriptors
        # per connection and by default refuses to start when it cannot raise its limit
        # that far; these runs need one per client connection (no strict-limits).
        (home / "haproxy.cfg").write_text(f"""
global
    nbthread 1
    maxconn 18000
    no strict-limits
    tune.ssl.cachesize 0
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    maxconn 18000
    timeout connect 5s
    timeout client 75s
    timeout http-keep-alive 75s
    timeout server 60s
frontend bench
    bind 127.0.0.1:{self.port}
{ssl}    use_backend model if {{ path_beg /api/v1/endpoint/bench/ }}
backend model
    option http-keep-alive
    http-reuse always
    http-request replace-path /api/v1/endpoint/bench/(.*) /\\1
    server model 127.0.0.1:{model_port}
""")
        self.proc = start(
            [*wrap, peer_binary("haproxy"), "-db", "-f", str(home / "haproxy.cfg")],
            run / "haproxy.log", core=core,
        )
        ready(self, "haproxy", tls, wrap)


PEERS = {"nginx": Nginx, "haproxy": Haproxy}


def start_peers(args, run, core, model_port, tls=None):
    """The chosen peer proxies (--peers), in front of the model on `model_port`."""
    return {name: PEERS[name](run, core, model_port, tls=tls) for name in args.peers}


# ---------------------------------------------------------------------------------------
# Load

def load(run, name, url, args, core, headers=True, ca=None):
    out = run / f"{name}.json"
    argv = [str(RELEASE / "loadtest"), "--url", url, "--quiet", "--json", str(out),
            "--body", '{"data": [1, 2, 3]}', *args]
    if headers:
        argv += ["-H", f"Authorization: Bearer {KEY}"]
    if ca:
        argv += ["--ca-file", str(ca)]
    res = subprocess.run(pinned(core, argv), capture_output=True, text=True)
    if res.returncode != 0 or not out.exists():
        sys.exit(f"loadtest failed for {name}:\n{res.stdout}\n{res.stderr}")
    return json.loads(out.read_text())


def cpu_times():
    """Whole-machine jiffies from /proc/stat: user, nice, system, idle, iowait, irq,
    softirq, steal."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def measure(run, name, target_pid, url, args, core, ca=None):
    before, machine_before = cpu_ns(target_pid), cpu_times()
    r = load(run, name, url, args, core, ca=ca)
    cpu = cpu_ns(target_pid) - before
    spent = [b - a for a, b in zip(machine_before, cpu_times())]
    # Time the hypervisor gave to someone else: runs under heavy steal are noisy.
    steal = 100 * spent[7] / max(sum(spent), 1)
    n = max(r["responses"], 1)
    bad = r["errors"] + sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    if bad:
        log(f"  warning: {name}: {bad} failed requests; statuses {r['statuses']}")
    return {
        "rps": r["throughput_rps"],
        "p50_us": r["latency_us"]["p50"],
        "p99_us": r["latency_us"]["p99"],
        "cpu_us_per_request": cpu / 1000 / n,
        "responses": r["responses"],
        "failed": bad,
        "steal_pct": steal,
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def interleaved(run, reps, points, targets, core, ca=None):
    """For every repetition and load point, each target in turn (the order rotating per
    repetition). Returns rows[point][target] = list of measurements."""
    rows = {p: {t: [] for t in targets} for p, _ in points}
    names = list(targets)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for point, args in points:
            for t in order:
                pid, url = targets[t]
                m = measure(run, f"{point}-{t}-{rep}".replace(" ", "_"), pid, url, args, core, ca)
                rows[point][t].append(m)
                log(f"rep {rep + 1}/{reps} {point:>10} {t:>10}: {m['rps']:9.0f} req/s  "
                    f"p50 {m['p50_us']:6d} us  p99 {m['p99_us']:6d} us  "
                    f"cpu {m['cpu_us_per_request']:6.1f} us/req  steal {m['steal_pct']:3.0f}%")
    return rows


def ratio_table(rows, base, other, direct=None):
    """Median over repetitions of per-repetition ratios other/base."""
    out = {}
    for point, by_target in rows.items():
        b, o = by_target[base], by_target[other]
        r = lambda key: median([x[key] / y[key] for x, y in zip(o, b) if y[key]])
        entry = {
            "throughput": r("rps"),
            "p50": r("p50_us"),
            "p99": r("p99_us"),
            "cpu_per_request": r("cpu_us_per_request"),
        }
        for t, ms in by_target.items():
            entry[f"{t}_median"] = {k: median([m[k] for m in ms])
                                    for k in ("rps", "p50_us", "p99_us", "cpu_us_per_request",
                                              "steal_pct")}
        if direct:
            d = by_target[direct]
            for t in (base, other):
                entry[f"{t}_added_p50_us"] = median(
                    [x["p50_us"] - y["p50_us"] for x, y in zip(by_target[t], d)])
        out[point] = entry
    return out


def markdown(table, base, other, direct=None):
    lines = [
        f"| load | {other}/{base} throughput | p50 | p99 | CPU/request | "
        f"{other} CPU us/req | {base} CPU us/req | {other} req/s | {base} req/s |"
        + (f" added p50 {other} | added p50 {base} |" if direct else "") + " steal |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if direct else "") + "---|",
    ]
    for point, e in table.items():
        o, b = e[f"{other}_median"], e[f"{base}_median"]
        row = (f"| {point} | {e['throughput']:.2f}x | {e['p50']:.2f}x | {e['p99']:.2f}x | "
               f"{e['cpu_per_request']:.2f}x | {o['cpu_us_per_request']:.1f} | "
               f"{b['cpu_us_per_request']:.1f} | {o['rps']:.0f} | {b['rps']:.0f} |")
        if direct:
            row += f" {e[f'{other}_added_p50_us']:.0f} us | {e[f'{base}_added_p50_us']:.0f} us |"
        row += f" {max(o['steal_pct'], b['steal_pct']):.0f} % |"
        lines.append(row)
    return "\n".join(lines)


def against(tables, direct=None):
    """One table per peer: scorefront's ratios to it (tables[peer] from ratio_table)."""
    return "\n\n".join(f"## scorefront against {peer}\n\n"
                        + markdown(table, peer, "scorefront", direct=direct)
                        for peer, table in tables.items())


def machine():
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} vCPU {model}, Linux {os.uname().release}"


def finish(run, name, results, report):
    results["machine"] = machine()
    results["command"] = " ".join(["python3", "loadtest/scenarios.py", *sys.argv[1:]])
    (run / "results.json").write_text(json.dumps(results, indent=2))
    text = f"# {name}\n\n{results['machine']}\n\n`{results['command']}`\n\n{report}\n"
    (run / "report.md").write_text(text)
    print(text)
    log(f"results in {run}")


# ---------------------------------------------------------------------------------------
# Scenarios

def load_points(quick):
    n = 5000 if quick else 30000
    return [
        ("1 conn", ["-c", "1", "-n", str(n // 3), "--warmup-requests", "500"]),
        ("16 conns", ["-c", "16", "-n", str(n), "--warmup-requests", "2000"]),
        ("64 conns", ["-c", "64", "-n", str(n), "--warmup-requests", "2000"]),
        ("256 conns", ["-c", "256", "-n", str(n), "--warmup-requests", "2000"]),
        ("5k rps", ["-c", "64", "--rate", "5000", "-d", "2" if quick else "6",
                    "--warmup-requests", "500"]),
    ]


def overhead(args, run):
    gen, served = cores() or (None, None)
    model = Model(run, served)
    sf = Scorefront(run, served, [("blue", 90, f"127.0.0.1:{model.port}"),
                                  ("green", 10, f"127.0.0.1:{model.port}")])
    peers = start_peers(args, run, served, model.port)
    targets = {
        "direct": (model.proc.pid, model.url),
        "scorefront": (sf.proc.pid, sf.url),
        **{name: (p.proc.pid, p.url) for name, p in peers.items()},
    }
    rows = interleaved(run, args.reps, load_points(args.quick), targets, gen)
    tables = {name: ratio_table(rows, name, "scorefront", direct="direct") for name in peers}
    finish(run, "overhead", {"reps": args.reps, "rows": rows,
                             **{f"vs_{name}": t for name, t in tables.items()}},
           against(tables, direct="direct")
           + "\n\nRatios are medians of per-repetition ratios; CPU is the proxy's own "
             "(all its threads), from /proc; added p50 is over the direct run of the "
             "same repetition; steal is the median share of machine time the hypervisor "
             "took during the runs (high steal makes wall-clock figures noisy).")


def test_pki(run):
    """A CA and an ECDSA P-256 leaf for localhost, by the openssl command."""
    pki = run / "pki"
    pki.mkdir(exist_ok=True)
    ossl = lambda *a: subprocess.run(["openssl", *a], cwd=pki, check=True, capture_output=True)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=scenario CA")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (pki / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return pki / "server.crt", pki / "server.key", pki / "ca.crt"


def tls(args, run):
    gen, served = cores() or (None, None)
    cert, key, ca = test_pki(run)
    model = Model(run, served)
    sf = Scorefront(run, served, [("blue", 90, f"127.0.0.1:{model.port}"),
                                  ("green", 10, f"127.0.0.1:{model.port}")], tls=(cert, key))
    peers = start_peers(args, run, served, model.port, tls=(cert, key))
    targets = {"scorefront": (sf.proc.pid, sf.tls_url),
               **{name: (p.proc.pid, p.tls_url) for name, p in peers.items()}}
    n = 3000 if args.quick else 20000
    h = 500 if args.quick else 3000
    points = [
        ("keep-alive 16 conns", ["-c", "16", "-n", str(n), "--warmup-requests", "1000"]),
        ("new conn per request", ["-c", "16", "-n", str(h), "--new-connection-per-request"]),
    ]
    rows = interleaved(run, args.reps, points, targets, gen, ca=ca)
    tables = {name: ratio_table(rows, name, "scorefront") for name in peers}
    handshake = {
        t: median([nc["cpu_us_per_request"] - ka["cpu_us_per_request"]
                   for ka, nc in zip(rows["keep-alive 16 conns"][t],
                                     rows["new conn per request"][t])])
        for t in targets
    }
    finish(run, "tls", {"reps": args.reps, "rows": rows,
                        **{f"vs_{name}": t for name, t in tables.items()},
                        "handshake_cpu_us": handshake},
           against(tables)
           + "\n\nServer CPU per full TLS 1.3 handshake (ECDSA P-256, X25519; new-connection "
             "CPU per request minus keep-alive CPU per request): "
           + ", ".join(f"{t} {v:.0f} us" for t, v in handshake.items()))


def split(args, run):
    gen, served = cores() or (None, None)
    model = Model(run, served)
    configured = {"blue": 60, "green": 30, "red": 10}
    sf = Scorefront(run, served, [(v, p, f"127.0.0.1:{model.port}")
                                  for v, p in configured.items()])
    n = 10000
    r = load(run, "split", sf.url, ["-c", "16", "-n", str(n)], gen)
    seen = r["versions"]
    chi2 = sum((seen.get(v, 0) - n * p / 100) ** 2 / (n * p / 100) for v, p in configured.items())
    lines = ["| version | configured | observed |", "|---|---|---|"]
    for v, p in configured.items():
        lines.append(f"| {v} | {p} % | {100 * seen.get(v, 0) / n:.2f} % |")
    lines.append(f"\nchi-square {chi2:.2f} with 2 degrees of freedom "
                 f"({'consistent with' if chi2 < 9.21 else 'NOT consistent with'} the "
                 f"configured split at the 1 % level)")
    finish(run, "split", {"configured": configured, "observed": seen, "chi2": chi2,
                          "statuses": r["statuses"]}, "\n".join(lines))


def hold_idle_connections(port, count, path):
    """Opens `count` connections, sends one request on each, reads its answer, and keeps
    them open (idle keep-alive). Returns the sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    req = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n"
           f"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").encode()
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        socks.append(s)
        if len(socks) % 500 == 0:
            drain_answers(socks[-500:])
    drain_answers(socks[len(socks) - len(socks) % 500:])
    return socks


def drain_answers(socks):
    for s in socks:
        s.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("a connection closed before answering")
            data += chunk


# When the memory scenario reads RSS again after the idle connections have closed.
AFTER_CLOSE_SECONDS = (1, 15)


def memory(args, run):
    gen, served = cores() or (None, None)
    model = Model(run, served)
    sf = Scorefront(run, served, [("blue", 90, f"127.0.0.1:{model.port}"),
                                  ("green", 10, f"127.0.0.1:{model.port}")])
    proxies = {"scorefront": sf, **start_peers(args, run, served, model.port)}
    results = {}
    idle = args.idle_connections
    warm = {}
    for name, proxy in proxies.items():
        proc, port = proxy.proc, proxy.port
        load(run, f"{name}-warm", f"http://127.0.0.1:{port}{SCORE_PATH}",
             ["-c", "16", "-n", "20000"], gen)
        time.sleep(1)
        warm[name] = rss_kib(proc.pid)
    # First a steady open-loop run with RSS sampled along the way (before the idle
    # connections below, whose freed memory the allocator keeps and would hide growth).
    samples = []
    secs = args.soak_seconds
    if secs > 0:
        soak = subprocess.Popen(pinned(gen, [
            str(RELEASE / "loadtest"), "--url", sf.url, "--quiet", "--rate", "2000",
            "-c", "32", "-d", str(secs), "-H", f"Authorization: Bearer {KEY}",
            "--body", "{}", "--json", str(run / "soak.json")]))
        start_t = time.monotonic()
        while soak.poll() is None:
            samples.append((round(time.monotonic() - start_t), rss_kib(sf.proc.pid)))
            time.sleep(min(10, max(1, secs / 60)))
        results["soak"] = {"seconds": secs, "rate": 2000, "rss_kib": samples}
    for name, proxy in proxies.items():
        proc, port = proxy.proc, proxy.port
        before = rss_kib(proc.pid)
        socks = hold_idle_connections(port, idle, SCORE_PATH)
        time.sleep(1)
        held = rss_kib(proc.pid)
        for s in socks:
            s.close()
        # What the process gives back once the connections are gone, and how soon.
        closed_at, after = time.monotonic(), {}
        for t in AFTER_CLOSE_SECONDS:
            time.sleep(max(0, closed_at + t - time.monotonic()))
            after[str(t)] = rss_kib(proc.pid)
        per_conn = (held - before) / idle
        results[name] = {"rss_kib_after_warmup": warm[name], f"rss_kib_with_{idle}_idle": held,
                         "kib_per_idle_connection": per_conn,
                         "rss_kib_after_close": after}
        log(f"{name}: RSS {warm[name] / 1024:.1f} MiB after warm-up, "
            f"{held / 1024:.1f} MiB with {idle} idle keep-alive connections "
            f"({per_conn:.1f} KiB each), "
            + ", ".join(f"{v / 1024:.1f} MiB {t} s after they closed" for t, v in after.items()))
    lines = ["| | RSS after warm-up | RSS with %d idle connections | per idle connection | "
             % idle + " | ".join(f"RSS {t} s after they closed" for t in AFTER_CLOSE_SECONDS)
             + " |", "|---|---|---|---|" + "---|" * len(AFTER_CLOSE_SECONDS)]
    for name in proxies:
        r = results[name]
        lines.append(f"| {name} | {r['rss_kib_after_warmup'] / 1024:.1f} MiB | "
                     f"{r[f'rss_kib_with_{idle}_idle'] / 1024:.1f} MiB | "
                     f"{r['kib_per_idle_connection']:.1f} KiB | "
                     + " | ".join(f"{v / 1024:.1f} MiB" for v in r["rss_kib_after_close"].values())
                     + " |")
    if samples:
        rss = [s[1] for s in samples]
        lines.append(f"\nscorefront over {secs} s at 2000 req/s: RSS first "
                     f"{rss[0] / 1024:.1f} MiB, last {rss[-1] / 1024:.1f} MiB, "
                     f"max {max(rss) / 1024:.1f} MiB ({len(rss)} samples)")
    finish(run, "memory", results, "\n".join(lines))


def syscalls(args, run):
    if not shutil.which("strace"):
        sys.exit("strace is needed for this scenario: apt-get install strace")
    gen, served = cores() or (None, None)
    model = Model(run, served)
    sf = Scorefront(run, served, [("blue", 90, f"127.0.0.1:{model.port}"),
                                  ("green", 10, f"127.0.0.1:{model.port}")])
    proxies = {"scorefront": sf, **start_peers(args, run, served, model.port)}
    n = 20000
    results = {}
    for name, proxy in proxies.items():
        proc, url = proxy.proc, proxy.url
        load(run, f"{name}-warm", url, ["-c", "16", "-n", "2000"], gen)
        out = run / f"{name}.strace"
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(out)]
            + sum((["-p", str(p)] for p in family(proc.pid)), []),
            stderr=subprocess.DEVNULL)
        time.sleep(1)
        load(run, f"{name}-traced", url, ["-c", "16", "-n", str(n)], gen)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
        calls, by_name = 0, {}
        for line in out.read_text().splitlines():
            cols = line.split()
            if len(cols) >= 5 and cols[-1] == "total":
                calls = int(cols[3])
            elif len(cols) >= 5 and cols[0][0].isdigit() and cols[-1] != "total":
                by_name[cols[-1]] = int(cols[3])
        results[name] = {"requests": n, "calls": calls, "per_request": calls / n,
                         "top": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:8])}
        log(f"{name}: {calls / n:.2f} syscalls per request")
    lines = ["| | syscalls per request | most frequent |", "|---|---|---|"]
    for name, r in results.items():
        top = ", ".join(f"{k} {v / n:.2f}" for k, v in list(r["top"].items())[:5])
        lines.append(f"| {name} | {r['per_request']:.2f} | {top} |")
    finish(run, "syscalls", results, "\n".join(lines))


def instructions(args, run):
    """Instructions per proxied request, counted by callgrind: deterministic, so it
    compares builds and proxies even on a noisy machine (it leaves out the kernel)."""
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed for this scenario: apt-get install valgrind")
    gen, served = cores() or (None, None)
    model = Model(run, served)
    versions = [("blue", 90, f"127.0.0.1:{model.port}"), ("green", 10, f"127.0.0.1:{model.port}")]
    n = 20000
    results = {}
    for name in ("scorefront", *args.peers):
        out = run / f"{name}.callgrind"
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        proxy = (Scorefront(run, served, versions, wrap=wrap) if name == "scorefront"
                 else PEERS[name](run, served, model.port, wrap=wrap))
        load(run, f"{name}-warm", proxy.url, ["-c", "16", "-n", "2000"], gen)
        subprocess.run(["callgrind_control", "-z", str(proxy.proc.pid)], check=True,
                       capture_output=True)
        load(run, f"{name}-counted", proxy.url, ["-c", "16", "-n", str(n)], gen)
        subprocess.run(["callgrind_control", "-d", str(proxy.proc.pid)], check=True,
                       capture_output=True)
        dumps = sorted(run.glob(f"{name}.callgrind.*"), key=lambda p: p.stat().st_mtime)
        total = 0
        for line in dumps[-1].read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        os.killpg(proxy.proc.pid, signal.SIGTERM)
        proxy.proc.wait(timeout=60)
        results[name] = {"requests": n, "instructions": total, "per_request": total / n}
        log(f"{name}: {total / n:.0f} instructions per request")
    ours = results["scorefront"]["per_request"]
    finish(run, "instructions", results, "\n".join([
        "| | instructions per request (user space) |", "|---|---|",
        *(f"| {k} | {v['per_request']:.0f} |" for k, v in results.items()),
        "",
        *(f"scorefront/{p}: {ours / results[p]['per_request']:.2f}x" for p in args.peers),
    ]))


def start_scorefront(run, core, wrap=()):
    """scorefront from the run folder's scorefront.yaml, with one worker, logging to
    scorefront.log there; `wrap` is a command to run it under."""
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    return start(
        [*wrap, str(RELEASE / "scorefront"), "serve", "--config", str(run / "scorefront.yaml"),
         "--workers", "1"],
        run / "scorefront.log", env=env, core=core,
    )


def serve(run, port, core):
    """scorefront from the run folder's scorefront.yaml (listening on `port`), one worker."""
    sf = start_scorefront(run, core)
    wait_port(port, "scorefront", sf)
    return sf


def spike(args, run):
    """Half of what one replica serves, then a step to ten times that, against a version
    whose local replicas (sample-model, one request at a time) the autoscaler scales."""
    gen, served = cores() or (None, None)
    ms = args.service_ms
    one = 1000.0 / ms                      # requests/s one replica serves
    base, peak = 0.5 * one, 10 * one
    target = 70
    need = math.ceil(peak * ms / 1000 / (target / 100))
    port, admin = free_port(), free_port()
    (run / "scorefront.yaml").write_text(
        f"listen: {{http: 127.0.0.1:{port}, admin: 127.0.0.1:{admin}}}\n"
        f"endpoints: {{file: endpoints.yaml}}\n"
    )
    (run / "endpoints.yaml").write_text(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: spike}\n"
        f"spec:\n  keys: {{primaryKey: {KEY}}}\n  versions:\n"
        f"    - name: blue\n"
        f"      command: {RELEASE / 'sample-model'} --port {{port}} --latency-ms {ms} --concurrency 1\n"
        f"      maxConcurrentRequestsPerContainer: 1\n"
        f"      maxPendingRequests: {int(peak)}\n"
        f"      autoscale: {{minReplicas: 1, maxReplicas: {need + 5}, targetUtilization: {target}, "
        f"refreshSeconds: 1, scaleDownDelaySeconds: 60}}\n"
    )
    serve(run, port, served)
    url = f"http://127.0.0.1:{port}/api/v1/endpoint/spike/score"
    ready = 'scorefront_replicas{version="blue",state="ready"}'
    desired = 'scorefront_desired_replicas{version="blue"}'
    sampled = ["--sample-metrics", f"http://127.0.0.1:{admin}/metrics",
               "--sample-metric", ready, "--sample-metric", desired]
    phases = []
    for name, rate, secs in [("before", base, args.before_seconds),
                             ("spike", peak, args.spike_seconds)]:
        log(f"{name}: {rate:.0f} req/s for {secs} s")
        r = load(run, name, url, ["--rate", str(rate), "-d", str(secs), "-c", str(int(peak)),
                                  "--max-seconds", str(secs + 30), *sampled], gen)
        phases.append((name, rate, r))

    # One timeline across both phases: seconds since the step, negative before it.
    offset = -phases[0][2]["elapsed_seconds"]
    points, series = [], {ready: [], desired: []}
    for i, (name, rate, r) in enumerate(phases):
        shift = offset if i == 0 else 0.0
        for p in r["timeline"]:
            points.append(dict(p, t=p["t"] + shift, offered=rate))
        for m, samples in (r.get("metrics") or {}).get("series", {}).items():
            series[m] += [(s["t"] + shift, s["value"]) for s in samples if s["value"] is not None]
    step = phases[1][2]
    enough = next((t for t, v in series[ready] if t >= 0 and v >= need), None)
    settled = enough if enough is not None else float("inf")
    after = [p for p in points if p["t"] >= settled + 1]
    statuses = step["statuses"]
    other_5xx = sum(v for k, v in statuses.items() if k.startswith("5") and k != "503")

    def weighted(key):
        n = sum(p["responses"] for p in after)
        return weighted_median([(p[key], p["responses"]) for p in after], n)

    results = {
        "service_ms": ms, "one_replica_rps": one, "before_rps": base, "spike_rps": peak,
        "replicas_needed": need, "seconds_to_enough_replicas": enough,
        "spike_statuses": statuses, "other_5xx": other_5xx, "errors": step["errors"],
        "after_settling": {"p50_us": weighted("p50_us"), "p99_us": weighted("p99_us"),
                           "seconds": len(after)},
        "timeline": points, "series": {k: v for k, v in series.items()},
    }
    chart(run / "spike.svg", points, series[ready], series[desired])
    lines = [
        f"Sample model: {ms} ms a request, one at a time ({one:.0f} req/s a replica); "
        f"{base:.0f} req/s, then {peak:.0f} req/s (10x), which needs {need} replicas at "
        f"{target} %.",
        "",
        "| | |", "|---|---|",
        f"| time from the step to {need} ready replicas | "
        + (f"{enough:.1f} s |" if enough is not None else "not reached |"),
        f"| statuses during the spike | {' '.join(f'{k}={v}' for k, v in statuses.items())} |",
        f"| 5xx other than 503 (max wait) | {other_5xx} |",
        f"| transport errors | {step['errors']} |",
        f"| p50 / p99 after settling | {results['after_settling']['p50_us'] / 1000:.1f} / "
        f"{results['after_settling']['p99_us'] / 1000:.1f} ms |",
        "",
        "Chart: spike.svg (offered load and throughput, replicas ready and desired, p50 and "
        "p99, non-2xx answers per second).",
    ]
    finish(run, "spike", results, "\n".join(lines))


def soak(args, run):
    """A steady open-loop rate for --soak-seconds against a 2-version endpoint (local
    replicas scorefront supervises, and a fixed address), with a change every
    --event-seconds: a traffic split change, a replica process killed, a SIGHUP, a key
    rotation and a replica command change (all its replicas restarted), in turn. Reports
    scorefront's RSS over time and every non-2xx answer or transport error, each either
    within a few seconds of a change that may cause it (a killed replica) or unexpected."""
    gen, served = cores() or (None, None)
    green = Model(run, served)
    port, admin = free_port(), free_port()
    (run / "scorefront.yaml").write_text(
        f"listen: {{http: 127.0.0.1:{port}, admin: 127.0.0.1:{admin}}}\n"
        f"endpoints: {{file: endpoints.yaml}}\nreloadIntervalMs: 200\n"
    )
    model = RELEASE / "sample-model"

    def endpoints(green_pct, secondary, generation):
        (run / "endpoints.yaml.new").write_text(
            "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: soak}\n"
            f"spec:\n  keys: {{primaryKey: {KEY}, secondaryKey: {secondary}}}\n  versions:\n"
            f"    - name: blue\n"
            f"      command: {model} --port {{port}} --latency-ms 2 --response-bytes {100 + generation}\n"
            f"      replicaCount: 2\n"
            f"      maxConcurrentRequestsPerContainer: 16\n"
            f"    - name: green\n"
            f"      trafficPercentile: {green_pct}\n"
            f"      replicas: ['127.0.0.1:{green.port}']\n"
            f"      maxConcurrentRequestsPerContainer: 64\n"
        )
        os.replace(run / "endpoints.yaml.new", run / "endpoints.yaml")

    state = {"green_pct": 10, "secondary": "scenario-secondary-key-0000000001", "generation": 0}
    endpoints(**state)
    sf = serve(run, port, served)
    url = f"http://127.0.0.1:{port}/api/v1/endpoint/soak/score"
    metrics_url = f"http://127.0.0.1:{admin}/metrics"

    def scrape():
        import urllib.request
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            return r.read().decode()

    def gauge(text, name, **labels):
        """The first sample of `name` whose labels include `labels`."""
        want = {f'{k}="{v}"' for k, v in labels.items()}
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            n, _, rest = series.partition("{")
            if n == name and want <= set(rest.rstrip("}").split(",")):
                return float(value)
        return None

    def wait_ready(n, within=30):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if gauge(scrape(), "scorefront_replicas", version="blue", state="ready") == n:
                return True
            time.sleep(0.2)
        return False

    if not wait_ready(2):
        sys.exit("the blue replicas did not become ready; see scorefront.log in the run folder")

    def replica_pids():
        return [p for p in family(sf.pid) if p != sf.pid
                and "sample-model" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]

    def change(kind):
        if kind == "split":
            state["green_pct"] = 20 if state["green_pct"] == 10 else 10
            endpoints(**state)
            return f"green at {state['green_pct']} %"
        if kind == "kill":
            pids = replica_pids()
            if not pids:
                return "no replica process found"
            os.kill(pids[0], signal.SIGKILL)
            return f"SIGKILL to replica pid {pids[0]}"
        if kind == "sighup":
            os.kill(sf.pid, signal.SIGHUP)
            return "SIGHUP"
        if kind == "rotate":
            n = int(state["secondary"][-10:]) + 1
            state["secondary"] = f"scenario-secondary-key-{n:010d}"
            endpoints(**state)
            return "secondary key rotated"
        state["generation"] += 1
        endpoints(**state)
        return f"blue's command changed (generation {state['generation']})"

    secs, every = args.soak_seconds, args.event_seconds
    log(f"soak: {args.rate} req/s for {secs} s, a change every {every} s")
    loadgen = subprocess.Popen(pinned(gen, [
        str(RELEASE / "loadtest"), "--url", url, "--quiet", "--rate", str(args.rate),
        "-c", "64", "-d", str(secs), "--max-seconds", str(secs + 60),
        "-H", f"Authorization: Bearer {KEY}", "--body", '{"data": [1]}',
        "--json", str(run / "soak.json")]))
    t0 = time.monotonic()
    kinds = ["split", "kill", "sighup", "rotate", "command"]
    events, rss, next_event, next_sample, i = [], [], every, 0.0, 0
    while loadgen.poll() is None:
        now = time.monotonic() - t0
        if now >= next_sample:
            rss.append((round(now, 1), int(Path(f"/proc/{sf.pid}/status").read_text()
                                           .split("VmRSS:")[1].split()[0])))
            next_sample += 5
        if now >= next_event and now < secs - every / 2:
            kind = kinds[i % len(kinds)]
            what = change(kind)
            events.append({"t": round(now, 1), "kind": kind, "what": what})
            log(f"{now:6.1f} s: {what}")
            i += 1
            next_event += every
        time.sleep(0.1)
    if loadgen.returncode != 0:
        sys.exit(f"loadtest exited with {loadgen.returncode}")
    r = json.loads((run / "soak.json").read_text())
    time.sleep(1)
    end = scrape()
    in_flight = sum(float(l.rsplit(" ", 1)[1]) for l in end.splitlines()
                    if l.startswith("scorefront_in_flight_requests{") or
                    l.startswith("scorefront_queued_requests{"))

    # Each second with a non-2xx answer or an error, and the change it follows (if any
    # within 3 s before it). Only a killed replica may cost requests: those it held.
    # The load generator's clock starts a moment after t0; a second of slack covers it.
    def cause(t):
        for e in reversed(events):
            if e["t"] - 1 <= t <= e["t"] + 3:
                return e["kind"]
        return None

    bad = [(p["t"], p["non_2xx"] + p["errors"], cause(p["t"]))
           for p in r["timeline"] if p["non_2xx"] + p["errors"]]
    expected = sum(n for _, n, c in bad if c == "kill")
    unexpected = [(t, n, c) for t, n, c in bad if c != "kill"]
    values = [v for _, v in rss]
    q = max(1, len(values) // 5)
    warm = [v for t, v in rss if t >= 60] or values
    first, last = statistics.mean(warm[:q]), statistics.mean(values[-q:])
    growth = (last - first) / first * 100
    results = {
        "rate": args.rate, "seconds": secs, "event_seconds": every, "events": events,
        "statuses": r["statuses"], "errors": r["errors"],
        "errors_by_kind": r["errors_by_kind"], "latency_us": r["latency_us"],
        "non_2xx_or_errors_by_second": bad, "after_killed_replicas": expected,
        "unexpected": unexpected, "rss_kib": rss,
        "rss_growth_percent_first_to_last_fifth": growth,
        "slots_held_at_the_end": in_flight,
        "versions": r["versions"],
    }
    lat = r["latency_us"]
    elsewhere = ", ".join(f"{n} at {t:.0f} s, after {c or 'no change'}"
                          for t, n, c in unexpected) or "none"
    lines = [
        f"{args.rate} req/s for {secs} s (open loop, 64 connections) to endpoint `soak`: "
        f"`blue` on 2 local replicas (sample-model, 2 ms) and `green` on a fixed address; "
        f"a change every {every} s, in turn: {', '.join(kinds)} "
        f"({len(events)} changes).",
        "",
        "| | |", "|---|---|",
        f"| responses | {sum(r['statuses'].values())} ({' '.join(f'{k}={v}' for k, v in r['statuses'].items())}) |",
        f"| transport errors | {r['errors']} |",
        f"| non-2xx or errors within 3 s after a killed replica | {expected} |",
        f"| non-2xx or errors elsewhere | {sum(n for _, n, _ in unexpected)} "
        f"({elsewhere}) |",
        f"| latency p50 / p99 / max | {lat['p50'] / 1000:.2f} / {lat['p99'] / 1000:.2f} / "
        f"{lat['max'] / 1000:.1f} ms |",
        f"| scorefront RSS, first fifth after 60 s / last fifth / max | {first / 1024:.1f} / "
        f"{last / 1024:.1f} / {max(values) / 1024:.1f} MiB ({growth:+.1f} %) |",
        f"| slots held or waited for at the end | {in_flight:.0f} |",
        f"| answers by version | {' '.join(f'{k}={v}' for k, v in r['versions'].items())} |",
    ]
    finish(run, "soak", results, "\n".join(lines))


def weighted_median(pairs, n):
    """The value of (value, weight) pairs at the weighted median (an approximation for
    merging per-second percentiles)."""
    if not n:
        return 0
    seen = 0
    for value, weight in sorted(pairs):
        seen += weight
        if seen * 2 >= n:
            return value
    return pairs[-1][0]


def chart(path, points, ready, desired):
    """Four stacked panels over time, as a small standalone SVG."""
    w, h, pad = 900, 170, 50
    panels = [
        ("req/s: offered (grey), answered (blue)",
         [("#999", [(p["t"], p["offered"]) for p in points]),
          ("#1f77b4", [(p["t"], p["throughput_rps"]) for p in points])]),
        ("replicas: desired (orange), ready (green)",
         [("#ff7f0e", desired), ("#2ca02c", ready)]),
        ("latency ms: p50 (blue), p99 (red)",
         [("#1f77b4", [(p["t"], p["p50_us"] / 1000) for p in points]),
          ("#d62728", [(p["t"], p["p99_us"] / 1000) for p in points])]),
        ("non-2xx answers per second (red)",
         [("#d62728", [(p["t"], p["non_2xx"] / max(p["dt"], 1e-9)) for p in points])]),
    ]
    ts = [t for _, lines in panels for _, pts in lines for t, _ in pts] or [0, 1]
    t0, t1 = min(ts), max(ts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{len(panels) * h}" '
           f'font-family="sans-serif" font-size="12">']
    for i, (title, lines) in enumerate(panels):
        top = i * h
        vmax = max([v for _, pts in lines for _, v in pts] + [1e-9]) * 1.1
        x = lambda t: pad + (t - t0) / max(t1 - t0, 1e-9) * (w - 2 * pad)
        y = lambda v: top + h - 25 - v / vmax * (h - 50)
        out.append(f'<text x="{pad}" y="{top + 15}">{title}</text>')
        out.append(f'<line x1="{pad}" y1="{y(0)}" x2="{w - pad}" y2="{y(0)}" stroke="#ccc"/>')
        out.append(f'<text x="5" y="{y(vmax / 1.1) + 4}">{vmax / 1.1:.0f}</text>')
        if t0 <= 0 <= t1:
            out.append(f'<line x1="{x(0)}" y1="{top + 20}" x2="{x(0)}" y2="{y(0)}" '
                       f'stroke="#aaa" stroke-dasharray="4"/>')
        for colour, pts in lines:
            if pts:
                d = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
                out.append(f'<polyline fill="none" stroke="{colour}" points="{d}"/>')
        out.append(f'<text x="{w - pad}" y="{top + h - 8}" text-anchor="end">'
                   f'seconds since the step ({t0:.0f} to {t1:.0f})</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out))


def peer_list(text):
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(PEERS)}, got {text!r}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["overhead", "tls", "split", "memory", "syscalls",
                                             "instructions", "spike", "soak"])
    parser.add_argument("--reps", type=int, default=5, help="repetitions (overhead, tls)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per run")
    parser.add_argument("--idle-connections", type=int, default=10000, help="memory")
    parser.add_argument("--soak-seconds", type=int, default=600,
                        help="memory (0 skips it) and soak")
    parser.add_argument("--rate", type=int, default=1000, help="soak: requests/s")
    parser.add_argument("--event-seconds", type=int, default=20,
                        help="soak: time between changes")
    parser.add_argument("--service-ms", type=int, default=20,
                        help="spike: the sample model's time per request")
    parser.add_argument("--before-seconds", type=int, default=10, help="spike")
    parser.add_argument("--spike-seconds", type=int, default=60, help="spike")
    parser.add_argument("--peers", type=peer_list,
                        default=["nginx"] + (["haproxy"] if installed("haproxy") else []),
                        help="the proxies scorefront is compared with, comma-separated "
                             "(default: nginx, and haproxy when it is installed)")
    parser.add_argument("--out", type=Path, help="result folder")
    parser.add_argument("--no-build", action="store_true", help="use the binaries as built")
    args = parser.parse_args()
    run = (args.out or ROOT / "target" / "scenarios" / args.scenario).resolve()
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    if not args.no_build:
        build()
    # Servers hold a descriptor per connection (256 busy, 10k idle): children inherit it.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    globals()[args.scenario](args, run)


if __name__ == "__main__":
    main()
