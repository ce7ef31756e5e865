//! Messages that wait while the rest of the sale goes on: on a Redis Cluster, an order
//! (or a compensation) whose keys touch a slot that lost its data (its master came back
//! empty) cannot be decided until `stockctl rebuild`; every other order can. The producer
//! keeps such messages here, with the later pays and cancels of the same orders (an
//! order's events keep their order), and runs them again with the next batch, at most once
//! per [`RETRY_EVERY`].
//!
//! Offsets: a partition's stored offset never passes a waiting message
//! ([`Parking::offsets`]), so a crash or a rebalance redelivers it; the waiting messages
//! are only in memory. When a partition is revoked its waiting messages are dropped (the
//! new owner reads them again from the committed offset). At most [`MAX_WAITING`] wait:
//! beyond that the batch itself waits (the whole producer stops, as on one Redis), which
//! bounds the memory.

use rdkafka::message::{Message, OwnedMessage};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use stock_common::batch_loop::Offsets;
use tokio::time::Instant;

/// How often the waiting messages are run again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The most messages that wait at once.
pub const MAX_WAITING: usize = 100_000;

/// (topic, partition).
type Partition = (String, i32);

#[derive(Default)]
pub struct Parking {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The waiting messages by (topic, partition, offset), and the order each is about.
    waiting: BTreeMap<(String, i32, i64), (OwnedMessage, Option<String>)>,
    /// How many waiting messages each order id has.
    ids: HashMap<String, usize>,
    /// Per partition read in this assignment, the offset after the last message read.
    read: HashMap<Partition, i64>,
    /// Partitions that had waiting messages when the last offsets were computed.
    held: HashSet<Partition>,
    next_retry: Option<Instant>,
}

/// The messages of one step: the waiting ones being retried, then the new batch.
pub struct Candidates {
    pub msgs: Vec<OwnedMessage>,
    /// The order ids that wait from before and are not retried in this step: their new
    /// events wait too.
    pub waiting_ids: HashSet<String>,
}

impl Parking {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many messages wait.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The messages to run in this step: the waiting ones (in partition and offset order)
    /// when their retry is due, then `new`. Waiting messages of partitions that
    /// `assigned` no longer names are dropped first, with what was read of them.
    pub fn candidates(
        &self,
        new: &[OwnedMessage],
        assigned: impl Fn(&str, i32) -> bool,
    ) -> Candidates {
        let mut g = self.lock();
        let inner = &mut *g;
        let revoked: Vec<(String, i32, i64)> = inner
            .waiting
            .keys()
            .filter(|(t, p, _)| !assigned(t, *p))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            tracing::info!(
                messages = revoked.len(),
                "partitions revoked: their waiting messages are left to the new owner"
            );
        }
        for k in revoked {
            if let Some((_, Some(id))) = inner.waiting.remove(&k) {
                forget_id(&mut inner.ids, &id);
            }
            inner.read.remove(&(k.0.clone(), k.1));
            inner.held.remove(&(k.0, k.1));
        }
        inner.read.retain(|(t, p), _| assigned(t, *p));
        let due = inner.next_retry.is_none_or(|t| Instant::now() >= t);
        let mut msgs = Vec::new();
        let mut waiting_ids = HashSet::new();
        if due && !inner.waiting.is_empty() {
            msgs.extend(inner.waiting.values().map(|(m, _)| m.clone()));
            inner.waiting.clear();
            inner.ids.clear();
            inner.next_retry = Some(Instant::now() + RETRY_EVERY);
        } else {
            waiting_ids.extend(inner.ids.keys().cloned());
        }
        for m in new {
            inner
                .read
                .insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
        }
        msgs.extend(new.iter().cloned());
        Candidates { msgs, waiting_ids }
    }

    /// Whether `more` messages can wait besides those waiting now.
    pub fn has_room(&self, more: usize) -> bool {
        self.lock().waiting.len() + more <= MAX_WAITING
    }

    /// Keeps `msgs` (each with the order it is about) waiting.
    pub fn park(&self, msgs: Vec<(OwnedMessage, Option<String>)>) {
        let mut g = self.lock();
        let inner = &mut *g;
        if !msgs.is_empty() && inner.next_retry.is_none_or(|t| Instant::now() >= t) {
            inner.next_retry = Some(Instant::now() + RETRY_EVERY);
        }
        for (m, id) in msgs {
            let key = (m.topic().to_owned(), m.partition(), m.offset());
            if let Some(id) = &id {
                *inner.ids.entry(id.clone()).or_default() += 1;
            }
            if let Some((_, Some(old))) = inner.waiting.insert(key, (m, id)) {
                forget_id(&mut inner.ids, &old);
            }
        }
    }

    /// The offsets to store after this step: per partition read in this assignment, the
    /// offset after the last message read, but never past its first waiting message.
    /// Only partitions read in this step (`stepped`) or whose waiting changed.
    pub fn offsets(&self, stepped: &[OwnedMessage]) -> Offsets {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut first_waiting: BTreeMap<Partition, i64> = BTreeMap::new();
        for (t, p, o) in inner.waiting.keys() {
            first_waiting.entry((t.clone(), *p)).or_insert(*o);
        }
        let mut touched: HashSet<Partition> = stepped
            .iter()
            .map(|m| (m.topic().to_owned(), m.partition()))
            .collect();
        touched.extend(inner.held.iter().cloned());
        touched.extend(first_waiting.keys().cloned());
        inner.held = first_waiting.keys().cloned().collect();
        let mut out: Offsets = touched
            .into_iter()
            .filter_map(|part| {
                let read = *inner.read.get(&part)?;
                let at = first_waiting.get(&part).map_or(read, |&w| w.min(read));
                Some((part.0, part.1, at))
            })
            .collect();
        out.sort();
        out
    }
}

