//! Output: aligned tables for people, one JSON object per line for scripts.

use serde::Serialize;
use std::time::Duration;

/// A table printed with every column padded to its widest cell; the first column is
/// left-aligned, the others right-aligned.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                if i == 0 {
                    s.push_str(&format!("{c:<w$}"));
                } else {
                    s.push_str(&format!("  {c:>w$}"));
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (cols.max(1) - 1)));
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out
    }

    pub fn print(&self) {
        println!("{}", self.render());
    }

    /// The table in Markdown (GitHub's pipe tables): columns of figures (every cell
    /// starting with a digit) right-aligned, the others left-aligned; `|` in a cell is
    /// escaped.
    pub fn markdown(&self) -> String {
        let cols = self.headers.len();
        let line = |cells: &[String]| {
            let cells: Vec<String> = (0..cols)
                .map(|i| cells.get(i).map_or("", String::as_str).replace('|', "\\|"))
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        let mut out = line(&self.headers);
        out.push('\n');
        let figures = |i: usize| {
            self.rows.iter().all(|r| {
                r.get(i)
                    .and_then(|c| c.chars().next())
                    .is_some_and(|c| c.is_ascii_digit())
            })
        };
        let rule: Vec<&str> = (0..cols)
            .map(|i| if figures(i) { "---:" } else { ":---" })
            .collect();
        out.push_str(&format!("| {} |", rule.join(" | ")));
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out
    }
}

/// One CSV line (RFC 4180): fields with a comma, quote or line break are quoted.
pub fn csv_line<S: AsRef<str>>(fields: impl IntoIterator<Item = S>) -> String {
    let quoted: Vec<String> = fields
        .into_iter()
        .map(|f| {
            let f = f.as_ref();
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_owned()
            }
        })
        .collect();
    quoted.join(",")
}

/// Prints `value` as one line of JSON.
pub fn json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Events per second.
pub fn rate(events: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        events as f64 / secs
    } else {
        0.0
    }
}

/// `12,345` style.
pub fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

pub fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

pub fn yes_no(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAIL"
    }
}

/// The median of `xs` (None when empty).
pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// Latency figures of one run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// [`Latency`] in milliseconds, for JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// p50, p99 and max of `xs` (zero when empty).
    pub fn of(mut xs: Vec<Duration>) -> Latency {
        xs.sort_unstable();
        Latency {
            p50: percentile(&xs, 50.0),
            p99: percentile(&xs, 99.0),
            max: xs.last().copied().unwrap_or_default(),
        }
    }

    pub fn ms(&self) -> LatencyMs {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        LatencyMs {
            p50: ms(self.p50),
            p99: ms(self.p99),
            max: ms(self.max),
        }
    }
}

impl LatencyMs {
    /// "p50 / p99 / max" with one decimal, or "-".
    pub fn show(l: Option<LatencyMs>) -> String {
        match l {
            Some(l) => format!("{:.1} / {:.1} / {:.1}", l.p50, l.p99, l.max),
            None => "-".into(),
        }
    }
}

/// Latencies in µs counted in buckets of at most 1/512 of their value (exact below
/// 1,024 µs): a whole run's p50, p99 and max in ~100 KB however many orders it had.
#[derive(Debug, Default, Clone)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max_us: u32,
}

impl LatencyHistogram {
    /// Values below `1 << EXACT_BITS` µs have a bucket each.
    const EXACT_BITS: u32 = 10;
    const EXACT: u32 = 1 << Self::EXACT_BITS;
    const SUB_BITS: u32 = 9;

    fn bucket(us: u32) -> usize {
        if us < Self::EXACT {
            return us as usize;
        }
        let e = 31 - us.leading_zeros();
        let sub = (us >> (e - Self::SUB_BITS)) & ((1 << Self::SUB_BITS) - 1);
        (Self::EXACT + ((e - Self::EXACT_BITS) << Self::SUB_BITS) + sub) as usize
    }

