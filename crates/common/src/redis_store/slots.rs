//! Where keys live on a Redis Cluster: the hash slot of a key, and the per-slot keys of the
//! scripts' shared state (loaded marker, stock epoch, sequence), named so that each lands
//! in the slot it describes.

use std::sync::LazyLock;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the hash tag
/// (the text between the first `{` and the next `}`, when not empty) or of the whole key.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// For each slot, the smallest number whose decimal text hashes to it: `{<tag>}` puts a key
/// into that slot (the same slot as `stock:{<tag>}`).
static TAGS: LazyLock<Vec<u32>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; usize::from(SLOTS)];
    let mut left = usize::from(SLOTS);
    let mut n: u32 = 0;
    while left > 0 {
        let s = usize::from(slot(&n.to_string()));
        if tags[s] == u32::MAX {
            tags[s] = n;
            left -= 1;
        }
        n += 1;
    }
    tags
});

/// The hash tag that names slot `s`.
pub fn tag(s: u16) -> u32 {
    TAGS[usize::from(s % SLOTS)]
}

/// A part of Redis that scripts may act on together: the whole of a single Redis, or one
/// hash slot of a cluster. Each has its own loaded marker, stock epoch and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shard {
    Whole,
    Slot(u16),
}

impl Shard {
    fn key(self, name: &str) -> String {
        match self {
            Shard::Whole => format!("stockpipe:{name}"),
            Shard::Slot(s) => format!("stockpipe:{name}:{{{}}}", tag(s)),
        }
    }

    /// The loaded marker (its value: the generation loaded).
    pub fn loaded_key(self) -> String {
        self.key("loaded")
    }

    /// The stock epoch counter (see `lua/reserve.lua`).
    pub fn epoch_key(self) -> String {
        self.key("epoch")
    }

    /// The sequence counter that names pre-deductions.
    pub fn seq_key(self) -> String {
        self.key("seq")
    }

    /// The scripts' argument that keeps tokens unique across slots: a slot's sequence
    /// numbers become `seq * 16384 + slot`; "" for the whole of one Redis.
    pub fn token_arg(self) -> String {
        match self {
            Shard::Whole => String::new(),
            Shard::Slot(s) => s.to_string(),
        }
    }
}

/// The slot of `stock:{<product_id>}` on a cluster.
pub fn of_stock(product_id: i64) -> u16 {
    slot(&super::stock_key(product_id))
}

/// The hash tag of an order's record on a cluster, `o<bucket>`: the bucket drawn from the
/// order id ([`super::RECORD_BUCKETS`]), so that a redelivery with other items finds it.
pub fn record_tag(order_id: &str) -> String {
    format!("o{}", slot(order_id) % super::RECORD_BUCKETS)
}

/// The slot of an order's record on a cluster (`stockpipe:rec:{o<bucket>}:…`).
pub fn of_record(order_id: &str) -> u16 {
    slot(&record_tag(order_id))
}

/// Every slot an order touches on a cluster: its record's, then its items' stock slots.
pub fn touched<'a>(
    order_id: &str,
    items: &'a [crate::events::Item],
) -> impl Iterator<Item = u16> + 'a {
    std::iter::once(of_record(order_id)).chain(items.iter().map(|it| of_stock(it.product_id)))
}

/// A slot's loaded marker, read: the generation the slot was **loaded** in (what a
/// give-back or a hold of an older generation is stale against) and the generation its
/// new pre-deductions are **named** in (at least every slot's loaded generation: a
/// partial rebuild raises it on the slots it does not load, so that an order across slots
/// claimed anywhere is new enough for every slot it holds). The value is `<loaded>`, or
/// `<loaded>/<named>` once a partial rebuild ran elsewhere (DESIGN "Rebuilding some
/// slots").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub loaded: i64,
    pub named: i64,
}

impl Marker {
    pub fn parse(raw: &str) -> Option<Marker> {
        match raw.split_once('/') {
            None => {
                let g = raw.parse().ok()?;
                Some(Marker {
                    loaded: g,
                    named: g,
                })
            }
            Some((l, n)) => Some(Marker {
                loaded: l.parse().ok()?,
                named: n.parse().ok()?,
            }),
        }
    }

    pub fn encode(self) -> String {
        if self.loaded == self.named {
            self.loaded.to_string()
        } else {
            format!("{}/{}", self.loaded, self.named)
        }
    }
}

/// Reads slot ranges as an operator writes them: `0-5460,10923,12000-12010`.
pub fn parse_ranges(text: &str) -> Result<std::collections::BTreeSet<u16>, String> {
    let mut out = std::collections::BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let num = |t: &str| {
            t.parse::<u16>()
                .ok()
                .filter(|s| *s < SLOTS)
                .ok_or_else(|| format!("{t:?} is not a slot (0 to {})", SLOTS - 1))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(format!("{part:?}: the range runs backwards"));
        }
        out.extend(lo..=hi);
    }
    if out.is_empty() {
        return Err("no slot named".into());
    }
    Ok(out)
}

/// A set of slots as its runs of consecutive slots (first, last).
pub fn ranges(slots: &std::collections::BTreeSet<u16>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &s in slots {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == s => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// Writes a set of slots as ranges (`0-5460,10923`), for logs and reports.
pub fn format_ranges(slots: &std::collections::BTreeSet<u16>) -> String {
    ranges(slots)
        .into_iter()
        .map(|(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("stock:{42}"), slot("42"));
        assert_eq!(slot("{}x"), slot("{}x"));
        assert_eq!(slot("123456789"), 12739);
    }

    #[test]
    fn every_slot_has_a_tag_in_it() {
        for s in [0, 1, 4242, SLOTS - 1] {
            let k = Shard::Slot(s).loaded_key();
            assert_eq!(slot(&k), s, "{k}");
            assert_eq!(slot(&Shard::Slot(s).seq_key()), s);
        }
        assert_eq!(Shard::Whole.loaded_key(), "stockpipe:loaded");
        assert_eq!(Shard::Whole.epoch_key(), "stockpipe:epoch");
        assert_eq!(Shard::Whole.seq_key(), "stockpipe:seq");
    }

    #[test]
    fn order_slots_match_the_keys() {
        assert_eq!(of_stock(42), slot("stock:{42}"));
        let id = "order-17";
        let bucket = slot(id) % super::super::RECORD_BUCKETS;
        assert_eq!(
            of_record(id),
            slot(&format!("stockpipe:rec:{{o{bucket}}}:i"))
        );
    }

    #[test]
    fn markers_and_ranges_read_back() {
        assert_eq!(
            Marker::parse("7"),
            Some(Marker {
                loaded: 7,
                named: 7
            })
        );
        let m = Marker::parse("5/9").expect("marker");
        assert_eq!((m.loaded, m.named), (5, 9));
        assert_eq!(m.encode(), "5/9");
        assert_eq!(Marker::parse("x"), None);
        let r = parse_ranges("0-2, 10,16383").expect("ranges");
        assert_eq!(
            r.iter().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 10, 16383]
        );
        assert_eq!(format_ranges(&r), "0-2,10,16383");
        assert!(parse_ranges("5-3").is_err());
        assert!(parse_ranges("16384").is_err());
        assert!(parse_ranges("").is_err());
    }
}