fn forget_id(ids: &mut HashMap<String, usize>, id: &str) {
    if let Some(n) = ids.get_mut(id) {
        *n -= 1;
        if *n == 0 {
            ids.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn msg(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"x".to_vec()),
            None,
            "orders".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn offsets_stop_at_the_first_waiting_message_until_it_is_decided() {
        let p = Parking::default();
        let batch = vec![msg(0, 10), msg(0, 11), msg(1, 5)];
        let c = p.candidates(&batch, |_, _| true);
        assert_eq!(c.msgs.len(), 3);
        p.park(vec![(batch[0].clone(), Some("o-1".into()))]);
        assert_eq!(
            p.offsets(&c.msgs),
            vec![("orders".into(), 0, 10), ("orders".into(), 1, 6)]
        );
        // A later batch: partition 0 still held at 10; the waiting order's ids are known.
        let batch2 = vec![msg(0, 12)];
        let c2 = p.candidates(&batch2, |_, _| true);
        assert_eq!(c2.msgs.len(), 1, "the retry is not due yet");
        assert!(c2.waiting_ids.contains("o-1"));
        assert_eq!(p.offsets(&c2.msgs), vec![("orders".into(), 0, 10)]);
        // Retried and decided: partition 0 moves to after the last message read.
        p.lock().next_retry = None;
        let c3 = p.candidates(&[], |_, _| true);
        assert_eq!(c3.msgs.len(), 1);
        assert_eq!(p.offsets(&c3.msgs), vec![("orders".into(), 0, 13)]);
        assert!(p.is_empty());
        // Nothing more to store for partition 0 until it is read again.
        assert_eq!(p.offsets(&[]), vec![]);
    }

    #[test]
    fn a_revoked_partition_drops_its_waiting_messages_and_stores_nothing() {
        let p = Parking::default();
        let batch = vec![msg(0, 10), msg(0, 11)];
        let c = p.candidates(&batch, |_, _| true);
        p.park(vec![(batch[0].clone(), Some("o-1".into()))]);
        assert_eq!(p.offsets(&c.msgs), vec![("orders".into(), 0, 10)]);
        let c2 = p.candidates(&[], |_, part| part != 0);
        assert!(c2.msgs.is_empty() && c2.waiting_ids.is_empty());
        assert!(p.is_empty());
        // Never past the dropped message: partition 0 is not stored at all.
        assert_eq!(p.offsets(&c2.msgs), vec![]);
    }
}
