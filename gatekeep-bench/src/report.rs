//! Figures and the statistics behind them.
//!
//! Every benchmark prints its results as [`Figure`]s, one JSON object per line after
//! [`MARKER`], on stdout (natively) or on the VM's console. `cargo xtask bench` collects
//! them, adds the machine's conditions, prints one table and writes the JSON file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What starts a figure line.
pub const MARKER: &str = "GATEKEEP-BENCH ";

/// Which way a target points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    /// The figure must be at most the target.
    AtMost,
    /// The figure must be at least the target.
    AtLeast,
}

/// What a figure is held to (from the issue's targets).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub goal: Goal,
    pub value: f64,
    /// Whether the target applies to the ratio (true) or the value.
    pub on_ratio: bool,
}

impl Target {
    #[must_use]
    pub fn at_most(value: f64) -> Self {
        Self {
            goal: Goal::AtMost,
            value,
            on_ratio: false,
        }
    }

    #[must_use]
    pub fn at_least(value: f64) -> Self {
        Self {
            goal: Goal::AtLeast,
            value,
            on_ratio: false,
        }
    }

    #[must_use]
    pub fn ratio_at_most(value: f64) -> Self {
        Self {
            goal: Goal::AtMost,
            value,
            on_ratio: true,
        }
    }
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Stable key, e.g. `vm.exec.rule`.
    pub id: String,
    /// What was measured, for people.
    pub metric: String,
    /// The median over the repetitions.
    pub value: f64,
    pub unit: String,
    /// Smallest and largest value over the repetitions.
    pub min: f64,
    pub max: f64,
    /// Repetitions the median is taken over.
    pub runs: usize,
    /// What the value is compared with (same unit), and what that is.
    pub baseline: Option<f64>,
    pub baseline_label: Option<String>,
    /// `value / baseline`, the median of the per-run ratios when measured side by side.
    pub ratio: Option<f64>,
    /// Smallest and largest of those per-run ratios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_range: Option<[f64; 2]>,
    /// A 95 % confidence interval of their median (distribution-free: order statistics of
    /// the per-run ratios, see [`median_ci`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_ci: Option<[f64; 2]>,
    pub target: Option<Target>,
    /// How it was measured (counts, setup); `cargo xtask bench` adds the load.
    pub conditions: String,
    /// The ratio was to come from runs side by side ([`Self::ratio`]): without any, there
    /// is none, rather than one of medians.
    #[serde(skip)]
    side_by_side: bool,
}

impl Figure {
    /// A figure from per-run values (median, min, max).
    #[must_use]
    pub fn from_runs(id: &str, metric: &str, unit: &str, runs: &[f64]) -> Self {
        let summary = Summary::of(runs);
        Self {
            id: id.to_owned(),
            metric: metric.to_owned(),
            value: summary.median,
            unit: unit.to_owned(),
            min: summary.min,
            max: summary.max,
            runs: runs.len(),
            baseline: None,
            baseline_label: None,
            ratio: None,
            ratio_range: None,
            ratio_ci: None,
            target: None,
            conditions: String::new(),
            side_by_side: false,
        }
    }

    #[must_use]
    pub fn baseline(mut self, label: &str, value: f64) -> Self {
        self.baseline = Some(value);
        self.baseline_label = Some(label.to_owned());
        if self.ratio.is_none() && !self.side_by_side && value != 0.0 {
            self.ratio = Some(self.value / value);
        }
        self
    }

    /// The ratio as the median of per-run ratios (measured side by side), with their
    /// range and the median's confidence interval; no ratio at all without any (every run
    /// was left out), so that none reads as 0.
    #[must_use]
    pub fn ratio(mut self, ratios: &[f64]) -> Self {
        self.side_by_side = true;
        if ratios.is_empty() {
            self.ratio = None;
            self.ratio_range = None;
            self.ratio_ci = None;
            return self;
        }
        let summary = Summary::of(ratios);
        self.ratio = Some(summary.median);
        self.ratio_range = Some([summary.min, summary.max]);
        self.ratio_ci = median_ci(ratios);
        self
    }

