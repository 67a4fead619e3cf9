//! The access log: one line per request under the target `scorefront::access`.
//!
//! Formatting that line through tracing's generic field machinery cost about a quarter of
//! the router's CPU per request. So the binary installs the log writer here once logging
//! is set up, and each line is then written by hand into a reused buffer and handed to
//! that same writer (the ordered writer thread every other log line goes through, which
//! drops lines rather than wait when its output stalls, and marks each gap with
//! [`gap_line`]). The text and JSON layouts are exactly those of tracing-subscriber's `fmt`
//! (the tests below compare them). Whether the line is wanted at all is decided once, from
//! the filter in force (`RUST_LOG`, e.g. `scorefront::access=off`).
//!
//! Without an installed writer (the library run by something else, or colours on a
//! terminal), the line is a tracing event with the same fields, as before.

use std::{
    cell::{Cell, RefCell},
    io::Write,
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::logwriter::{Dropped, LogWriter};

/// The target of access-log lines, for filters.
pub const TARGET: &str = "scorefront::access";

/// One access-log line. Durations are whole microseconds, -1 for a phase not reached.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub endpoint: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub code: &'a str,
    pub duration_us: u64,
    pub queue_us: i64,
    pub upstream_us: i64,
    pub outcome: &'a str,
}

/// Line layouts, as tracing-subscriber's `fmt()` (without colours) and `fmt().json()`
/// with flattened events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

enum Sink {
    /// The filter turns the access log off.
    Off,
    On {
        writer: LogWriter,
        format: Format,
    },
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends access-log lines straight to `writer` in `format` from now on. Call once, after the
/// global subscriber is installed: whether the target is enabled is read from it here.
pub fn install(writer: LogWriter, format: Format) {
    let sink = if tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        Sink::On { writer, format }
    } else {
        Sink::Off
    };
    let _ = SINK.set(sink);
}

thread_local! {
    /// The line being written, reused.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes the access-log line of one request.
pub fn write(entry: &Entry<'_>) {
    match SINK.get() {
        Some(Sink::Off) => {}
        Some(Sink::On { writer, format }) => {
            let now = SystemTime::now();
            let _ = LINE.try_with(|line| {
                let Ok(mut buf) = line.try_borrow_mut() else {
                    return;
                };
                buf.clear();
                match format {
                    Format::Text => text(&mut buf, entry, now),
                    Format::Json => json(&mut buf, entry, now),
                }
                writer.append(&buf);
            });
        }
        None => tracing::info!(
            target: TARGET,
            request_id = entry.request_id,
            method = %entry.method,
            path = entry.path,
            endpoint = entry.endpoint,
            version = entry.version,
            status = entry.status,
            code = entry.code,
            duration_us = entry.duration_us,
            queue_us = entry.queue_us,
            upstream_us = entry.upstream_us,
            outcome = entry.outcome,
        ),
    }
}

/// The warning the log writer puts where it dropped lines, in `format`'s layout.
pub fn gap_line(format: Format, gap: Dropped) -> Vec<u8> {
    let message = format!(
        "{} log lines dropped ({} bytes): the log output was not read fast enough",
        gap.lines, gap.bytes
    );
    let now = SystemTime::now();
    let mut buf = Vec::new();
    match format {
        Format::Text => {
            timestamp(&mut buf, now);
            buf.extend_from_slice(b"  WARN scorefront::logwriter: ");
            buf.extend_from_slice(message.as_bytes());
            buf.push(b'\n');
        }
        Format::Json => {
            buf.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(&mut buf, now);
            buf.extend_from_slice(b"\",\"level\":\"WARN\",\"message\":");
            json_str(&mut buf, &message);
            buf.extend_from_slice(b",\"target\":\"scorefront::logwriter\"}\n");
        }
    }
    buf
}

/// One field's value, as both layouts need to tell them apart.
enum Value<'a> {
    Str(&'a str),
    /// Written unquoted in text (as tracing's `%` does), quoted in JSON.
    Display(&'a str),
    Uint(u64),
    Int(i64),
}

/// The fields of a line, in their order.
fn fields<'a>(e: &Entry<'a>) -> [(&'static str, Value<'a>); 11] {
    [
        ("request_id", Value::Str(e.request_id)),
        ("method", Value::Display(e.method)),
        ("path", Value::Str(e.path)),
        ("endpoint", Value::Str(e.endpoint)),
        ("version", Value::Str(e.version)),
        ("status", Value::Uint(e.status.into())),
        ("code", Value::Str(e.code)),
        ("duration_us", Value::Uint(e.duration_us)),
        ("queue_us", Value::Int(e.queue_us)),
        ("upstream_us", Value::Int(e.upstream_us)),
        ("outcome", Value::Str(e.outcome)),
    ]
}

/// `2024-05-01T12:00:00.123456Z  INFO scorefront::access: request_id="..." method=POST ...`
fn text(buf: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime) {
    timestamp(buf, now);
    buf.extend_from_slice(b"  INFO scorefront::access:");
    for (name, value) in fields(e) {
        buf.push(b' ');
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        match value {
            Value::Str(s) => debug_str(buf, s),
            Value::Display(s) => buf.extend_from_slice(s.as_bytes()),
            Value::Uint(n) => uint(buf, n),
            Value::Int(n) => int(buf, n),
        }
    }
    buf.push(b'\n');
}

/// `{"timestamp":"...","level":"INFO","request_id":"...",...,"target":"scorefront::access"}`
fn json(buf: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(buf, now);
    buf.extend_from_slice(b"\",\"level\":\"INFO\"");
    for (name, value) in fields(e) {
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":");
        match value {
            Value::Str(s) | Value::Display(s) => json_str(buf, s),
            Value::Uint(n) => uint(buf, n),
            Value::Int(n) => int(buf, n),
        }
    }
    buf.extend_from_slice(b",\"target\":\"scorefront::access\"}\n");
}

