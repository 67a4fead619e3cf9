//! Formatting one access-log line, in both layouts: a typical request (a generated id,
//! nothing to escape) and one whose client-supplied id and path need escaping.
//!
//! Run: `cargo bench --bench accesslog`.

use std::{hint::black_box, time::SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use scorefront::accesslog::{Entry, Format, format_line};

fn lines(c: &mut Criterion) {
    let typical = Entry {
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
    let escaped = Entry {
        request_id: "id-with-\"quotes\"-and-\\",
        path: "/api/v1/endpoint/fraud/sc\"o\u{1}re",
        ..typical
    };
    let now = SystemTime::now();
    let mut buf = Vec::with_capacity(512);
    for (format, name) in [(Format::Text, "text"), (Format::Json, "json")] {
        for (entry, kind) in [(&typical, "typical"), (&escaped, "escaped")] {
            c.bench_function(&format!("accesslog/{name}/{kind}"), |b| {
                b.iter(|| {
                    buf.clear();
                    format_line(&mut buf, format, black_box(entry), black_box(now));
                    black_box(&buf);
                })
            });
        }
    }
}

criterion_group!(benches, lines);
criterion_main!(benches);