    #[must_use]
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    #[must_use]
    pub fn conditions(mut self, conditions: impl Into<String>) -> Self {
        self.conditions = conditions.into();
        self
    }

    /// The ratio, its confidence interval and range, as text (empty without a ratio).
    #[must_use]
    pub fn ratio_text(&self) -> String {
        self.ratio
            .map(|r| {
                let ci = self
                    .ratio_ci
                    .map(|[lo, hi]| format!(" (95% CI {lo:.4}..{hi:.4})"))
                    .unwrap_or_default();
                let range = self
                    .ratio_range
                    .map(|[lo, hi]| format!(" [runs {lo:.4}..{hi:.4}]"))
                    .unwrap_or_default();
                format!("{r:.4}{ci}{range}")
            })
            .unwrap_or_default()
    }

    /// Prints the figure line `cargo xtask bench` collects, and a readable line on stderr.
    pub fn emit(&self) {
        // A figure always serialises (plain numbers and strings).
        let json = serde_json::to_string(self).unwrap_or_default();
        println!("{MARKER}{json}");
        let ratio = match self.ratio_text() {
            text if text.is_empty() => text,
            text => format!(" ratio {text}"),
        };
        eprintln!(
            "[bench] {}: {} {} ({}..{}, {} runs){ratio}",
            self.metric,
            format_value(self.value),
            self.unit,
            format_value(self.min),
            format_value(self.max),
            self.runs
        );
    }
}

/// A number as a table shows it: 3 significant digits for small values, whole numbers for
/// large ones.
#[must_use]
pub fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1000.0 {
        format!("{value:.0}")
    } else if magnitude >= 100.0 {
        format!("{value:.1}")
    } else if magnitude >= 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// Median, smallest and largest of a set of values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Of `values` (all zero when empty). An even count takes the mean of the middle two.
    #[must_use]
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            f64::midpoint(sorted[mid - 1], sorted[mid])
        } else {
            sorted[mid]
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// A 95 % confidence interval of the median of `values`, free of any assumption about
/// their distribution: the order statistics `x(k)` and `x(n+1-k)` with the largest `k`
/// such that `P(Binomial(n, 1/2) < k) <= 2.5 %` (the median of the population lies
/// between them with at least 95 % probability). `None` for fewer than 6 values, where
/// no such pair exists (the full range covers less than 95 %).
#[must_use]
pub fn median_ci(values: &[f64]) -> Option<[f64; 2]> {
    let n = values.len();
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    // P(B <= j) for B ~ Binomial(n, 1/2), built term by term.
    let half_n = 0.5f64.powi(i32::try_from(n).ok()?);
    let mut term = half_n; // P(B = 0)
    let mut below = 0.0; // P(B < k)
    let mut k = 0;
    for j in 0..n / 2 {
        below += term;
        if below > 0.025 {
            break;
        }
        k = j + 1;
        // P(B = j + 1) = P(B = j) * (n - j) / (j + 1)
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let step = (n - j) as f64 / (j + 1) as f64;
        term *= step;
    }
    (k >= 1).then(|| [sorted[k - 1], sorted[n - k]])
}

/// The mean of the smallest `keep` share (0..=1) of `samples` (sorted in place); at
/// least one sample is kept. 0 when there is none.
#[must_use]
pub fn trimmed_mean(samples: &mut [u64], keep: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a count of samples, far below 2^52"
    )]
    let kept = ((samples.len() as f64 * keep).round() as usize).clamp(1, samples.len());
    #[expect(clippy::cast_precision_loss, reason = "sums of nanoseconds and counts")]
    let mean = samples[..kept].iter().sum::<u64>() as f64 / kept as f64;
    mean
}

/// The `p`-quantile (0..=1) of sorted samples, nearest rank.
#[must_use]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a list far shorter than 2^52"
    )]
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Microseconds, as figures report latencies.
#[must_use]
pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// p50 and p99 (microseconds) of one run's samples.
#[must_use]
pub fn p50_p99(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    (
        micros(percentile(samples, 0.50)),
        micros(percentile(samples, 0.99)),
    )
}

