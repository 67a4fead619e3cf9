//! The SVG chart written by `--chart`: hand-written SVG, no plotting library.
//!
//! The first panel plots latency against percentile on a log axis (0, 90, 99, 99.9,
//! 99.99 % equally spaced), the usual way to show a latency distribution's tail. When the
//! run has a per-second timeline, a second panel plots throughput, p50/p99 latency and
//! each sampled metric (for example the replica count) against time.

use std::fmt::Write;

use crate::{report::SpectrumPoint, stats::TimelinePoint};

const WIDTH: f64 = 960.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 40.0;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
const SPECTRUM_H: f64 = 300.0;
const ROW_H: f64 = 130.0;
const GAP: f64 = 56.0;

const BLUE: &str = "#1f77b4";
const GREEN: &str = "#2ca02c";
const RED: &str = "#d62728";
const SERIES: [&str; 4] = ["#9467bd", "#ff7f0e", "#8c564b", "#17becf"];

/// What the chart shows.
pub struct ChartInput<'a> {
    pub title: &'a str,
    pub subtitle: &'a str,
    pub spectrum: &'a [SpectrumPoint],
    pub timeline: &'a [TimelinePoint],
    /// Sampled metrics: a name and its (seconds, value) points.
    pub metrics: &'a [(String, Vec<(f64, f64)>)],
}

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A "nice" axis top (1, 2 or 5 times a power of ten, at or above `max`) and its step.
pub fn nice_axis(max: f64, ticks: usize) -> (f64, f64) {
    if !max.is_finite() || max <= 0.0 {
        return (1.0, 0.2);
    }
    let raw = max / ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// A tick label without trailing zeros.
fn num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Percentile to the log axis: 0 % -> 0, 90 % -> 1, 99 % -> 2, 99.9 % -> 3 ...
pub fn percentile_x(p: f64) -> f64 {
    let rest = (1.0 - p / 100.0).max(1e-12);
    -rest.log10()
}

/// A plot area: maps data to pixels.
struct Area {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    x_max: f64,
    y_max: f64,
}

impl Area {
    fn px(&self, x: f64) -> f64 {
        self.x + (x / self.x_max).clamp(0.0, 1.0) * self.w
    }
    fn py(&self, y: f64) -> f64 {
        self.y + self.h - (y / self.y_max).clamp(0.0, 1.0) * self.h
    }

    /// Frame, horizontal grid lines with labels, and the y-axis title.
    fn frame(&self, svg: &mut String, y_step: f64, y_label: &str) {
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#fafafa" stroke="#999"/>"##,
            self.x, self.y, self.w, self.h
        );
        let mut v = 0.0;
        while v <= self.y_max * 1.0001 {
            let y = self.py(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                self.x,
                self.x + self.w,
                self.x - 6.0,
                y + 4.0,
                num(v)
            );
            v += y_step;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
            self.x - 58.0,
            self.y + self.h / 2.0,
            self.x - 58.0,
            self.y + self.h / 2.0,
            escape(y_label)
        );
    }

    /// A vertical grid line with a label under the axis.
    fn x_tick(&self, svg: &mut String, x: f64, label: &str) {
        let px = self.px(x);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            self.y,
            self.y + self.h,
            self.y + self.h + 16.0,
            escape(label)
        );
    }

    fn line(&self, svg: &mut String, points: &[(f64, f64)], color: &str, width: f64) {
        let mut pts = String::new();
        for &(x, y) in points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
        {
            let _ = write!(pts, "{:.1},{:.1} ", self.px(x), self.py(y));
        }
        if !pts.is_empty() {
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" stroke-linejoin="round" points="{}"/>"#,
                pts.trim_end()
            );
        }
    }

    /// Legend entries at the top right, inside the frame.
    fn legend(&self, svg: &mut String, entries: &[(&str, &str)]) {
        let mut y = self.y + 16.0;
        for (label, color) in entries {
            let x = self.x + self.w - 10.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                x - 24.0,
                y - 4.0,
                x,
                y - 4.0,
                x - 30.0,
                y,
                escape(label)
            );
            y += 16.0;
        }
    }
}