/// Bytes that `Debug` and JSON both quote as they are: printable ASCII but `"` and `\`.
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        t[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    t
};

/// Whether `s` is written as is between quotes, by both `Debug` and JSON.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| PLAIN[usize::from(b)])
}

/// `s` as `{:?}` writes it.
fn debug_str(buf: &mut Vec<u8>, s: &str) {
    if plain(s) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

/// `s` as serde_json writes it.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    if plain(s) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

fn uint(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

fn int(buf: &mut Vec<u8>, n: i64) {
    if n < 0 {
        buf.push(b'-');
    }
    uint(buf, n.unsigned_abs());
}

/// Two digits of `n` (below 100).
fn two(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]);
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber's default timer writes it:
/// `2024-05-01T12:00:00.123456Z`.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    // A clock before 1970 is not worth a second code path.
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, text) = SECOND.get();
    if cached == secs && secs != 0 {
        buf.extend_from_slice(&text);
    } else {
        let start = buf.len();
        date_time(buf, secs);
        if let Ok(text) = buf[start..].try_into() {
            SECOND.set((secs, text));
        }
    }
    buf.push(b'.');
    let micros = u64::from(since.subsec_micros());
    two(buf, micros / 10_000);
    two(buf, micros / 100 % 100);
    two(buf, micros % 100);
    buf.push(b'Z');
}

