//! Latency percentiles, as the benchmarks and `portcullis test --bench`
//! report them.

use std::time::Duration;

/// Latency percentiles of one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl Stats {
    /// Percentiles of `samples` (sorted in place).
    pub fn of(samples: &mut [Duration]) -> Stats {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Stats {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }

    /// One row of a report: the label, then the percentiles.
    pub fn line(&self, label: &str) -> String {
        format!(
            "  {label:<22} p50 {:>9}  p90 {:>9}  p99 {:>9}",
            micros(self.p50),
            micros(self.p90),
            micros(self.p99)
        )
    }
}

/// `d` in microseconds, one decimal.
pub fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_samples() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let stats = Stats::of(&mut samples);
        assert_eq!(stats.p50, Duration::from_micros(51));
        assert_eq!(stats.p90, Duration::from_micros(90));
        assert_eq!(stats.p99, Duration::from_micros(99));
    }
}
