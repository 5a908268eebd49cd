//! sockperf's ping-pong summary, as the benchmark reads it.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

/// Round-trip times (microseconds) and message counts of one run.
pub struct Rtt {
    pub p50: f64,
    pub p99: f64,
    pub avg: f64,
    pub observations: u64,
    /// Replies over the whole run, warm-up and cool-down included (the
    /// observations cover only the valid window).
    pub replies: u64,
}

impl Rtt {
    pub fn to_json(&self) -> Value {
        json!({
            "p50_us": self.p50, "p99_us": self.p99, "avg_us": self.avg,
            "observations": self.observations, "replies": self.replies,
        })
    }
}

/// Reads the summary of `sockperf ping-pong --full-rtt` (colour codes
/// stripped).
pub fn parse(text: &str) -> Result<Rtt> {
    ensure!(
        text.contains("Round trip is"),
        "no round-trip summary (was --full-rtt honoured?)"
    );
    let mut p50 = None;
    let mut p99 = None;
    let mut avg = None;
    let mut observations = None;
    let mut replies = None;
    for line in text.lines() {
        if let Some(rest) = line.split("---> percentile ").nth(1) {
            let (pct, val) = rest.split_once('=').context("percentile line without '='")?;
            let val: f64 = val.trim().parse()?;
            match pct.trim() {
                "50.000" => p50 = Some(val),
                "99.000" => p99 = Some(val),
                _ => {}
            }
        } else if let Some(rest) = line.split("avg-rtt=").nth(1) {
            avg = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if line.contains("[Total Run]") {
            // "... SentMessages=20560; ReceivedMessages=20559"
            replies = line
                .split("ReceivedMessages=")
                .nth(1)
                .and_then(|v| v.trim().split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.split("Total ").nth(1) {
            // "Total 31142 observations" (not "[Total Run] ...").
            if let Some(n) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                observations = Some(n);
            }
        }
    }
    let observations: u64 = observations.context("no observation count")?;
    ensure!(observations > 0, "no round trips completed");
    Ok(Rtt {
        p50: p50.context("no 50th percentile")?,
        p99: p99.context("no 99th percentile")?,
        avg: avg.unwrap_or(f64::NAN),
        observations,
        replies: replies.context("no [Total Run] message count")?,
    })
}

#[cfg(test)]
mod tests {
    /// sockperf 3.x's summary (colour codes stripped), one percentile kept
    /// short.
    const OUTPUT: &str =
        "sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; SentMessages=20560; ReceivedMessages=20559
sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=9452; ReceivedMessages=9452
sockperf: ====> avg-rtt=57.123 (std-dev=3.1)
sockperf: Total 9452 observations; each percentile contains 94.52 observations
sockperf: ---> percentile 99.000 =   81.234
sockperf: ---> percentile 50.000 =   55.012
sockperf: Round trip is measured
";

    #[test]
    fn a_sockperf_summary_gives_percentiles_observations_and_all_replies() {
        let r = super::parse(OUTPUT).unwrap();
        assert_eq!((r.p50, r.p99, r.avg), (55.012, 81.234, 57.123));
        assert_eq!(r.observations, 9452);
        assert_eq!(r.replies, 20559);
    }
}