    /// The largest value of bucket `i` (a percentile is read as its bucket's top: never
    /// below the true value).
    fn top(i: usize) -> u32 {
        let i = i as u32;
        if i < Self::EXACT {
            return i;
        }
        let j = i - Self::EXACT;
        let e = (j >> Self::SUB_BITS) + Self::EXACT_BITS;
        let sub = j & ((1 << Self::SUB_BITS) - 1);
        let width = 1u64 << (e - Self::SUB_BITS);
        let low = (1u64 << e) + u64::from(sub) * width;
        u32::try_from(low + width - 1).unwrap_or(u32::MAX)
    }

    pub fn record(&mut self, us: u32) {
        let i = Self::bucket(us);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The nearest-rank `p`-th percentile, as [`percentile`] reads it, to within a bucket.
    fn percentile_us(&self, p: f64) -> u32 {
        let rank = ((p / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::top(i).min(self.max_us);
            }
        }
        self.max_us
    }

    /// p50, p99 and max in ms; `None` when nothing was recorded.
    pub fn ms(&self) -> Option<LatencyMs> {
        (self.total > 0).then(|| {
            let ms = |us: u32| f64::from(us) / 1000.0;
            LatencyMs {
                p50: ms(self.percentile_us(50.0)),
                p99: ms(self.percentile_us(99.0)),
                max: ms(self.max_us),
            }
        })
    }
}

/// The nearest-rank `p`-th percentile (0 < p <= 100) of `sorted` (ascending): the smallest
/// value with at least p% of the values at or below it. Zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_reads_percentiles_within_a_bucket() {
        assert_eq!(LatencyHistogram::default().ms(), None);
        // Values from 1 µs to 4 s, skewed: the exact nearest-rank percentiles against the
        // histogram's, which may only be above, by at most 1/512.
        let mut xs: Vec<u32> = (1..=200_000u64)
            .map(|i| ((i * i * 7919) % 4_000_000) as u32 + 1)
            .collect();
        let mut h = LatencyHistogram::default();
        for &x in &xs {
            h.record(x);
        }
        xs.sort_unstable();
        let sorted: Vec<Duration> = xs
            .iter()
            .map(|&u| Duration::from_micros(u.into()))
            .collect();
        let got = h.ms().expect("recorded");
        for (p, read) in [(50.0, got.p50), (99.0, got.p99)] {
            let exact = percentile(&sorted, p).as_secs_f64() * 1000.0;
            assert!(
                read >= exact && read <= exact * (1.0 + 1.0 / 512.0),
                "p{p}: {read} against {exact}"
            );
        }
        assert_eq!(got.max, f64::from(*xs.last().expect("values")) / 1000.0);
        // Below 1,024 µs it is exact.
        let mut small = LatencyHistogram::default();
        for us in [5, 7, 7, 900] {
            small.record(us);
        }
        assert_eq!(
            small.ms(),
            Some(LatencyMs {
                p50: 0.007,
                p99: 0.9,
                max: 0.9
            })
        );
        let mut top = LatencyHistogram::default();
        top.record(u32::MAX);
        assert_eq!(top.ms().map(|l| l.p99), Some(f64::from(u32::MAX) / 1000.0));
    }

    #[test]
    fn formats() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(rate(10, Duration::from_secs(2)), 5.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let mut t = Table::new(["a", "bb"]);
        t.row(["xyz", "1"]);
        assert_eq!(t.render(), "a    bb\n-------\nxyz   1");
        assert_eq!(t.markdown(), "| a | bb |\n| :--- | ---: |\n| xyz | 1 |");
        t.row(["p|q"]);
        assert_eq!(
            t.markdown(),
            "| a | bb |\n| :--- | :--- |\n| xyz | 1 |\n| p\\|q |  |"
        );
        assert_eq!(
            csv_line(["a", "b,c", "say \"hi\"", ""]),
            r#"a,"b,c","say ""hi""","#
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let ms = |v: u64| Duration::from_millis(v);
        let xs: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&xs, 50.0), ms(50));
        assert_eq!(percentile(&xs, 99.0), ms(99));
        assert_eq!(percentile(&xs, 100.0), ms(100));
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        let l = Latency::of(vec![ms(9), ms(1), ms(5)]);
        assert_eq!((l.p50, l.p99, l.max), (ms(5), ms(9), ms(9)));
    }
}