/// Latency values in µs shown in ms when they reach a millisecond.
fn latency_scale(max_us: f64) -> (f64, &'static str) {
    if max_us >= 1000.0 {
        (1000.0, "ms")
    } else {
        (1.0, "µs")
    }
}

fn spectrum_panel(svg: &mut String, top: f64, spectrum: &[SpectrumPoint]) {
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.1}" font-size="14" font-weight="bold">Latency by percentile</text>"#,
        top - 10.0
    );
    let total: u64 = spectrum.last().map_or(0, |p| p.count);
    // Show the tail as far as the sample count supports (99.99 % needs 10^4 samples),
    // 99 % at least, 99.999 % at most.
    let x_max = ((total.max(1) as f64).log10().floor()).clamp(2.0, 5.0);
    let max_us = spectrum.iter().map(|p| p.latency_us).max().unwrap_or(0) as f64;
    let (div, unit) = latency_scale(max_us);
    let (y_max, y_step) = nice_axis(max_us / div, 5);
    let area = Area {
        x: LEFT,
        y: top,
        w: PLOT_W,
        h: SPECTRUM_H,
        x_max,
        y_max,
    };
    area.frame(svg, y_step, &format!("latency ({unit})"));
    for (p, label) in [(50.0, "50%")]
        .into_iter()
        .chain((1..=x_max as i32).map(|k| {
            let p = 100.0 - 100.0 / 10f64.powi(k);
            (p, "")
        }))
    {
        let label = if label.is_empty() {
            format!("{}%", num(p))
        } else {
            label.to_string()
        };
        area.x_tick(svg, percentile_x(p), &label);
    }
    area.x_tick(svg, 0.0, "0%");
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + PLOT_W / 2.0,
        top + SPECTRUM_H + 36.0
    );
    if spectrum.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no responses</text>"#,
            LEFT + PLOT_W / 2.0,
            top + SPECTRUM_H / 2.0
        );
        return;
    }
    let mut pts: Vec<(f64, f64)> = Vec::new();
    for p in spectrum {
        let x = percentile_x(p.percentile).min(x_max);
        pts.push((x, p.latency_us as f64 / div));
        if x >= x_max {
            break;
        }
    }
    area.line(svg, &pts, BLUE, 2.0);
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="start" fill="{BLUE}">max {} {unit}</text>"#,
        LEFT + 8.0,
        top + 16.0,
        num((max_us / div * 1000.0).round() / 1000.0)
    );
}

/// The timeline points worth plotting: a last partial interval under half a second
/// (the tail of the run after the last full second) is noise, and left out.
fn plotted(timeline: &[TimelinePoint]) -> Vec<TimelinePoint> {
    timeline.iter().filter(|p| p.dt >= 0.5).cloned().collect()
}

fn timeline_rows(input: &ChartInput) -> usize {
    if plotted(input.timeline).len() < 2 {
        0
    } else {
        2 + input
            .metrics
            .iter()
            .filter(|(_, pts)| !pts.is_empty())
            .count()
    }
}

