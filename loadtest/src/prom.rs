//! Just enough of the Prometheus text format to sample a metric: `--sample-metric`
//! takes `name` or `name{label="value",...}` and the sample's value is the sum of every
//! series of that name whose labels include all the given pairs.

use std::{fmt, str::FromStr};

/// A metric name with optional required label values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"")?;
                for c in v.chars() {
                    match c {
                        '\\' => f.write_str("\\\\")?,
                        '"' => f.write_str("\\\"")?,
                        '\n' => f.write_str("\\n")?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("\"")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Splits a leading metric or label name off `s`.
fn take_name(s: &str) -> Option<(&str, &str)> {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if is_name_start(c) => {}
        _ => return None,
    }
    let end = chars
        .find(|&(_, c)| !is_name_char(c))
        .map_or(s.len(), |(i, _)| i);
    Some(s.split_at(end))
}

/// Parses `{k="v",...}` at the start of `s` (which starts with `{`); returns the pairs and
/// the rest after `}`.
fn take_labels(s: &str) -> Option<(Labels, &str)> {
    let mut rest = s.strip_prefix('{')?;
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Some((labels, r));
        }
        let (name, r) = take_name(rest)?;
        let r = r.trim_start().strip_prefix('=')?.trim_start();
        let mut chars = r.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = r[1 + end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

impl FromStr for Matcher {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("'{s}' is not a metric matcher: expected NAME or NAME{{label=\"value\",...}}")
        };
        let s = s.trim();
        let (name, rest) = take_name(s).ok_or_else(bad)?;
        let labels = if rest.is_empty() {
            Vec::new()
        } else {
            let (labels, rest) = take_labels(rest).ok_or_else(bad)?;
            if !rest.trim().is_empty() {
                return Err(bad());
            }
            labels
        };
        Ok(Matcher {
            name: name.to_string(),
            labels,
        })
    }
}

/// Label pairs of one sample, in the order written.
pub type Labels = Vec<(String, String)>;

/// One sample line: name, labels, value. None for comments, blank and malformed lines.
pub fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = take_name(line)?;
    let (labels, rest) = if rest.starts_with('{') {
        take_labels(rest)?
    } else {
        (Vec::new(), rest)
    };
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

impl Matcher {
    pub fn matches(&self, name: &str, labels: &[(String, String)]) -> bool {
        name == self.name
            && self
                .labels
                .iter()
                .all(|want| labels.iter().any(|have| have == want))
    }

    /// The sum of the matching samples in an exposition, or None if none matched.
    pub fn sum(&self, text: &str) -> Option<f64> {
        let mut found = None;
        for line in text.lines() {
            if let Some((name, labels, value)) = parse_line(line)
                && self.matches(name, &labels)
            {
                *found.get_or_insert(0.0) += value;
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP scorefront_replicas Replicas by state.
# TYPE scorefront_replicas gauge
scorefront_replicas{endpoint="sample",state="ready",version="blue"} 2
scorefront_replicas{endpoint="sample",state="busy",version="blue"} 1
scorefront_replicas{endpoint="sample",state="ready",version="green"} 1
scorefront_replicas_total 99
scorefront_in_flight_requests 3.5 1700000000000
scorefront_requests_total{code="200",endpoint="x, y",version="a\"b"} 1e3
odd_metric{path="C:\\dir\nx"} +Inf
garbage line here
"#;

    fn m(s: &str) -> Matcher {
        s.parse().unwrap()
    }

    #[test]
    fn sums_matching_series() {
        assert_eq!(m("scorefront_replicas").sum(TEXT), Some(4.0));
        assert_eq!(
            m(r#"scorefront_replicas{state="ready"}"#).sum(TEXT),
            Some(3.0)
        );
        assert_eq!(
            m(r#"scorefront_replicas{ state = "ready" , version="green" }"#).sum(TEXT),
            Some(1.0)
        );
        assert_eq!(m(r#"scorefront_replicas{state="gone"}"#).sum(TEXT), None);
        assert_eq!(m("scorefront_in_flight_requests").sum(TEXT), Some(3.5));
        assert_eq!(m("missing").sum(TEXT), None);
        assert_eq!(m("odd_metric").sum(TEXT), Some(f64::INFINITY));
    }

    #[test]
    fn label_values_may_hold_commas_quotes_and_escapes() {
        assert_eq!(
            m(r#"scorefront_requests_total{endpoint="x, y",version="a\"b"}"#).sum(TEXT),
            Some(1000.0)
        );
        let (name, labels, v) = parse_line(r#"odd_metric{path="C:\\dir\nx"} 1"#).unwrap();
        assert_eq!(name, "odd_metric");
        assert_eq!(labels, vec![("path".to_string(), "C:\\dir\nx".to_string())]);
        assert_eq!(v, 1.0);
    }

    #[test]
    fn skips_comments_blanks_and_garbage() {
        assert!(parse_line("# TYPE x gauge").is_none());
        assert!(parse_line("   ").is_none());
        assert!(parse_line("garbage line here").is_none());
        assert!(parse_line("x{a=\"unterminated} 1").is_none());
        assert!(parse_line("x{a=b} 1").is_none());
        assert!(parse_line("x").is_none());
        assert!(parse_line("x NaN").unwrap().2.is_nan());
        assert_eq!(parse_line("x{} -Inf").unwrap().2, f64::NEG_INFINITY);
    }

    #[test]
    fn matchers_parse_and_print() {
        let matcher = m(r#"a_b:c{x="1",y="q\"z"}"#);
        assert_eq!(matcher.name, "a_b:c");
        assert_eq!(matcher.labels.len(), 2);
        assert_eq!(matcher.to_string(), r#"a_b:c{x="1",y="q\"z"}"#);
        assert_eq!(m(&matcher.to_string()), matcher);
        for bad in ["", "1abc", "a{", "a{x}", "a{x=\"1\"} trailing", "a b"] {
            assert!(bad.parse::<Matcher>().is_err(), "{bad}");
        }
    }
}
