//! What to send: YCSB-style operation mixes, key choice distributions and value sizes.
//!
//! Every generator here is deterministic given its seed and allocation-free per operation: a
//! benchmark that allocates per request measures its own allocator.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::str::FromStr;

/// The operation types, each with its own latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Get,
    Set,
    Incr,
    Append,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Get, OpKind::Set, OpKind::Incr, OpKind::Append];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The lower-case name used in reports (`get_p99_us`).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Set => "set",
            OpKind::Incr => "incr",
            OpKind::Append => "append",
        }
    }
}

/// How F modifies a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rmw {
    Incr,
    Append,
}

/// YCSB core workloads (the ones a key-value store without scans can run) plus `write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// 50% read, 50% update.
    A,
    /// 95% read, 5% update.
    B,
    /// 100% read.
    C,
    /// 95% read, 5% insert; reads favour the latest inserted keys.
    D,
    /// 50% read, 50% read-modify-write (INCR or APPEND).
    F,
    /// 100% SET.
    Write,
}

/// One operation chosen by the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Read,
    Update,
    Insert,
    Rmw,
}

impl Workload {
    /// Picks the next operation (`roll` uniform in 0..100).
    pub fn choose(self, roll: u32) -> Choice {
        debug_assert!(roll < 100);
        match self {
            Workload::A => {
                if roll < 50 {
                    Choice::Read
                } else {
                    Choice::Update
                }
            }
            Workload::B => {
                if roll < 95 {
                    Choice::Read
                } else {
                    Choice::Update
                }
            }
            Workload::C => Choice::Read,
            Workload::D => {
                if roll < 95 {
                    Choice::Read
                } else {
                    Choice::Insert
                }
            }
            Workload::F => {
                if roll < 50 {
                    Choice::Read
                } else {
                    Choice::Rmw
                }
            }
            Workload::Write => Choice::Update,
        }
    }

    /// The distribution YCSB uses for this workload when none is given.
    pub fn default_dist(self) -> Dist {
        match self {
            Workload::D => Dist::Latest {
                theta: ZIPF_THETA_DEFAULT,
            },
            _ => Dist::Uniform,
        }
    }
}

/// YCSB's default skew.
pub const ZIPF_THETA_DEFAULT: f64 = 0.99;

/// Key choice distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Uniform,
    /// Scrambled zipfian (YCSB): hot keys spread over the key space, hence over slots.
    Zipfian {
        theta: f64,
    },
    /// Skewed towards the most recently inserted keys (YCSB "latest").
    Latest {
        theta: f64,
    },
}

impl FromStr for Dist {
    type Err = String;
    fn from_str(s: &str) -> Result<Dist, String> {
        let (name, theta) = match s.split_once(':') {
            Some((n, t)) => {
                let theta: f64 = t
                    .parse()
                    .map_err(|_| format!("zipfian theta '{t}' is not a number"))?;
                if !(theta > 0.0 && theta < 1.0) {
                    return Err(format!("zipfian theta {theta} must be in (0, 1)"));
                }
                (n, theta)
            }
            None => (s, ZIPF_THETA_DEFAULT),
        };
        match name {
            "uniform" if !s.contains(':') => Ok(Dist::Uniform),
            "zipfian" => Ok(Dist::Zipfian { theta }),
            "latest" => Ok(Dist::Latest { theta }),
            _ => Err(format!(
                "unknown distribution '{s}' (uniform, zipfian[:theta], latest[:theta])"
            )),
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Uniform => write!(f, "uniform"),
            Dist::Zipfian { theta } => write!(f, "zipfian:{theta}"),
            Dist::Latest { theta } => write!(f, "latest:{theta}"),
        }
    }
}

/// Value sizes: fixed, or uniform in `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueSize {
    pub min: usize,
    pub max: usize,
}

/// Largest value we generate (a bound on every buffer that holds one).
pub const VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;

impl FromStr for ValueSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ValueSize, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{t}' is not a byte count"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (num(a)?, num(b.trim_start_matches('='))?),
            None => (num(s)?, num(s)?),
        };
        if min > max || max > VALUE_BYTES_MAX {
            return Err(format!(
                "value size {s}: need min <= max <= {VALUE_BYTES_MAX}"
            ));
        }
        Ok(ValueSize { min, max })
    }
}

impl ValueSize {
    pub fn pick(self, rng: &mut ChaCha8Rng) -> usize {
        if self.min == self.max {
            self.min
        } else {
            rng.gen_range(self.min..=self.max)
        }
    }
}

/// YCSB's ZipfianGenerator (Gray et al., "Quickly generating billion-record synthetic
/// databases"): item 0 is the most popular. Set up once in O(n), then O(1) per draw.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    zetan: f64,
    alpha: f64,
    eta: f64,
}

