//! Simulated service times for `sample-model --latency-dist`.
//!
//! Syntax (all times in milliseconds, fractions allowed):
//!
//! | spec | meaning |
//! |---|---|
//! | `MS` or `fixed:MS` | always MS |
//! | `uniform:LO:HI` | uniform between LO and HI |
//! | `exp:MEAN` | exponential with mean MEAN (memoryless, long tail) |
//! | `lognormal:MEDIAN:SIGMA` | log-normal: MEDIAN x e^(SIGMA x Z), Z standard normal |
//!
//! Every draw is capped at one hour.

use std::{fmt, str::FromStr, time::Duration};

use crate::rng::Rng;

/// Longest simulated service time, in milliseconds.
const MAX_MS: f64 = 3_600_000.0;

#[derive(Clone, Debug, PartialEq)]
pub enum LatencyDist {
    Fixed { ms: f64 },
    Uniform { lo_ms: f64, hi_ms: f64 },
    Exp { mean_ms: f64 },
    LogNormal { median_ms: f64, sigma: f64 },
}

impl LatencyDist {
    /// True when every draw is zero: the server then answers without any timer.
    pub fn is_zero(&self) -> bool {
        match *self {
            LatencyDist::Fixed { ms } => ms == 0.0,
            LatencyDist::Uniform { lo_ms, hi_ms } => lo_ms == 0.0 && hi_ms == 0.0,
            LatencyDist::Exp { mean_ms } => mean_ms == 0.0,
            LatencyDist::LogNormal { median_ms, .. } => median_ms == 0.0,
        }
    }

    /// The distribution's mean in milliseconds (before the one-hour cap).
    pub fn mean_ms(&self) -> f64 {
        match *self {
            LatencyDist::Fixed { ms } => ms,
            LatencyDist::Uniform { lo_ms, hi_ms } => (lo_ms + hi_ms) / 2.0,
            LatencyDist::Exp { mean_ms } => mean_ms,
            LatencyDist::LogNormal { median_ms, sigma } => median_ms * (sigma * sigma / 2.0).exp(),
        }
    }

    /// One draw in milliseconds.
    pub fn sample_ms(&self, rng: &mut Rng) -> f64 {
        let ms = match *self {
            LatencyDist::Fixed { ms } => ms,
            LatencyDist::Uniform { lo_ms, hi_ms } => lo_ms + (hi_ms - lo_ms) * rng.next_f64(),
            // 1 - u is in (0, 1], so the logarithm is finite.
            LatencyDist::Exp { mean_ms } => -mean_ms * (1.0 - rng.next_f64()).ln(),
            LatencyDist::LogNormal { median_ms, sigma } => {
                // Box-Muller: one standard normal from two uniforms.
                let u1 = 1.0 - rng.next_f64();
                let u2 = rng.next_f64();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                median_ms * (sigma * z).exp()
            }
        };
        ms.clamp(0.0, MAX_MS)
    }

    /// One draw as a duration (nanosecond precision).
    pub fn sample(&self, rng: &mut Rng) -> Duration {
        Duration::from_nanos((self.sample_ms(rng) * 1e6) as u64)
    }
}

impl fmt::Display for LatencyDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LatencyDist::Fixed { ms } => write!(f, "fixed:{ms}"),
            LatencyDist::Uniform { lo_ms, hi_ms } => write!(f, "uniform:{lo_ms}:{hi_ms}"),
            LatencyDist::Exp { mean_ms } => write!(f, "exp:{mean_ms}"),
            LatencyDist::LogNormal { median_ms, sigma } => {
                write!(f, "lognormal:{median_ms}:{sigma}")
            }
        }
    }
}

const SYNTAX: &str =
    "expected MS, fixed:MS, uniform:LO:HI, exp:MEAN or lognormal:MEDIAN:SIGMA (milliseconds)";

/// A non-negative, finite number of milliseconds no larger than the cap.
fn millis(what: &str, s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{what} '{s}' is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{what} must be a finite number >= 0, got '{s}'"));
    }
    if v > MAX_MS {
        return Err(format!("{what} must be at most {MAX_MS} ms, got '{s}'"));
    }
    Ok(v)
}

