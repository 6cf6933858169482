//! Results: per-operation HdrHistograms merged from every thread, printed as wrk2/HdrHistogram
//! print them, summarised on one `RESULT` line, and written as JSON, .hgrm files and an SVG plot.

use crate::workload::OpKind;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// Highest latency a histogram holds: 60 s, in microseconds (larger values are clamped).
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Significant digits: 0.1% value resolution.
pub const SIGFIG: u8 = 3;
/// Percentile rows per halving of the distance to 100% (HdrHistogram's default).
const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Microseconds per printed unit (milliseconds, as wrk2 prints).
const US_PER_MS: f64 = 1000.0;

/// A histogram with the bounds every thread shares, so that `add` never fails.
pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGFIG) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e:?}"),
    }
}

/// What a thread (or the whole run) measured.
pub struct Measured {
    pub latency_us: Vec<Histogram<u64>>,
    pub errors: BTreeMap<String, u64>,
    /// GETs answered nil.
    pub misses: u64,
}

impl Measured {
    pub fn new() -> Measured {
        Measured {
            latency_us: OpKind::ALL.iter().map(|_| new_histogram()).collect(),
            errors: BTreeMap::new(),
            misses: 0,
        }
    }

    pub fn record(&mut self, op: OpKind, latency_us: u64) {
        self.latency_us[op.index()].saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
    }

    pub fn error(&mut self, kind: &str) {
        match self.errors.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.errors.insert(kind.to_string(), 1);
            }
        }
    }

    pub fn merge(&mut self, other: &Measured) {
        for (mine, theirs) in self.latency_us.iter_mut().zip(&other.latency_us) {
            // Same bounds everywhere (new_histogram), so adding cannot fail.
            let added = mine.add(theirs);
            debug_assert!(added.is_ok());
        }
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_insert(0) += n;
        }
        self.misses += other.misses;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn all_ops(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in &self.latency_us {
            let _ = all.add(h);
        }
        all
    }
}

impl Default for Measured {
    fn default() -> Self {
        Measured::new()
    }
}

/// The outcome of `--verify`.
pub struct VerifyOutcome {
    pub mismatches: u64,
    pub samples: Vec<String>,
    pub keys_scanned: u64,
}

/// The whole run, ready to print.
pub struct Summary {
    pub target: String,
    pub workload: String,
    pub elapsed: Duration,
    pub measured: Measured,
    pub verify: Option<VerifyOutcome>,
}

/// The percentile spectrum in HdrHistogram's `outputPercentileDistribution` format (values in
/// milliseconds), which wrk2 prints and HdrHistogram's plotter reads (.hgrm).
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        out.push_str("#[No values recorded]\n");
        return out;
    }
    let mut total = 0u64;
    for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += v.count_since_last_iteration();
        let value_ms = v.value_iterated_to() as f64 / US_PER_MS;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value_ms:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value_ms:12.3} {q:2.12} {total:10}");
        }
    }
    let sub_buckets = 2u32.pow((2.0 * 10f64.powi(i32::from(SIGFIG))).log2().ceil() as u32);
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / US_PER_MS,
        h.stdev() / US_PER_MS
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / US_PER_MS,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

fn rate(ops: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        ops as f64 / secs
    } else {
        0.0
    }
}

fn latency_fields(prefix: &str, h: &Histogram<u64>, elapsed: Duration) -> Vec<(String, String)> {
    let q = |x: f64| h.value_at_quantile(x).to_string();
    vec![
        (format!("{prefix}ops"), h.len().to_string()),
        (
            format!("{prefix}ops_per_s"),
            format!("{:.0}", rate(h.len(), elapsed)),
        ),
        (format!("{prefix}p50_us"), q(0.5)),
        (format!("{prefix}p90_us"), q(0.9)),
        (format!("{prefix}p99_us"), q(0.99)),
        (format!("{prefix}p999_us"), q(0.999)),
        (format!("{prefix}max_us"), h.max().to_string()),
    ]
}

