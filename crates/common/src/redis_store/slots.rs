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
}
