//! The real `scorefront serve` binary with its stderr on a pipe nobody reads: requests
//! keep being answered (log lines are dropped, not waited for), the drops are counted in
//! /metrics, and once the pipe is read again the log says where lines are missing.

mod support;

use std::{process::Stdio, time::Duration};

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A small bound so that a few hundred access-log lines fill the pipe and the buffer.
const MAX_PENDING: &str = "16384";

#[tokio::test]
async fn a_stalled_log_reader_does_not_stop_requests() {
    let model = Model::start("blue").await;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = (unused_addr(), unused_addr());
    std::fs::write(
        dir.path().join("scorefront.yaml"),
        router_config(&format!("listen: {{http: '{http}', admin: '{admin}'}}\n")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("endpoints.yaml"),
        one_version("fraud", &[model.addr], ""),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_scorefront"))
        .current_dir(dir.path())
        .args(["serve", "--config", "scorefront.yaml"])
        .env("RUST_LOG", "info")
        .env("SCOREFRONT_LOG_MAX_PENDING", MAX_PENDING)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Not read until the end of the test.
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("scorefront starts");

    let readyz = format!("http://{admin}/readyz");
    eventually("/readyz to answer 200", Patience::LONG, || async {
        let resp = client()
            .request(http::Request::get(&readyz).body(body("")).unwrap())
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;

    // A 64 KiB pipe and a 16 KiB buffer hold a few hundred access-log lines; send until the
    // router says it dropped some, each request answered in bounded time.
    let url = format!("http://{http}/api/v1/endpoint/fraud/score");
    let metrics_url = format!("http://{admin}/metrics");
    let client = client();
    let path = "x".repeat(200);
    let mut dropped = 0.0;
    for i in 1..=20_000 {
        let req = scoring_post(&format!("{url}?{path}"), KEY, &[], "{}");
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let resp = client.request(req).await.expect("response");
            let status = resp.status();
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .expect("body");
            status
        })
        .await;
        let status = answer.unwrap_or_else(|_| panic!("request {i} not answered in 10 s"));
        assert_eq!(status, 200, "request {i}");
        if i % 100 == 0 {
            let (_, text) = get(&metrics_url).await;
            let text = String::from_utf8(text.to_vec()).unwrap();
            dropped = metric(&text, "scorefront_log_dropped_lines_total", &[]).unwrap_or(0.0);
            if dropped > 0.0 {
                let bytes = metric(&text, "scorefront_log_dropped_bytes_total", &[]).unwrap();
                assert!(bytes >= dropped * 200.0, "{dropped} lines, {bytes} bytes");
                break;
            }
        }
    }
    assert!(dropped > 0.0, "20000 requests and no log line dropped");

    // Reading the pipe again lets the writer catch up and mark the gap.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let marker = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("log lines dropped") {
                return line;
            }
        }
        panic!("stderr ended without a gap marker");
    })
    .await
    .expect("a gap marker within 10 s");
    assert!(marker.contains(" WARN scorefront::logwriter: "), "{marker}");
    let count: f64 = marker
        .split(": ")
        .nth(1)
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {marker}"));
    assert!(
        count >= dropped,
        "{marker}: fewer than the {dropped} counted"
    );
    // After the gap, lines are kept again.
    send_ok(scoring_post(
        &url,
        KEY,
        &[("x-request-id", "after-the-gap")],
        "{}",
    ))
    .await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("after-the-gap") {
                return;
            }
        }
        panic!("stderr ended without the access line of the last request");
    })
    .await
    .expect("the access line of the last request within 10 s");
    child.kill().await.unwrap();
}