/// The `RESULT k=v ...` line: totals, then each operation type that ran, then errors.
pub fn result_line(s: &Summary) -> String {
    let mut fields = latency_fields("", &s.measured.all_ops(), s.elapsed);
    for op in OpKind::ALL {
        let h = &s.measured.latency_us[op.index()];
        if !h.is_empty() {
            fields.extend(latency_fields(&format!("{}_", op.name()), h, s.elapsed));
        }
    }
    fields.push(("errors".into(), s.measured.error_count().to_string()));
    fields.push(("misses".into(), s.measured.misses.to_string()));
    if let Some(v) = &s.verify {
        let verdict = if v.mismatches == 0 { "ok" } else { "failed" };
        fields.push(("verify".into(), verdict.into()));
        fields.push(("mismatches".into(), v.mismatches.to_string()));
    }
    let mut line = String::from("RESULT");
    for (k, v) in fields {
        let _ = write!(line, " {k}={v}");
    }
    line
}

/// The human report printed before the RESULT line.
pub fn text_report(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "target {} workload {} elapsed {:.3} s",
        s.target,
        s.workload,
        s.elapsed.as_secs_f64()
    );
    for op in OpKind::ALL {
        let h = &s.measured.latency_us[op.index()];
        if h.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} latency distribution ({} ops, {:.0} ops/s), milliseconds:",
            op.name().to_uppercase(),
            h.len(),
            rate(h.len(), s.elapsed)
        );
        out.push_str(&percentile_distribution(h));
    }
    let _ = writeln!(out, "\nerrors: {}", s.measured.error_count());
    for (kind, n) in &s.measured.errors {
        let _ = writeln!(out, "  {kind}: {n}");
    }
    if let Some(v) = &s.verify {
        let _ = writeln!(
            out,
            "verify: {} mismatches, {} keys scanned at the end",
            v.mismatches, v.keys_scanned
        );
        for sample in &v.samples {
            let _ = writeln!(out, "  {sample}");
        }
    }
    out
}

/// The same summary as the RESULT line, as JSON.
pub fn json_report(s: &Summary) -> Value {
    let mut ops = Map::new();
    for op in OpKind::ALL {
        let h = &s.measured.latency_us[op.index()];
        if h.is_empty() {
            continue;
        }
        let mut o = Map::new();
        for (k, v) in latency_fields("", h, s.elapsed) {
            o.insert(k, number(&v));
        }
        o.insert("mean_us".into(), json!(h.mean()));
        o.insert("stddev_us".into(), json!(h.stdev()));
        ops.insert(op.name().into(), Value::Object(o));
    }
    let all = s.measured.all_ops();
    let mut root = Map::new();
    root.insert("target".into(), json!(s.target));
    root.insert("workload".into(), json!(s.workload));
    root.insert("elapsed_s".into(), json!(s.elapsed.as_secs_f64()));
    for (k, v) in latency_fields("", &all, s.elapsed) {
        root.insert(k, number(&v));
    }
    root.insert("errors".into(), json!(s.measured.error_count()));
    root.insert("errors_by_kind".into(), json!(s.measured.errors));
    root.insert("misses".into(), json!(s.measured.misses));
    root.insert("operations".into(), Value::Object(ops));
    if let Some(v) = &s.verify {
        root.insert(
            "verify".into(),
            json!({"ok": v.mismatches == 0, "mismatches": v.mismatches, "samples": v.samples, "keys_scanned": v.keys_scanned}),
        );
    }
    Value::Object(root)
}

/// A RESULT field value as a JSON number (an integer when it is one).
fn number(text: &str) -> Value {
    match text.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(text.parse::<f64>().unwrap_or(0.0)),
    }
}

/// Writes `<dir>/<op>.hgrm` for each operation type that ran.
pub fn write_hgrm(dir: &Path, s: &Summary) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for op in OpKind::ALL {
        let h = &s.measured.latency_us[op.index()];
        if h.is_empty() {
            continue;
        }
        let path = dir.join(format!("{}.hgrm", op.name()));
        std::fs::write(&path, percentile_distribution(h))?;
        written.push(path);
    }
    Ok(written)
}