fn timeline_panel(svg: &mut String, mut top: f64, input: &ChartInput) {
    let tl = &plotted(input.timeline)[..];
    // Ticks roll a few milliseconds late: 4.002 s is plotted at the 4 s mark.
    let t_max_raw = tl.iter().map(|p| p.t).fold(0.0, f64::max);
    let (t_max, t_step) = nice_axis((t_max_raw * 10.0).round() / 10.0, 8);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.1}" font-size="14" font-weight="bold">Over time (per second)</text>"#,
        top - 10.0
    );
    // One row over time: its frame, y axis and time ticks.
    let row = |svg: &mut String, top: f64, (y_max, y_step): (f64, f64), label: &str| {
        let area = Area {
            x: LEFT,
            y: top,
            w: PLOT_W,
            h: ROW_H,
            x_max: t_max,
            y_max,
        };
        area.frame(svg, y_step, label);
        let mut t = 0.0;
        while t <= t_max * 1.0001 {
            area.x_tick(svg, t, &num(t));
            t += t_step;
        }
        area
    };

    // Throughput.
    let max_rps = tl.iter().map(|p| p.throughput_rps).fold(0.0, f64::max);
    let area = row(svg, top, nice_axis(max_rps, 4), "req/s");
    let pts: Vec<_> = tl.iter().map(|p| (p.t, p.throughput_rps)).collect();
    area.line(svg, &pts, BLUE, 2.0);
    let errs: Vec<_> = tl
        .iter()
        .map(|p| (p.t, (p.errors + p.non_2xx) as f64 / p.dt.max(1e-3)))
        .collect();
    let mut legend = vec![("throughput", BLUE)];
    if errs.iter().any(|p| p.1 > 0.0) {
        area.line(svg, &errs, RED, 1.5);
        legend.push(("errors + non-2xx", RED));
    }
    area.legend(svg, &legend);
    top += ROW_H + GAP;

    // Latency.
    let max_us = tl.iter().map(|p| p.p99_us).max().unwrap_or(0) as f64;
    let (div, unit) = latency_scale(max_us);
    let area = row(
        svg,
        top,
        nice_axis(max_us / div, 4),
        &format!("latency ({unit})"),
    );
    let with_responses = || tl.iter().filter(|p| p.responses > 0);
    let p50: Vec<_> = with_responses()
        .map(|p| (p.t, p.p50_us as f64 / div))
        .collect();
    let p99: Vec<_> = with_responses()
        .map(|p| (p.t, p.p99_us as f64 / div))
        .collect();
    area.line(svg, &p50, GREEN, 2.0);
    area.line(svg, &p99, RED, 2.0);
    area.legend(svg, &[("p50", GREEN), ("p99", RED)]);
    top += ROW_H + GAP;

    // Sampled metrics, one row each.
    for (i, (name, pts)) in input
        .metrics
        .iter()
        .filter(|(_, pts)| !pts.is_empty())
        .enumerate()
    {
        let max = pts
            .iter()
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let area = row(svg, top, nice_axis(max, 4), "value");
        let color = SERIES[i % SERIES.len()];
        // A step line: a gauge holds its value until the next sample.
        let mut steps = Vec::with_capacity(pts.len() * 2);
        for (k, &(t, v)) in pts.iter().enumerate() {
            if k > 0 {
                steps.push((t, pts[k - 1].1));
            }
            steps.push((t, v));
        }
        area.line(svg, &steps, color, 2.0);
        area.legend(svg, &[(name.as_str(), color)]);
        top += ROW_H + GAP;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since start</text>"#,
        LEFT + PLOT_W / 2.0,
        top - GAP + 36.0
    );
}