thread_local! {
    /// The last second written and its `YYYY-MM-DDTHH:MM:SS`: lines mostly share it.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((0, [0; 19])) };
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since 1970-01-01 UTC.
fn date_time(buf: &mut Vec<u8>, secs: u64) {
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil(days);
    if year > 9999 {
        buf.push(b'+');
        uint(buf, year);
    } else {
        two(buf, year / 100);
        two(buf, year % 100);
    }
    buf.push(b'-');
    two(buf, month);
    buf.push(b'-');
    two(buf, day);
    buf.push(b'T');
    two(buf, of_day / 3600);
    buf.push(b':');
    two(buf, of_day / 60 % 60);
    buf.push(b':');
    two(buf, of_day % 60);
}

/// (year, month, day) of a count of days since 1970-01-01 (proleptic Gregorian).
fn civil(days: u64) -> (u64, u64, u64) {
    // Days since 0000-03-01, so that leap days end each 400-, 100- and 4-year cycle.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// The line tracing-subscriber writes for `e` in `format`.
    fn reference(format: Format, e: &Entry<'_>) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false);
        let _guard = match format {
            Format::Text => tracing::subscriber::set_default(builder.finish()),
            Format::Json => {
                tracing::subscriber::set_default(builder.json().flatten_event(true).finish())
            }
        };
        // Not installed in unit tests: this is the tracing event.
        write(e);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    fn ours(format: Format, e: &Entry<'_>) -> String {
        let mut buf = Vec::new();
        let now = SystemTime::now();
        match format {
            Format::Text => text(&mut buf, e, now),
            Format::Json => json(&mut buf, e, now),
        }
        String::from_utf8(buf).unwrap()
    }

    /// The line without its timestamp, which differs between two writes.
    fn untimed(format: Format, line: &str) -> String {
        match format {
            Format::Text => line.split_once(' ').unwrap().1.to_owned(),
            Format::Json => {
                let (head, rest) = line.split_once("\",\"level\"").unwrap();
                assert!(head.starts_with("{\"timestamp\":\""), "{line}");
                rest.to_owned()
            }
        }
    }

    #[test]
    fn lines_match_tracing_subscriber_byte_for_byte() {
        let plain = Entry {
            request_id: "5e3c47a6-66c7-4c33-9a2e-4b0e1dcd3b8e",
            method: "POST",
            path: "/api/v1/endpoint/fraud/score",
            endpoint: "fraud",
            version: "blue",
            status: 200,
            code: "",
            duration_us: 1234,
            queue_us: 0,
            upstream_us: 1100,
            outcome: "",
        };
        let odd = Entry {
            request_id: r#"a"b\c"#,
            method: "PURGE",
            path: "/api/v1/endpoint/x/sc\"o\\re\u{7f}\u{1}é",
            endpoint: "",
            version: "",
            status: 404,
            code: "EndpointNotFound",
            duration_us: u64::MAX,
            queue_us: -1,
            upstream_us: i64::MIN,
            outcome: "client went away before the response body ended",
        };
        for format in [Format::Text, Format::Json] {
            for e in [&plain, &odd] {
                let want = reference(format, e);
                let got = ours(format, e);
                assert_eq!(untimed(format, &got), untimed(format, &want), "{format:?}");
                if format == Format::Json {
                    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
                    assert_eq!(v["path"], e.path);
                }
            }
        }
    }

    #[test]
    fn gap_lines_match_tracing_subscriber_byte_for_byte() {
        let gap = Dropped {
            lines: 12,
            bytes: 3456,
        };
        for format in [Format::Text, Format::Json] {
            let out = Captured::default();
            let builder = tracing_subscriber::fmt()
                .with_writer(out.clone())
                .with_ansi(false);
            let _guard = match format {
                Format::Text => tracing::subscriber::set_default(builder.finish()),
                Format::Json => {
                    tracing::subscriber::set_default(builder.json().flatten_event(true).finish())
                }
            };
            tracing::warn!(
                target: "scorefront::logwriter",
                "12 log lines dropped (3456 bytes): the log output was not read fast enough"
            );
            let want = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            let got = String::from_utf8(gap_line(format, gap)).unwrap();
            assert_eq!(untimed(format, &got), untimed(format, &want), "{format:?}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u64| {
            let mut buf = Vec::new();
            timestamp(
                &mut buf,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
            );
            String::from_utf8(buf).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        // The same second again (its text is reused), then the next one.
        assert_eq!(at(1_700_000_000, 1), "2023-11-14T22:13:20.000001Z");
        assert_eq!(at(1_700_000_000, 999_999), "2023-11-14T22:13:20.999999Z");
        assert_eq!(at(1_700_000_001, 5), "2023-11-14T22:13:21.000005Z");
        assert_eq!(at(0, 10), "1970-01-01T00:00:00.000010Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_709_251_199, 999_999), "2024-02-29T23:59:59.999999Z");
        assert_eq!(at(4_102_444_800, 120_000), "2100-01-01T00:00:00.120000Z");
        assert_eq!(at(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z");
        // Every day for 1600 years agrees with a calendar counted day by day.
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..1600 * 366 {
            assert_eq!(civil(days), (y, m, d), "day {days}");
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                (m, d) = (m + 1, 1);
                if m > 12 {
                    (y, m) = (y + 1, 1);
                }
            }
        }
    }
}
