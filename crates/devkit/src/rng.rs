//! A small seeded generator (SplitMix64) for every generated load (demo, nemesis,
//! benchmarks): the same seed gives the same orders and the same fault schedule on every
//! machine and with every dependency version.

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// An independent stream for one purpose (workload, faults, …) of the same seed.
    pub fn fork(&mut self, stream: u64) -> Rng {
        Rng(self.next_u64() ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.range(0, xs.len() as u64) as usize]
    }

    /// A skewed draw from `0..n` (`0` when `n` is 0), "20 % of the population sends 80 % of
    /// the traffic": with probability 0.8 uniform among the first fifth (at least one),
    /// else uniform among the others. Every member of each part equally likely, so the
    /// busiest are a known share (`0.8 / (n / 5)` each) rather than a single giant.
    pub fn skewed(&mut self, n: u64) -> u64 {
        let heavy = (n / 5).max(1).min(n);
        if heavy == n || self.chance(0.8) {
            self.range(0, heavy)
        } else {
            self.range(heavy, n)
        }
    }

    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.range(0, i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let x = a.range(3, 9);
            assert_eq!(x, b.range(3, 9));
            assert!((3..9).contains(&x));
            let u = a.unit();
            assert_eq!(u, b.unit());
            assert!((0.0..1.0).contains(&u));
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn skewed_sends_four_fifths_to_one_fifth() {
        let mut r = Rng::new(3);
        let n = 1000;
        let draws: Vec<u64> = (0..100_000).map(|_| r.skewed(n)).collect();
        assert!(draws.iter().all(|&d| d < n));
        let heavy = draws.iter().filter(|&&d| d < n / 5).count();
        assert!((79_000..81_000).contains(&heavy), "{heavy}");
        assert_eq!(Rng::new(1).skewed(0), 0);
        assert_eq!(Rng::new(1).skewed(1), 0);
    }
}