/// The whole chart as an SVG document.
pub fn render(input: &ChartInput) -> String {
    let rows = timeline_rows(input);
    let spectrum_top = 80.0;
    let timeline_top = spectrum_top + SPECTRUM_H + 50.0 + 40.0;
    let height = if rows > 0 {
        timeline_top + rows as f64 * (ROW_H + GAP)
    } else {
        spectrum_top + SPECTRUM_H + 60.0
    };
    let mut svg = String::with_capacity(16 * 1024);
    let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{}</text>"#,
        escape(input.title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="48" fill="#444">{}</text>"##,
        escape(input.subtitle)
    );
    spectrum_panel(&mut svg, spectrum_top, input.spectrum);
    if rows > 0 {
        timeline_panel(&mut svg, timeline_top, input);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spectrum() -> Vec<SpectrumPoint> {
        let mut h = crate::stats::histogram();
        for i in 1..=10_000u64 {
            h.record(100 + i % 400 + if i % 1000 == 0 { 20_000 } else { 0 })
                .unwrap();
        }
        crate::report::spectrum(&h)
    }

    fn timeline() -> Vec<TimelinePoint> {
        (1..=5)
            .map(|s| TimelinePoint {
                t: s as f64,
                dt: 1.0,
                responses: 1000 * s,
                throughput_rps: 1000.0 * s as f64,
                p50_us: 300,
                p99_us: 900 + 100 * s,
                max_us: 5000,
                errors: s % 2,
                non_2xx: 0,
            })
            .collect()
    }

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed: {e}\n{svg}"))
    }

    #[test]
    fn full_chart_is_well_formed_svg() {
        let spectrum = spectrum();
        let mut timeline = timeline();
        // A 10 ms tail after the last full second: not plotted (it would set the scale).
        timeline.push(TimelinePoint {
            t: 5.01,
            dt: 0.01,
            responses: 1000,
            throughput_rps: 100_000.0,
            ..timeline[0].clone()
        });
        let metrics = vec![(
            r#"scorefront_replicas{state="ready"}"#.to_string(),
            vec![(0.0, 1.0), (1.0, 2.0), (2.5, 3.0), (5.0, 3.0)],
        )];
        let svg = render(&ChartInput {
            title: "GET http://h/score?a=1&b=<2> \"q\" 'x'",
            subtitle: "closed loop \u{1} & more",
            spectrum: &spectrum,
            timeline: &timeline,
            metrics: &metrics,
        });
        let doc = parse(&svg);
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        let polylines: Vec<_> = root
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .collect();
        // Spectrum, throughput, errors, p50, p99, one metric.
        assert_eq!(polylines.len(), 6);
        for p in &polylines {
            let pts = p.attribute("points").unwrap();
            for pair in pts.split(' ') {
                let (x, y) = pair.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!((0.0..=WIDTH).contains(&x) && y >= 0.0, "{pair}");
            }
        }
        let texts: String = root
            .descendants()
            .filter(|n| n.is_text())
            .filter_map(|n| n.text())
            .collect();
        assert!(texts.contains("b=<2>"));
        assert!(texts.contains(r#"scorefront_replicas{state="ready"}"#));
        assert!(texts.contains("99.99%"));
        assert!(
            texts.contains("6000") && !texts.contains("100000"),
            "{texts}"
        );
    }

    #[test]
    fn spectrum_only_and_empty_charts_are_well_formed() {
        let spectrum = spectrum();
        let svg = render(&ChartInput {
            title: "t",
            subtitle: "",
            spectrum: &spectrum,
            timeline: &timeline()[..1],
            metrics: &[],
        });
        let doc = parse(&svg);
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("polyline"))
                .count(),
            1
        );

        let svg = render(&ChartInput {
            title: "nothing",
            subtitle: "",
            spectrum: &[],
            timeline: &[],
            metrics: &[],
        });
        let doc = parse(&svg);
        assert!(doc.descendants().any(|n| n.text() == Some("no responses")));
    }

    #[test]
    fn axes_are_nice() {
        assert_eq!(nice_axis(87.0, 5), (100.0, 20.0));
        assert_eq!(nice_axis(1234.0, 4), (1500.0, 500.0));
        assert_eq!(nice_axis(0.0, 4), (1.0, 0.2));
        assert_eq!(nice_axis(f64::NAN, 4), (1.0, 0.2));
        assert_eq!(nice_axis(10.0, 5), (10.0, 2.0));
        assert!((percentile_x(99.0) - 2.0).abs() < 1e-9);
        assert!((percentile_x(99.99) - 4.0).abs() < 1e-6);
        assert_eq!(percentile_x(0.0), 0.0);
        assert!(percentile_x(100.0).is_finite());
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(3.0), "3");
        assert_eq!(escape("a<&>\"'\u{7}"), "a&lt;&amp;&gt;&quot;&apos; ");
    }
}
