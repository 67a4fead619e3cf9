//! End to end: the real `sample-model` binary on a free loopback port, the real
//! `loadtest` binary against it, and the JSON it writes.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

/// A running sample model, killed when dropped.
struct Model {
    child: Child,
    port: u16,
}

impl Model {
    fn start(args: &[&str]) -> Model {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sample-model"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start sample-model");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the listening line");
        let port = line
            .trim()
            .strip_prefix("listening on 127.0.0.1:")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Model { child, port }
    }

    fn url(&self, scheme: &str, host: &str) -> String {
        format!("{scheme}://{host}:{}/score", self.port)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "loadtest-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// Runs loadtest with `--json` into `dir`; returns the process output and the JSON.
fn loadtest(dir: &Path, args: &[&str]) -> (Output, Value) {
    let json = dir.join("result.json");
    let _ = std::fs::remove_file(&json);
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .args(["--quiet", "--max-seconds", "30"])
        .output()
        .expect("run loadtest");
    let value = match std::fs::read_to_string(&json) {
        Ok(text) => serde_json::from_str(&text).expect("valid JSON"),
        Err(_) => Value::Null,
    };
    (out, value)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn count(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64().unwrap_or(0)
}

#[test]
fn closed_loop_answers_every_request_and_writes_json_and_chart() {
    let model = Model::start(&[]);
    let dir = scratch("closed");
    let chart = dir.join("chart.svg");
    let url = model.url("http", "127.0.0.1");
    let (out, v) = loadtest(
        &dir,
        &[
            "--url",
            &url,
            "-n",
            "200",
            "-c",
            "4",
            "--body",
            r#"{"data":[1]}"#,
            "-H",
            "Authorization: Bearer secret-key",
            "--chart",
            chart.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("200 responses"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(v["config"]["mode"], "closed");
    assert_eq!(v["config"]["method"], "POST");
    assert_eq!(v["config"]["headers"][0], "authorization: Bearer ***");
    assert_eq!(count(&v, &["responses"]), 200);
    assert_eq!(count(&v, &["succeeded"]), 200);
    assert_eq!(count(&v, &["errors"]), 0);
    assert_eq!(count(&v, &["statuses", "200"]), 200);
    assert_eq!(count(&v, &["versions", "-"]), 200);
    assert_eq!(count(&v, &["connections", "opened"]), 4);
    assert_eq!(count(&v, &["latency_us", "count"]), 200);
    assert!(count(&v, &["latency_us", "p50"]) > 0);
    assert!(count(&v, &["latency_us", "p99"]) >= count(&v, &["latency_us", "p50"]));
    let spectrum = v["spectrum"].as_array().unwrap();
    assert!(spectrum.len() > 10);
    assert_eq!(spectrum.last().unwrap()["percentile"], 100.0);
    assert!(v["schedule"].is_null());
    let svg = std::fs::read_to_string(&chart).unwrap();
    roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
}

#[test]
fn error_rate_and_connection_close_are_counted() {
    let model = Model::start(&["--error-rate", "0.5", "--close"]);
    let dir = scratch("close");
    let url = model.url("http", "127.0.0.1");
    let (out, v) = loadtest(&dir, &["--url", &url, "-n", "200", "-c", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Every answer closes its connection: nothing is lost, each request opens one.
    assert_eq!(count(&v, &["errors"]), 0, "{}", v["errors_by_kind"]);
    assert_eq!(count(&v, &["responses"]), 200);
    assert!(count(&v, &["connections", "opened"]) >= 200);
    let (ok, failed) = (
        count(&v, &["statuses", "200"]),
        count(&v, &["statuses", "500"]),
    );
    assert_eq!(ok + failed, 200);
    // Binomial(200, 0.5): 60..140 is more than eight standard deviations wide.
    assert!((60..=140).contains(&failed), "{failed} of 200 failed");
}

#[test]
fn open_loop_sends_the_scheduled_requests() {
    let model = Model::start(&[]);
    let dir = scratch("open");
    let url = model.url("http", "127.0.0.1");
    let (out, v) = loadtest(
        &dir,
        &["--url", &url, "--rate", "500", "-d", "1", "-c", "8"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["config"]["mode"], "open");
    assert_eq!(count(&v, &["schedule", "planned"]), 500);
    assert_eq!(count(&v, &["schedule", "sent"]), 500);
    assert_eq!(count(&v, &["responses"]), 500);
    assert_eq!(count(&v, &["statuses", "200"]), 500);
    // The last request is due at 0.998 s: the run cannot be shorter.
    let elapsed = v["elapsed_seconds"].as_f64().unwrap();
    assert!((0.99..10.0).contains(&elapsed), "{elapsed}");
    assert_eq!(count(&v, &["schedule", "lag_us", "count"]), 500);
    assert!(!v["timeline"].as_array().unwrap().is_empty());
}

#[test]
fn h2c_shares_connections_between_streams() {
    let model = Model::start(&[]);
    let dir = scratch("h2c");
    let url = model.url("http", "127.0.0.1");
    let (out, v) = loadtest(
        &dir,
        &[
            "--url",
            &url,
            "--http2",
            "-c",
            "2",
            "--streams-per-connection",
            "4",
            "-n",
            "200",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["config"]["protocol"], "h2c");
    assert_eq!(count(&v, &["config", "concurrency"]), 8);
    assert_eq!(count(&v, &["statuses", "200"]), 200);
    assert_eq!(count(&v, &["connections", "opened"]), 2);
}

/// A test CA and a certificate for localhost/127.0.0.1 signed by it, as PEM files.
fn test_pki(dir: &Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn tls_verifies_the_chain_and_the_name_and_negotiates_h2() {
    let dir = scratch("tls");
    let (ca, cert, key) = test_pki(&dir, "loadtest test CA");
    let model = Model::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let url = model.url("https", "localhost");
    let ca = ca.to_str().unwrap();

    let (out, v) = loadtest(
        &dir,
        &["--url", &url, "--ca-file", ca, "-n", "50", "-c", "2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["config"]["protocol"], "HTTP/1.1 over TLS");
    assert_eq!(count(&v, &["statuses", "200"]), 50);

    let (out, v) = loadtest(
        &dir,
        &[
            "--url",
            &url,
            "--ca-file",
            ca,
            "--http2",
            "-n",
            "50",
            "-c",
            "1",
            "--streams",
            "4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(v["config"]["protocol"], "h2 over TLS");
    assert_eq!(count(&v, &["statuses", "200"]), 50);
    assert_eq!(count(&v, &["connections", "opened"]), 1);

    // A full handshake per request.
    let (out, v) = loadtest(
        &dir,
        &[
            "--url",
            &url,
            "--ca-file",
            ca,
            "--new-connection-per-request",
            "-n",
            "20",
            "-c",
            "2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count(&v, &["statuses", "200"]), 20);
    assert_eq!(count(&v, &["connections", "opened"]), 20);

    // The same server checked against another name fails the handshake, clearly.
    let (out, v) = loadtest(
        &dir,
        &[
            "--url",
            &url,
            "--ca-file",
            ca,
            "--tls-server-name",
            "other.example",
            "-n",
            "5",
            "-c",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(count(&v, &["errors_by_kind", "tls", "count"]), 5);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no request succeeded") && stderr.contains("tls: invalid peer certificate"),
        "{stderr}"
    );

    // A CA that did not sign the certificate: every handshake fails.
    let other = scratch("tls-other");
    let (other_ca, _, _) = test_pki(&other, "another CA");
    let (out, v) = loadtest(
        &dir,
        &[
            "--url",
            &url,
            "--ca-file",
            other_ca.to_str().unwrap(),
            "-n",
            "5",
            "-c",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let example = v["errors_by_kind"]["tls"]["example"]
        .as_str()
        .unwrap_or_default();
    assert!(example.contains("UnknownIssuer"), "{}", v["errors_by_kind"]);
}

#[test]
fn bad_arguments_and_dead_targets_fail_with_a_reason() {
    let dir = scratch("bad");
    for (args, needle) in [
        (
            &["--url", "http://127.0.0.1:1/", "--rate", "0"][..],
            "--rate",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "--streams", "4"][..],
            "--http2",
        ),
        (&["--url", "ftp://127.0.0.1:1/"][..], "http://"),
        (
            &["--url", "http://127.0.0.1:1/", "--ca-file", "x.pem"][..],
            "https://",
        ),
        (
            &["--url", "http://127.0.0.1:1/", "-H", "no colon"][..],
            "Name: value",
        ),
    ] {
        let (out, _) = loadtest(&dir, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // Nothing listens on port 1: every request fails to connect.
    let (out, v) = loadtest(
        &dir,
        &["--url", "http://127.0.0.1:1/score", "-n", "10", "-c", "2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(count(&v, &["errors_by_kind", "connect", "count"]), 10);
    assert!(text(&out.stderr).contains("no request succeeded"));
}