impl Zipfian {
    pub fn new(items: u64, theta: f64) -> Zipfian {
        assert!(items >= 1 && theta > 0.0 && theta < 1.0);
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(items);
        let zeta2 = zeta(2.min(items));
        let eta = if items > 2 {
            (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan)
        } else {
            1.0
        };
        Zipfian {
            items,
            theta,
            zetan,
            alpha: 1.0 / (1.0 - theta),
            eta,
        }
    }

    pub fn next(&self, rng: &mut ChaCha8Rng) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let v = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        v.min(self.items - 1)
    }
}

/// FNV-1a of the 8 bytes of `v`: YCSB's scrambling of zipfian ranks.
pub fn fnv64(v: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Draws key indexes for one connection.
#[derive(Debug, Clone)]
pub struct KeyChooser {
    dist: Dist,
    keys: u64,
    zipf: Option<Zipfian>,
}

impl KeyChooser {
    pub fn new(dist: Dist, keys: u64) -> KeyChooser {
        assert!(keys >= 1);
        let zipf = match dist {
            Dist::Uniform => None,
            Dist::Zipfian { theta } | Dist::Latest { theta } => Some(Zipfian::new(keys, theta)),
        };
        KeyChooser { dist, keys, zipf }
    }

    /// A key index below `existing` (the initial keys plus those inserted so far).
    pub fn next(&self, rng: &mut ChaCha8Rng, existing: u64) -> u64 {
        debug_assert!(existing >= self.keys);
        match (&self.dist, &self.zipf) {
            (Dist::Zipfian { .. }, Some(z)) => fnv64(z.next(rng)) % self.keys,
            (Dist::Latest { .. }, Some(z)) => {
                // YCSB SkewedLatest, with the skew computed over the initial key count.
                existing - 1 - z.next(rng) % existing
            }
            _ => rng.gen_range(0..self.keys),
        }
    }
}

/// Writes `prefix` + decimal `index` into `out` (reused; no allocation once grown).
pub fn format_key(out: &mut Vec<u8>, prefix: &[u8], index: u64) {
    out.clear();
    out.extend_from_slice(prefix);
    let mut scratch = [0u8; 20];
    out.extend_from_slice(tynamo::resp::frame::format_i64(index as i64, &mut scratch));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mixes_have_the_ycsb_proportions() {
        let count = |w: Workload, c: Choice| (0..100).filter(|&r| w.choose(r) == c).count();
        assert_eq!(count(Workload::A, Choice::Read), 50);
        assert_eq!(count(Workload::B, Choice::Update), 5);
        assert_eq!(count(Workload::C, Choice::Read), 100);
        assert_eq!(count(Workload::D, Choice::Insert), 5);
        assert_eq!(count(Workload::F, Choice::Rmw), 50);
        assert_eq!(count(Workload::Write, Choice::Update), 100);
    }

    #[test]
    fn parse_options() {
        assert_eq!("uniform".parse::<Dist>(), Ok(Dist::Uniform));
        assert_eq!("zipfian".parse::<Dist>(), Ok(Dist::Zipfian { theta: 0.99 }));
        assert_eq!(
            "zipfian:0.5".parse::<Dist>(),
            Ok(Dist::Zipfian { theta: 0.5 })
        );
        assert!("zipfian:1.5".parse::<Dist>().is_err());
        assert!("pareto".parse::<Dist>().is_err());
        assert_eq!(
            "100".parse::<ValueSize>(),
            Ok(ValueSize { min: 100, max: 100 })
        );
        assert_eq!(
            "10..20".parse::<ValueSize>(),
            Ok(ValueSize { min: 10, max: 20 })
        );
        assert!("20..10".parse::<ValueSize>().is_err());
    }

    #[test]
    fn zipfian_favours_low_ranks_and_stays_in_range() {
        let z = Zipfian::new(1000, 0.99);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut hits = vec![0u32; 1000];
        for _ in 0..100_000 {
            hits[z.next(&mut rng) as usize] += 1;
        }
        // Rank 0 of 1000 at theta 0.99 draws about 1/zeta(1000) ~ 13% of the time.
        assert!(
            hits[0] > 10_000 && hits[0] < 16_000,
            "rank 0 drew {}",
            hits[0]
        );
        assert!(hits[0] > hits[1] && hits[1] > hits[10] && hits[10] > hits[500]);
    }

    #[test]
    fn latest_favours_recent_keys() {
        let chooser = KeyChooser::new(Dist::Latest { theta: 0.99 }, 1000);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let recent = (0..10_000)
            .filter(|_| chooser.next(&mut rng, 1500) >= 1400)
            .count();
        assert!(recent > 5_000, "{recent}");
        assert!((0..10_000).all(|_| chooser.next(&mut rng, 1500) < 1500));
    }
}
