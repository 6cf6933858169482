//! A fixed-size log2 histogram for the runtime's own measurements (persist round times, entries
//! per round, turn times), cheap enough to record on the hot path: one `leading_zeros`, one
//! add, no allocation. Bucket `b` counts values in `[2^(b-1), 2^b)` (bucket 0 counts zeros), so
//! a quantile is known to within a factor of two; the exact maximum is kept beside it. INFO
//! prints them (`persist_round_us:n=..,p50_le=..,p99_le=..,max=..`) so a tail can be traced to
//! the stage that grows without a profiler.

use std::fmt::Write;

/// Buckets: enough for any u64.
const BUCKETS: usize = 65;

#[derive(Clone, Copy)]
pub struct Log2Histogram {
    counts: [u64; BUCKETS],
    total: u64,
    max: u64,
    sum: u64,
}

impl Default for Log2Histogram {
    fn default() -> Self {
        Log2Histogram {
            counts: [0; BUCKETS],
            total: 0,
            max: 0,
            sum: 0,
        }
    }
}

impl std::fmt::Debug for Log2Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

impl Log2Histogram {
    pub fn record(&mut self, v: u64) {
        let b = (u64::BITS - v.leading_zeros()) as usize;
        self.counts[b] += 1;
        self.total += 1;
        self.sum = self.sum.saturating_add(v);
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1): the true quantile is at most
    /// this, and more than half of it (0 when empty).
    pub fn quantile_le(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let upper = if b == 0 { 0 } else { (1u128 << b) - 1 };
                return (upper as u64).min(self.max);
            }
        }
        self.max
    }

    /// `n=..,mean=..,p50_le=..,p90_le=..,p99_le=..,p999_le=..,max=..`
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mean = self.sum.checked_div(self.total).unwrap_or(0);
        let _ = write!(
            s,
            "n={},mean={},p50_le={},p90_le={},p99_le={},p999_le={},max={}",
            self.total,
            mean,
            self.quantile_le(0.5),
            self.quantile_le(0.9),
            self.quantile_le(0.99),
            self.quantile_le(0.999),
            self.max
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_bounds_capped_by_the_max() {
        let mut h = Log2Histogram::default();
        assert_eq!(h.quantile_le(0.99), 0);
        for v in 1..=100u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.max(), 100);
        // The 50th value (50) lies in [32, 64).
        assert_eq!(h.quantile_le(0.5), 63);
        // The 99th (99) lies in [64, 128): capped by the max, 100.
        assert_eq!(h.quantile_le(0.99), 100);
        assert_eq!(h.quantile_le(0.0), 1);
        h.record(0);
        assert_eq!(h.quantile_le(0.0), 0);
        h.record(u64::MAX);
        assert_eq!(h.max(), u64::MAX);
        assert_eq!(h.quantile_le(1.0), u64::MAX);
        assert!(h.summary().starts_with("n=102,"), "{}", h.summary());
    }
}
