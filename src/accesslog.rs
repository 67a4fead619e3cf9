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
///
/// `request_id` and `path` come from the client and are escaped as needed. The other
/// strings are written as they are, so they must be printable ASCII without `"` or `\`:
/// an HTTP method (a token), validated endpoint and version names, and static codes and
/// outcomes are.
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
                format_line(&mut buf, *format, entry, now);
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

/// The constant text around the fields of a line, in one layout: `start`, the timestamp,
/// then `fields[i]` before the i-th field of [`Entry`] (in its order), then `end`. Quotes
/// around values that are never escaped belong to this text.
struct Layout {
    start: &'static [u8],
    fields: [&'static [u8]; 11],
    end: &'static [u8],
    /// Whether escaped strings are written as JSON (else as `Debug`).
    json: bool,
}

/// `2024-05-01T12:00:00.123456Z  INFO scorefront::access: request_id="..." method=POST ...`
static TEXT: Layout = Layout {
    start: b"",
    fields: [
        b"  INFO scorefront::access: request_id=",
        b" method=",
        b" path=",
        b" endpoint=\"",
        b"\" version=\"",
        b"\" status=",
        b" code=\"",
        b"\" duration_us=",
        b" queue_us=",
        b" upstream_us=",
        b" outcome=\"",
    ],
    end: b"\"\n",
    json: false,
};

/// `{"timestamp":"...","level":"INFO","request_id":"...",...,"target":"scorefront::access"}`
static JSON: Layout = Layout {
    start: b"{\"timestamp\":\"",
    fields: [
        b"\",\"level\":\"INFO\",\"request_id\":",
        b",\"method\":\"",
        b"\",\"path\":",
        b",\"endpoint\":\"",
        b"\",\"version\":\"",
        b"\",\"status\":",
        b",\"code\":\"",
        b"\",\"duration_us\":",
        b",\"queue_us\":",
        b",\"upstream_us\":",
        b",\"outcome\":\"",
    ],
    end: b"\",\"target\":\"scorefront::access\"}\n",
    json: true,
};

/// Room for a line whose escaped values need no escaping: the constant text, the
/// timestamp and the longest numbers.
const FIXED_LEN: usize = 240 + 32 + 3 * 20 + 5;

/// Writes `e` in `layout`. The request id and the path come from the client and are
/// escaped; the other strings are plain by construction (see [`Entry`]) and copied.
fn line(buf: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime, layout: &Layout) {
    let [
        id,
        method,
        path,
        endpoint,
        version,
        status,
        code,
        duration,
        queue,
        upstream,
        outcome,
    ] = &layout.fields;
    let plain_fields = [e.method, e.endpoint, e.version, e.code, e.outcome];
    debug_assert!(plain_fields.iter().all(|s| plain(s)), "{e:?}");
    let variable: usize = plain_fields.iter().map(|s| s.len()).sum();
    buf.reserve(FIXED_LEN + variable + e.request_id.len() + e.path.len());
    buf.extend_from_slice(layout.start);
    timestamp(buf, now);
    buf.extend_from_slice(id);
    escaped(buf, e.request_id, layout.json);
    buf.extend_from_slice(method);
    buf.extend_from_slice(e.method.as_bytes());
    buf.extend_from_slice(path);
    escaped(buf, e.path, layout.json);
    buf.extend_from_slice(endpoint);
    buf.extend_from_slice(e.endpoint.as_bytes());
    buf.extend_from_slice(version);
    buf.extend_from_slice(e.version.as_bytes());
    buf.extend_from_slice(status);
    number(buf, e.status);
    buf.extend_from_slice(code);
    buf.extend_from_slice(e.code.as_bytes());
    buf.extend_from_slice(duration);
    number(buf, e.duration_us);
    buf.extend_from_slice(queue);
    number(buf, e.queue_us);
    buf.extend_from_slice(upstream);
    number(buf, e.upstream_us);
    buf.extend_from_slice(outcome);
    buf.extend_from_slice(e.outcome.as_bytes());
    buf.extend_from_slice(layout.end);
}

/// Appends the line of `e` in `format`, stamped `now`, to `buf`.
pub fn format_line(buf: &mut Vec<u8>, format: Format, e: &Entry<'_>, now: SystemTime) {
    match format {
        Format::Text => line(buf, e, now, &TEXT),
        Format::Json => line(buf, e, now, &JSON),
    }
}

/// `s` quoted, as serde_json (`json`) or `{:?}` writes it.
fn escaped(buf: &mut Vec<u8>, s: &str, json: bool) {
    if plain(s) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if json {
        let _ = serde_json::to_writer(&mut *buf, s);
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

/// `s` as serde_json writes it.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    escaped(buf, s, true);
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

/// Whether `s` is written as is between quotes, by both `Debug` and JSON. Eight bytes at
/// a time: request ids and paths are mostly tens of bytes.
fn plain(s: &str) -> bool {
    let mut words = s.as_bytes().chunks_exact(8);
    words.all(|w| plain_word(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
        && words.remainder().iter().all(|&b| PLAIN[usize::from(b)])
}

/// Whether all eight bytes of `w` are [`PLAIN`].
fn plain_word(w: u64) -> bool {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES * 0x80;
    // Some byte is zero; exact as to whether one is (Hacker's Delight 6-1).
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let bad = (w & HIGH)
        | below_space
        | zero(w ^ (ONES * 0x7f))
        | zero(w ^ (ONES * u64::from(b'"')))
        | zero(w ^ (ONES * u64::from(b'\\')));
    bad == 0
}

/// `n` in decimal.
fn number(buf: &mut Vec<u8>, n: impl itoa::Integer) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// "00" to "99".
static TWO_DIGITS: [[u8; 2]; 100] = {
    let mut t = [[0; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// Two digits of `n` (below 100).
fn two(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(&TWO_DIGITS[n as usize]);
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
        number(buf, year);
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

    /// What tracing-subscriber writes, in `format`, for the events `emit` sends.
    fn traced(format: Format, emit: impl FnOnce()) -> String {
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
        emit();
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    /// The line tracing-subscriber writes for `e` in `format`.
    fn reference(format: Format, e: &Entry<'_>) -> String {
        // Not installed in unit tests: this is the tracing event.
        traced(format, || write(e))
    }

    fn ours(format: Format, e: &Entry<'_>) -> String {
        let mut buf = Vec::new();
        format_line(&mut buf, format, e, SystemTime::now());
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

    /// Strings a client can put in a request id or a path, hostile ones included.
    fn hostile() -> Vec<String> {
        let mut out: Vec<String> = [
            "",
            "5e3c47a6-66c7-4c33-9a2e-4b0e1dcd3b8e",
            "/api/v1/endpoint/fraud/score",
            "\"",
            "\\",
            "a\"b\\c\"",
            "line\nbreak\r\n",
            "tab\there",
            "nul\0byte",
            "del\u{7f}",
            "caf\u{e9} \u{1F600} \u{FFFD}",
            "\u{85}\u{2028}\u{2029}\u{200b}\u{feff}",
            "{\"json\":[1,2]}",
            "12345678",
            "1234567\"",
            "\"1234567",
            "1234567\u{1f}89",
            "a-very-long-request-id-made-of-many-plain-words-0123456789-0123456789",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        // Every ASCII character and a few others, alone and at each position of a word
        // (whole words are checked at once).
        for c in (0u8..0x80)
            .map(char::from)
            .chain(['\u{80}', '\u{ff}', '\u{100}'])
        {
            out.push(c.to_string());
            for at in 0..9 {
                let mut s: String = "abcdefghijklmnop".into();
                s.insert(at, c);
                out.push(s);
            }
        }
        out
    }

    #[test]
    fn words_are_plain_exactly_when_each_byte_is() {
        for b in 0..=255u8 {
            for at in 0..16 {
                let mut bytes = *b"abcdefgh-ijklmno";
                bytes[at] = b;
                let Ok(s) = std::str::from_utf8(&bytes) else {
                    let w = u64::from_le_bytes(bytes[at / 8 * 8..][..8].try_into().unwrap());
                    assert!(!plain_word(w), "{bytes:?}");
                    continue;
                };
                assert_eq!(plain(s), PLAIN[usize::from(b)], "{s:?}");
            }
        }
    }

    #[test]
    fn hostile_values_are_escaped_as_tracing_subscriber_does() {
        let numbers = [
            (0, 0, 0, 0),
            (200, 1, 1, 1),
            (503, 9, -1, -1),
            (404, 10, 99, 100),
            (599, 123_456_789, -1_000_000, 987_654_321),
            (999, u64::MAX, i64::MIN, i64::MAX),
        ];
        let strings = hostile();
        for format in [Format::Text, Format::Json] {
            for (i, s) in strings.iter().enumerate() {
                let (status, duration_us, queue_us, upstream_us) = numbers[i % numbers.len()];
                let other = &strings[(i * 7 + 3) % strings.len()];
                let e = Entry {
                    request_id: s,
                    method: ["GET", "POST", "M-SEARCH", "PURGE"][i % 4],
                    path: other,
                    endpoint: ["", "fraud", "a-1"][i % 3],
                    version: ["", "blue", "v2"][i % 3],
                    status,
                    code: ["", "EndpointNotFound", "ScoringTimeout"][i % 3],
                    duration_us,
                    queue_us,
                    upstream_us,
                    outcome: ["", "client went away before the response body ended"][i % 2],
                };
                let want = reference(format, &e);
                let got = ours(format, &e);
                assert_eq!(
                    untimed(format, &got),
                    untimed(format, &want),
                    "{format:?} {e:?}"
                );
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
            let want = traced(format, || {
                tracing::warn!(
                    target: "scorefront::logwriter",
                    "12 log lines dropped (3456 bytes): the log output was not read fast enough"
                )
            });
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