impl FromStr for LatencyDist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (kind, params): (&str, Vec<&str>) = match s.split_once(':') {
            Some((kind, rest)) => (kind, rest.split(':').collect()),
            // A bare number is a fixed latency; a bare word is a kind missing its parameters.
            None if s.is_empty() || s.parse::<f64>().is_ok() => ("", Vec::new()),
            None => (s, Vec::new()),
        };
        let want = |n: usize| {
            if params.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "'{s}': {kind} takes {n} parameter{}; {SYNTAX}",
                    if n == 1 { "" } else { "s" }
                ))
            }
        };
        match kind.to_ascii_lowercase().as_str() {
            "" => {
                if s.is_empty() {
                    return Err(format!("empty latency distribution; {SYNTAX}"));
                }
                Ok(LatencyDist::Fixed {
                    ms: millis("latency", s).map_err(|e| format!("{e}; {SYNTAX}"))?,
                })
            }
            "fixed" => {
                want(1)?;
                Ok(LatencyDist::Fixed {
                    ms: millis("latency", params[0])?,
                })
            }
            "uniform" => {
                want(2)?;
                let (lo_ms, hi_ms) = (millis("low", params[0])?, millis("high", params[1])?);
                if lo_ms > hi_ms {
                    return Err(format!("'{s}': low {lo_ms} is above high {hi_ms}"));
                }
                Ok(LatencyDist::Uniform { lo_ms, hi_ms })
            }
            "exp" => {
                want(1)?;
                Ok(LatencyDist::Exp {
                    mean_ms: millis("mean", params[0])?,
                })
            }
            "lognormal" => {
                want(2)?;
                let median_ms = millis("median", params[0])?;
                let sigma: f64 = params[1]
                    .trim()
                    .parse()
                    .map_err(|_| format!("sigma '{}' is not a number", params[1]))?;
                if !sigma.is_finite() || !(0.0..=5.0).contains(&sigma) {
                    return Err(format!(
                        "sigma must be between 0 and 5, got '{}'",
                        params[1]
                    ));
                }
                Ok(LatencyDist::LogNormal { median_ms, sigma })
            }
            other => Err(format!("unknown latency distribution '{other}'; {SYNTAX}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LatencyDist, String> {
        s.parse()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(parse("5"), Ok(LatencyDist::Fixed { ms: 5.0 }));
        assert_eq!(parse(" 0.25 "), Ok(LatencyDist::Fixed { ms: 0.25 }));
        assert_eq!(parse("fixed:2.5"), Ok(LatencyDist::Fixed { ms: 2.5 }));
        assert_eq!(
            parse("uniform:1:9"),
            Ok(LatencyDist::Uniform {
                lo_ms: 1.0,
                hi_ms: 9.0
            })
        );
        assert_eq!(parse("EXP:4"), Ok(LatencyDist::Exp { mean_ms: 4.0 }));
        assert_eq!(
            parse("lognormal:3:0.5"),
            Ok(LatencyDist::LogNormal {
                median_ms: 3.0,
                sigma: 0.5
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["fixed:1.5", "uniform:0:2", "exp:7", "lognormal:2:0.25"] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (spec, needle) in [
            ("", "empty"),
            ("-1", ">= 0"),
            ("abc", "unknown latency distribution 'abc'"),
            ("exp:x", "not a number"),
            ("fixed", "takes 1 parameter"),
            ("fixed:1:2", "takes 1 parameter"),
            ("uniform:5", "takes 2 parameters"),
            ("uniform:9:1", "above high"),
            ("exp:NaN", "finite"),
            ("exp:inf", "finite"),
            ("lognormal:1:-1", "sigma"),
            ("normal:3", "unknown latency distribution 'normal'"),
            ("fixed:99999999", "at most"),
        ] {
            let err = parse(spec).expect_err(spec);
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn draws_follow_the_distribution() {
        let mut rng = Rng::new(7);
        let n = 20_000;
        for (spec, lo, hi) in [
            ("fixed:3", 3.0, 3.0),
            ("uniform:2:4", 2.0, 4.0),
            ("exp:5", 0.0, f64::MAX),
            ("lognormal:5:0.5", 0.0, f64::MAX),
        ] {
            let d = parse(spec).unwrap();
            let mut sum = 0.0;
            for _ in 0..n {
                let x = d.sample_ms(&mut rng);
                assert!(x >= lo && x <= hi, "{spec}: {x}");
                sum += x;
            }
            let mean = sum / n as f64;
            let want = d.mean_ms();
            assert!(
                (mean - want).abs() <= want * 0.05,
                "{spec}: mean {mean}, expected {want}"
            );
        }
    }

    #[test]
    fn exp_median_is_mean_ln2() {
        let mut rng = Rng::new(11);
        let d = LatencyDist::Exp { mean_ms: 10.0 };
        let mut xs: Vec<f64> = (0..20_001).map(|_| d.sample_ms(&mut rng)).collect();
        xs.sort_by(f64::total_cmp);
        let median = xs[xs.len() / 2];
        assert!((median - 10.0 * 2f64.ln()).abs() < 0.3, "{median}");
    }

    #[test]
    fn zero_and_durations() {
        assert!(parse("0").unwrap().is_zero());
        assert!(!parse("exp:1").unwrap().is_zero());
        let mut rng = Rng::new(1);
        assert_eq!(
            parse("fixed:1.5").unwrap().sample(&mut rng),
            Duration::from_micros(1500)
        );
    }
}