/// Latency by percentile, log x axis of 1/(1-percentile) as HdrHistogram's plotter draws it,
/// one line per operation type. Plain SVG, no dependencies.
pub fn svg_plot(s: &Summary) -> String {
    const W: f64 = 900.0;
    const H: f64 = 500.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let series: Vec<(OpKind, Vec<(f64, f64)>)> = OpKind::ALL
        .iter()
        .filter(|op| !s.measured.latency_us[op.index()].is_empty())
        .map(|&op| {
            let h = &s.measured.latency_us[op.index()];
            let points = h
                .iter_quantiles(TICKS_PER_HALF_DISTANCE)
                .map(|v| {
                    (
                        v.quantile_iterated_to(),
                        v.value_iterated_to() as f64 / US_PER_MS,
                    )
                })
                .collect();
            (op, points)
        })
        .collect();
    // x = log10(1/(1-q)), up to the decade that the largest histogram can resolve.
    let count_max = series
        .iter()
        .map(|(op, _)| s.measured.latency_us[op.index()].len())
        .max()
        .unwrap_or(1);
    let decades = ((count_max.max(10) as f64).log10().ceil()).clamp(1.0, 6.0);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, v)| v))
        .fold(0.001f64, f64::max)
        * 1.1;
    let x_of = |q: f64| {
        let d = if q >= 1.0 {
            decades
        } else {
            (1.0 / (1.0 - q)).log10().min(decades)
        };
        LEFT + d / decades * (W - LEFT - RIGHT)
    };
    let y_of = |v: f64| H - BOTTOM - v / y_max * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Latency by percentile: {} ({})</text>"#,
        W / 2.0,
        xml_escape(&s.target),
        xml_escape(&s.workload)
    );
    // Axes, grid and labels.
    for d in 0..=decades as u32 {
        let q = 1.0 - 10f64.powi(-(d as i32));
        let x = x_of(q);
        let label = match d {
            0 => "0%".to_string(),
            _ => format!("{}%", trim_float(100.0 * q)),
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##,
            H - BOTTOM
        );
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            H - BOTTOM + 18.0
        );
    }
    for i in 0..=5 {
        let v = y_max * f64::from(i) / 5.0;
        let y = y_of(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##,
            W - RIGHT
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{v:.3}</text>"#,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">Percentile</text>"#,
        W / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">Latency (milliseconds)</text>"#,
        H / 2.0,
        H / 2.0
    );
    for (i, (op, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut path = String::new();
        for &(q, v) in points {
            let _ = write!(path, "{:.1},{:.1} ", x_of(q), y_of(v));
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.trim_end()
        );
        let ly = TOP + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#,
            LEFT + 12.0,
            LEFT + 36.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{}</text>"#,
            LEFT + 42.0,
            ly + 4.0,
            op.name().to_uppercase()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        let mut m = Measured::new();
        for i in 1..=1000 {
            m.record(OpKind::Get, i);
        }
        m.record(OpKind::Set, 2000);
        m.error("ERR");
        Summary {
            target: "t".into(),
            workload: "a".into(),
            elapsed: Duration::from_secs(2),
            measured: m,
            verify: None,
        }
    }

    #[test]
    fn result_line_has_totals_and_per_op_fields() {
        let line = result_line(&summary());
        assert!(
            line.starts_with("RESULT ops=1001 ops_per_s=500 p50_us=501 "),
            "{line}"
        );
        assert!(
            line.contains(
                " get_ops=1000 get_ops_per_s=500 get_p50_us=500 get_p90_us=900 get_p99_us=990 "
            ),
            "{line}"
        );
        assert!(
            line.contains(" get_p999_us=999 get_max_us=1000 set_ops=1 "),
            "{line}"
        );
        assert!(line.ends_with(" errors=1 misses=0"), "{line}");
        assert!(!line.contains("incr_"));
    }

    #[test]
    fn percentile_distribution_matches_hdrhistogram_layout() {
        let s = summary();
        let text = percentile_distribution(&s.measured.latency_us[OpKind::Get.index()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        assert_eq!(
            lines[2],
            "       0.001 0.000000000000          1           1.00"
        );
        // The last row reaches 100% with every value counted, and has no 1/(1-p) column.
        let last_row = lines.iter().rev().find(|l| !l.starts_with('#')).unwrap();
        assert_eq!(*last_row, "       1.000 1.000000000000       1000");
        assert!(
            text.contains("#[Mean    =        0.500, StdDeviation   =        0.289]"),
            "{text}"
        );
        assert!(
            text.contains("#[Max     =        1.000, Total count    =         1000]"),
            "{text}"
        );
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
    }

    #[test]
    fn json_and_svg_carry_each_operation() {
        let s = summary();
        let j = json_report(&s);
        assert_eq!(j["operations"]["get"]["ops"], json!(1000));
        assert_eq!(j["operations"]["get"]["p99_us"], json!(990));
        assert_eq!(j["errors_by_kind"]["ERR"], json!(1));
        let svg = svg_plot(&s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">99.9%<"));
    }
}