/// `count` events in `elapsed`, per second.
#[must_use]
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let count = count as f64;
    count / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_the_middle() {
        let odd = Summary::of(&[5.0, 1.0, 3.0]);
        assert_eq!((odd.median, odd.min, odd.max), (3.0, 1.0, 5.0));
        let even = Summary::of(&[4.0, 1.0, 2.0, 3.0]);
        assert!((even.median - 2.5).abs() < 1e-12);
        assert!(Summary::of(&[]).median.abs() < f64::EPSILON);
    }

    #[test]
    fn the_median_interval_uses_binomial_order_statistics() {
        // n = 5: even the full range covers only 93.75 %.
        assert_eq!(median_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]), None);
        // n = 6: P(B = 0) = 1.6 % -> k = 1, the full range (96.9 %).
        assert_eq!(median_ci(&[6.0, 1.0, 2.0, 3.0, 4.0, 5.0]), Some([1.0, 6.0]));
        // n = 12: P(B <= 2) = 1.9 %, P(B <= 3) = 7.3 % -> k = 3.
        let twelve: Vec<f64> = (1..=12).map(f64::from).collect();
        assert_eq!(median_ci(&twelve), Some([3.0, 10.0]));
        // n = 20: P(B <= 5) = 2.07 % -> k = 6.
        let twenty: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(median_ci(&twenty), Some([6.0, 15.0]));
    }

    #[test]
    fn paired_ratios_carry_their_range_and_interval() {
        let ratios: Vec<f64> = (0..12).map(|i| 1.0 + f64::from(i) / 1000.0).collect();
        let figure = Figure::from_runs("r", "r", "us", &[1.0]).ratio(&ratios);
        assert_eq!(figure.ratio_range, Some([1.0, 1.011]));
        assert_eq!(figure.ratio_ci, Some([1.002, 1.009]));
    }

    #[test]
    fn the_trimmed_mean_drops_the_slowest() {
        let mut samples: Vec<u64> = (1..=10).rev().collect();
        assert!((trimmed_mean(&mut samples, 0.9) - 5.0).abs() < 1e-12);
        assert!((trimmed_mean(&mut samples, 1.0) - 5.5).abs() < 1e-12);
        assert!((trimmed_mean(&mut [7], 0.1) - 7.0).abs() < 1e-12);
        assert!(trimmed_mean(&mut [], 0.9).abs() < f64::EPSILON);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 0.50), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&samples, 1.0), Duration::from_micros(100));
        assert_eq!(percentile(&samples[..1], 0.99), Duration::from_micros(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn figures_serialise_as_xtask_reads_them() {
        let figure = Figure::from_runs("x.y", "a metric", "us", &[3.0, 1.0, 2.0])
            .baseline("none", 1.0)
            .target(Target::ratio_at_most(1.5))
            .conditions("n=3");
        let json = serde_json::to_string(&figure).unwrap();
        let parsed: Figure = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, figure);
        assert_eq!(parsed.ratio, Some(2.0));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["target"]["goal"], "atmost");
        assert_eq!(value["target"]["on_ratio"], true);
    }

    #[test]
    fn side_by_side_ratios_win_over_the_ratio_of_medians() {
        let figure = Figure::from_runs("r", "r", "us", &[10.0, 20.0, 30.0])
            .ratio(&[1.01, 1.02, 1.03])
            .baseline("none", 10.0);
        assert_eq!(figure.ratio, Some(1.02));
        assert_eq!(figure.baseline, Some(10.0));
    }

    #[test]
    fn no_side_by_side_ratio_means_no_ratio_not_zero_nor_one_of_medians() {
        let figure = Figure::from_runs("r", "r", "us", &[10.0, 20.0, 30.0])
            .ratio(&[])
            .baseline("none", 10.0);
        assert_eq!(figure.ratio, None);
        assert_eq!(figure.ratio_text(), "");
        assert_eq!(figure.baseline, Some(10.0));
    }
}
