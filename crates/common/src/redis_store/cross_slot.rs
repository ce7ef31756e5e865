//! Orders on a Redis Cluster: one script call per slot for orders whose keys share a
//! slot, and the cross-slot protocol for the others (DESIGN.md, "Orders across hash
//! slots").
//!
//! The protocol, for an order whose record (under `stockpipe:rec:{o<bucket>}`, found from the order id
//! alone) and stock keys live in different slots. Every step is idempotent and keyed by the
//! claim's token, so a crash anywhere leaves a state the redelivered batch finishes:
//! 1. **claim** (`lua/claim.lua`, record's slot): the record becomes `P|<token>|<items>`,
//!    or an existing record is returned. A redelivery, even with other items, resumes the
//!    claim it finds with the claim's items.
//! 2. **hold** (`lua/hold.lua`, each stock slot): the claim's items there, all or none,
//!    once per token (`stockpipe:hold:{<slot tag>}:<id>:<token>` = `H|<items>`); a hold that
//!    was given back (`F`) is never taken again.
//! 3. **decide** (`lua/swap.lua`, record's slot): `P|<token>|` becomes `R|<token>|<items>`
//!    if every slot held, else `X|<reason>|<pid>|<token>|<items>`. The first decision
//!    wins; a later one finds it.
//! 4. **release** (`lua/release.lua`, each stock slot): unless the record says `R` with
//!    this token, the token's holds are given back (`H` to `F`). A refusal keeps its claim
//!    in the record, so a redelivery after a crash before this step releases them.
//!
//! A give-back of a held order across slots releases its holds first, then turns `R` into
//! `C`: a crash between the two leaves `R`, and the redelivered give-back finds the holds
//! already released and writes `C`.

use super::{
    buyers_key, encode_items, lua_source, stock_key, Claim, Compensation, Item, Lua, OrderRecord,
    Reason, RedisStore, ReserveOutcome, ReserveReply, ReserveRequest, RestoreOutcome, Shard,
    StoreError, PIPELINE_CHUNK,
};
use crate::events::Token;
use std::collections::BTreeMap;
use std::sync::LazyLock;

static CLAIM: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("../lua/marker.lua"),
        include_str!("../lua/token.lua"),
        include_str!("../lua/record.lua"),
        include_str!("../lua/claim.lua"),
    ]))
});
static HOLD: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("../lua/marker.lua"),
        include_str!("../lua/integer.lua"),
        include_str!("../lua/buyers.lua"),
        include_str!("../lua/hold.lua"),
    ]))
});
static RELEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("../lua/marker.lua"),
        include_str!("../lua/buyers.lua"),
        include_str!("../lua/release.lua"),
    ]))
});
static SWAP: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("../lua/record.lua"),
        include_str!("../lua/swap.lua"),
    ]))
});

/// The key of one pre-deduction's hold in slot `slot`.
fn hold_key(slot: u16, order_id: &str, token: &str) -> String {
    format!(
        "stockpipe:hold:{{{}}}:{order_id}:{token}",
        super::slots::tag(slot)
    )
}

/// The base of an order's record on a cluster (`lua/record.lua`): in one of
/// [`super::RECORD_BUCKETS`] slots, the bucket drawn from the order id (CRC16, as slots
/// are).
pub(super) fn record_base(order_id: &str) -> String {
    format!("stockpipe:rec:{{{}}}", super::slots::record_tag(order_id))
}

/// The order id and token a hold key names (`stockpipe:hold:{<tag>}:<id>:<token>`).
fn parse_hold_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("stockpipe:hold:{")?;
    let (_, rest) = rest.split_once("}:")?;
    rest.rsplit_once(':')
}

/// The items of `items` per stock slot, in item order within each slot.
fn by_slot(items: &[Item]) -> BTreeMap<u16, Vec<Item>> {
    let mut out: BTreeMap<u16, Vec<Item>> = BTreeMap::new();
    for it in items {
        out.entry(super::slots::of_stock(it.product_id))
            .or_default()
            .push(*it);
    }
    out
}

/// Whether an order's record and every stock key share one slot (one script call).
fn in_one_slot(order_id: &str, items: &[Item]) -> bool {
    let r = super::slots::of_record(order_id);
    items
        .iter()
        .all(|it| super::slots::of_stock(it.product_id) == r)
}

/// The indices of `orders` (order id, items, whether only its record is touched) whose keys
/// all live in their record's slot, per slot, and the indices of the others.
fn split_by_slot<'a>(
    orders: impl Iterator<Item = (&'a str, &'a [Item], bool)>,
) -> (BTreeMap<u16, Vec<usize>>, Vec<usize>) {
    let mut single: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    let mut across = Vec::new();
    for (i, (order_id, items, record_only)) in orders.enumerate() {
        if record_only || in_one_slot(order_id, items) {
            single
                .entry(super::slots::of_record(order_id))
                .or_default()
                .push(i);
        } else {
            across.push(i);
        }
    }
    (single, across)
}

/// What one slot's hold answered for one order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    Held,
    Freed,
    Stale,
    Short(i64),
    Unknown(i64),
    Corrupt(String),
    /// The customer would go over the product's limit.
    Limit(i64),
    /// No customer, and a product here has a limit.
    Invalid,
    /// The slot is not loaded (its master lost its data): the order waits for a rebuild.
    Unloaded,
}

/// The state of one order through the protocol.
enum Step {
    Done(ReserveOutcome),
    /// Claimed (now or before): the claim to hold and decide.
    Claimed(Claim),
}

fn bad(what: &str) -> StoreError {
    StoreError::Protocol(format!("cross-slot {what}: reply of the wrong shape"))
}

/// Runs one script per slot group, each group's calls in one pipeline, every slot at
/// once. `calls` holds the invocations of each slot; returns each call's reply in the same
/// shape. The pipelines carry no SCRIPT LOAD (hashing the source per pipeline cost more
/// than the calls of a small slot group): a master that answers NOSCRIPT (never loaded
/// it, or a replica promoted since) ran none of its pipeline's calls, so the script is
/// loaded on every node and the pipelines run again (the others' calls are idempotent).
async fn run_per_slot<T: redis::FromRedisValue>(
    store: &RedisStore,
    script: &Lua,
    calls: BTreeMap<u16, Vec<redis::ScriptInvocation<'_>>>,
) -> Result<BTreeMap<u16, Vec<T>>, StoreError> {
    script
        .run_loaded(store.conn(), || pipelines(store, &calls))
        .await
}

async fn pipelines<T: redis::FromRedisValue>(
    store: &RedisStore,
    calls: &BTreeMap<u16, Vec<redis::ScriptInvocation<'_>>>,
) -> Result<BTreeMap<u16, Vec<T>>, StoreError> {
    let trips = calls.iter().map(|(slot, invs)| {
        let mut conn = store.conn();
        let mut pipe = redis::pipe();
        for inv in invs {
            pipe.invoke_script(inv);
        }
        async move {
            let replies: Vec<T> = pipe.query_async(&mut conn).await?;
            if replies.len() != invs.len() {
                return Err(bad("pipeline"));
            }
            Ok::<_, StoreError>((*slot, replies))
        }
    });
    Ok(futures::future::try_join_all(trips)
        .await?
        .into_iter()
        .collect())
}

impl RedisStore {
    /// The hold keys and values of a held order across slots (for a load); none for an
    /// order in one slot or on one Redis.
    pub(super) fn holds_of(
        &self,
        order_id: &str,
        token: &str,
        items: &[Item],
        customer: Option<&str>,
    ) -> Vec<(String, String)> {
        if !self.cluster || in_one_slot(order_id, items) {
            return Vec::new();
        }
        let customer = customer.map(|c| format!("|{c}")).unwrap_or_default();
        by_slot(items)
            .into_iter()
            .map(|(slot, part)| {
                (
                    hold_key(slot, order_id, token),
                    format!("H|{}{customer}", encode_items(&part)),
                )
            })
            .collect()
    }

    /// [`RedisStore::reserve_many`] on a cluster: orders in one slot by `lua/reserve.lua`,
    /// per slot in parallel; the others by the cross-slot protocol.
    pub(super) async fn reserve_on_cluster(
        &self,
        reqs: &[ReserveRequest],
    ) -> Result<ReserveReply, StoreError> {
        let mut outcomes: Vec<Option<ReserveOutcome>> = vec![None; reqs.len()];
        // A forced refusal touches only its record.
        let (single, mut across) = split_by_slot(
            reqs.iter()
                .map(|r| (r.order_id.as_str(), r.items.as_slice(), r.forced.is_some())),
        );
        let trips = single.iter().flat_map(|(slot, idx)| {
            idx.chunks(PIPELINE_CHUNK).map(move |chunk| {
                let group: Vec<ReserveRequest> = chunk.iter().map(|&i| reqs[i].clone()).collect();
                async move {
                    let (calls, sizes) = self
                        .reserve_chunk(self.conn(), Shard::Slot(*slot), &group, "", &[])
                        .await?;
                    let mut reply = ReserveReply::default();
                    for (call, n) in calls.into_iter().zip(sizes) {
                        reply.absorb(call, n)?;
                    }
                    Ok::<_, StoreError>((chunk, reply.outcomes))
                }
            })
        });
        for (chunk, got) in futures::future::try_join_all(trips).await? {
            if got.len() != chunk.len() {
                return Err(bad("reserve"));
            }
            for (&i, o) in chunk.iter().zip(got) {
                match o {
                    // Claimed across slots by an earlier delivery with other items.
                    ReserveOutcome::Decided {
                        record: OrderRecord::Pending(_),
                        ..
                    } => across.push(i),
                    o => outcomes[i] = Some(o),
                }
            }
        }
        if !across.is_empty() {
            let group: Vec<&ReserveRequest> = across.iter().map(|&i| &reqs[i]).collect();
            for (i, o) in across.iter().zip(self.decide_across(&group).await?) {
                outcomes[*i] = Some(o);
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| bad("reserve")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReserveReply {
            outcomes,
            zeros: Vec::new(),
        })
    }

    /// The cross-slot protocol for `reqs` (module docs), one outcome per request.
    async fn decide_across(
        &self,
        reqs: &[&ReserveRequest],
    ) -> Result<Vec<ReserveOutcome>, StoreError> {
        // Orders decided again after a rebuild of some of their slots: what their earlier
        // pre-deduction still holds goes back, marked stale (a redelivery of the old claim
        // then claims again), and the claim below replaces a record naming it.
        let replaced: Vec<(String, Claim)> =
            reqs.iter().filter_map(|r| replaced_claim(r)).collect();
        if !replaced.is_empty() {
            self.release_stale(&replaced).await?;
        }
        let mut steps = self.claim(reqs).await?;
        // The claims reach the replicas before any stock is held for them: a failover
        // that lost a claim with holds taken would leave those holds to no one.
        if steps.iter().any(|s| matches!(s, Step::Claimed(_))) {
            self.wait_replicated().await?;
        }
        crate::failpoint!("producer.xslot.after_claim");
        // Refusals decided before whose holds may not have been given back yet.
        let mut release: Vec<(String, Claim)> = Vec::new();
        for (r, s) in reqs.iter().zip(&steps) {
            if let Step::Done(ReserveOutcome::Decided {
                record: OrderRecord::Refused { claim: Some(c), .. },
                ..
            }) = s
            {
                release.push((r.order_id.clone(), c.clone()));
            }
        }
        let claimed: Vec<(usize, &Claim)> = steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::Claimed(c) => Some((i, c)),
                Step::Done(_) => None,
            })
            .collect();
        let holds = self.hold(reqs, &claimed).await?;
        crate::failpoint!("producer.xslot.after_hold");
        // What each claimed order's holds say: a decision, or nothing decided.
        let mut decisions: Vec<(usize, Claim, Result<OrderRecord, ReserveOutcome>)> = Vec::new();
        let mut waiting: Vec<usize> = Vec::new();
        let mut stale: Vec<ReserveRequest> = Vec::new();
        for ((i, claim), answers) in claimed.into_iter().zip(holds) {
            if answers.iter().any(|(_, h)| *h == Hold::Unloaded) {
                // A stock slot lost its data: undecided, the claim and the holds taken
                // elsewhere kept for the next delivery (a rebuild drops them all).
                waiting.push(i);
                continue;
            }
            if answers.iter().any(|(_, h)| *h == Hold::Stale) {
                // A slot was loaded since the claim (a partial rebuild): claim again.
                stale.push(ReserveRequest {
                    order_id: reqs[i].order_id.clone(),
                    items: claim.items.clone(),
                    forced: None,
                    customer: reqs[i].customer.clone(),
                    replaces: Some(claim.token.clone()),
                });
                continue;
            }
            // Each slot answers for the first of its items that fails; the order's refusal
            // is the first of those in the order's own item order (an order without a
            // customer for a limited product before any).
            let mut refusal: Option<(usize, Reason, Option<i64>)> = None;
            let mut refuse = |reason, p: Option<i64>| {
                let at = p.map_or(0, |p| {
                    1 + claim
                        .items
                        .iter()
                        .position(|it| it.product_id == p)
                        .unwrap_or(claim.items.len())
                });
                if refusal.as_ref().is_none_or(|(first, ..)| at < *first) {
                    refusal = Some((at, reason, p));
                }
            };
            let mut undecided: Option<ReserveOutcome> = None;
            for (item_pid, h) in answers {
                match h {
                    Hold::Held => {}
                    // Orders with an unloaded slot are waiting (above).
                    Hold::Unloaded => {}
                    // Orders with a stale slot are claimed again (above).
                    Hold::Stale => {}
                    Hold::Corrupt(key) => undecided = Some(ReserveOutcome::Corrupt(key)),
                    Hold::Short(p) => refuse(Reason::InsufficientStock, Some(p)),
                    Hold::Unknown(p) => refuse(Reason::UnknownProduct, Some(p)),
                    Hold::Limit(p) => refuse(Reason::LimitExceeded, Some(p)),
                    Hold::Invalid => refuse(Reason::InvalidOrder, None),
                    // Refused before (its decision is written); the reason is the record's.
                    Hold::Freed => refuse(Reason::InsufficientStock, Some(item_pid)),
                }
            }
            let refusal = refusal.map(|(_, reason, p)| (reason, p));
            let c = claim.clone();
            let decision = match (undecided, refusal) {
                (Some(o), _) => Err(o),
                (None, Some((reason, p))) => Ok(OrderRecord::Refused {
                    reason,
                    product_id: p,
                    claim: Some(c.clone()),
                }),
                (None, None) => Ok(OrderRecord::Held {
                    token: c.token.clone(),
                    items: c.items.clone(),
                    customer: reqs[i].customer.clone(),
                }),
            };
            decisions.push((i, c, decision));
        }
        if !stale.is_empty() {
            // Their holds go back as stale, then a new claim replaces theirs; the batch
            // runs again and decides them under it (the other orders' steps are kept).
            let old: Vec<(String, Claim)> = stale.iter().filter_map(replaced_claim).collect();
            self.release_stale(&old).await?;
            let again: Vec<&ReserveRequest> = stale.iter().collect();
            self.claim(&again).await?;
            return Err(StoreError::Retry(format!(
                "{} orders across slots claimed again: a rebuild loaded some of their slots \
                 since their claim",
                stale.len()
            )));
        }
        let to_write: Vec<(usize, &Claim, &OrderRecord)> = decisions
            .iter()
            .filter_map(|(i, c, d)| d.as_ref().ok().map(|rec| (*i, c, rec)))
            .collect();
        for i in waiting {
            steps[i] = Step::Done(ReserveOutcome::Unloaded);
        }
        let written = self.decide(reqs, &to_write).await?;
        crate::failpoint!("producer.xslot.after_decide");
        for ((i, claim, _), written) in to_write.iter().zip(written) {
            let Some((fresh, record)) = written else {
                // The record's slot lost its data since the claim: undecided.
                steps[*i] = Step::Done(ReserveOutcome::Unloaded);
                continue;
            };
            let ours = matches!(&record, OrderRecord::Held { token, .. } if *token == claim.token);
            if !ours {
                release.push((reqs[*i].order_id.clone(), (*claim).clone()));
            }
            steps[*i] = Step::Done(ReserveOutcome::Decided { record, fresh });
        }
        for (i, claim, d) in decisions {
            if let Err(o) = d {
                // Nothing decided (a corrupt stock key): what it held goes back.
                release.push((reqs[i].order_id.clone(), claim));
                steps[i] = Step::Done(o);
            }
        }
        self.release(&release, None, 'F').await?;
        steps
            .into_iter()
            .map(|s| match s {
                Step::Done(o) => Ok(o),
                Step::Claimed(_) => Err(bad("decide")),
            })
            .collect()
    }

    /// Step 1: claims every order in its record's slot.
    async fn claim(&self, reqs: &[&ReserveRequest]) -> Result<Vec<Step>, StoreError> {
        let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, r) in reqs.iter().enumerate() {
            groups
                .entry(super::slots::of_record(&r.order_id))
                .or_default()
                .push(i);
        }
        let mut calls: BTreeMap<u16, Vec<redis::ScriptInvocation<'_>>> = BTreeMap::new();
        let mut members: BTreeMap<u16, Vec<Vec<usize>>> = BTreeMap::new();
        for (slot, idx) in &groups {
            let shard = Shard::Slot(*slot);
            for chunk in idx.chunks(self.orders_per_call) {
                let mut inv = CLAIM.key(shard.loaded_key());
                inv.key(shard.seq_key())
                    .arg(self.record_ttl_secs())
                    .arg(shard.token_arg());
                for &i in chunk {
                    inv.key(record_base(&reqs[i].order_id));
                }
                for &i in chunk {
                    inv.arg(&super::record_field(&reqs[i].order_id)[..])
                        .arg(encode_items(&reqs[i].items))
                        .arg(reqs[i].replaces.as_deref().unwrap_or(""));
                }
                calls.entry(*slot).or_default().push(inv);
                members.entry(*slot).or_default().push(chunk.to_vec());
            }
        }
        let replies: BTreeMap<u16, Vec<Vec<String>>> = run_per_slot(self, &CLAIM, calls).await?;
        let mut steps: Vec<Option<Step>> = (0..reqs.len()).map(|_| None).collect();
        for (slot, per_call) in replies {
            let calls = members.get(&slot).ok_or_else(|| bad("claim"))?;
            for (reply, idx) in per_call.into_iter().zip(calls) {
                if reply.first().map(String::as_str) == Some("unloaded") {
                    for &i in idx {
                        steps[i] = Some(Step::Done(ReserveOutcome::Unloaded));
                    }
                    continue;
                }
                if reply.len() != 2 * idx.len() {
                    return Err(bad("claim"));
                }
                for (&i, pair) in idx.iter().zip(reply.chunks(2)) {
                    let record = OrderRecord::decode(&pair[1])
                        .ok_or_else(|| StoreError::Protocol(format!("bad record {:?}", pair[1])))?;
                    steps[i] = Some(match (pair[0].as_str(), record) {
                        (_, OrderRecord::Pending(c)) => Step::Claimed(c),
                        ("seen", record) => Step::Done(ReserveOutcome::Decided {
                            record,
                            fresh: false,
                        }),
                        _ => return Err(bad("claim")),
                    });
                }
            }
        }
        steps
            .into_iter()
            .map(|s| s.ok_or_else(|| bad("claim")))
            .collect()
    }

    /// Step 2: holds each claim's items in each of their slots. Per claimed order, the
    /// answer of each slot with the first product asked there.
    async fn hold(
        &self,
        reqs: &[&ReserveRequest],
        claimed: &[(usize, &Claim)],
    ) -> Result<Vec<Vec<(i64, Hold)>>, StoreError> {
        // Per slot: (claimed order, its items there).
        let mut groups: BTreeMap<u16, Vec<(usize, Vec<Item>)>> = BTreeMap::new();
        for (n, (_, claim)) in claimed.iter().enumerate() {
            for (slot, part) in by_slot(&claim.items) {
                groups.entry(slot).or_default().push((n, part));
            }
        }
        let mut calls: BTreeMap<u16, Vec<redis::ScriptInvocation<'_>>> = BTreeMap::new();
        let mut members: BTreeMap<u16, Vec<Vec<(usize, i64)>>> = BTreeMap::new();
        for (slot, orders) in &groups {
            let shard = Shard::Slot(*slot);
            for chunk in orders.chunks(self.orders_per_call) {
                let mut inv = HOLD.key(shard.loaded_key());
                inv.arg(self.record_ttl_secs());
                let mut who = Vec::with_capacity(chunk.len());
                for (n, part) in chunk {
                    let (i, claim) = claimed[*n];
                    inv.key(hold_key(*slot, &reqs[i].order_id, &claim.token));
                    for it in part {
                        inv.key(stock_key(it.product_id));
                    }
                    for it in part {
                        inv.key(buyers_key(it.product_id));
                    }
                    inv.arg(&claim.token)
                        .arg(part.len())
                        .arg(encode_items(part))
                        .arg(reqs[i].customer.as_deref().unwrap_or(""));
                    for it in part {
                        inv.arg(it.quantity);
                    }
                    for it in part {
                        inv.arg(it.product_id);
                    }
                    who.push((*n, part.first().map_or(0, |it| it.product_id)));
                }
                calls.entry(*slot).or_default().push(inv);
                members.entry(*slot).or_default().push(who);
            }
        }
        let replies: BTreeMap<u16, Vec<Vec<String>>> = run_per_slot(self, &HOLD, calls).await?;
        let mut out: Vec<Vec<(i64, Hold)>> = vec![Vec::new(); claimed.len()];
        for (slot, per_call) in replies {
            let calls = members.get(&slot).ok_or_else(|| bad("hold"))?;
            for (reply, who) in per_call.into_iter().zip(calls) {
                if reply.first().map(String::as_str) == Some("unloaded") {
                    // Not loaded: these orders cannot be decided until a rebuild.
                    for &(n, first) in who {
                        out[n].push((first, Hold::Unloaded));
                    }
                    continue;
                }
                if reply.len() != 2 * who.len() {
                    return Err(bad("hold"));
                }
                for (&(n, first), pair) in who.iter().zip(reply.chunks(2)) {
                    let pid = || pair[1].parse::<i64>().map_err(|_| bad("hold"));
                    let h = match pair[0].as_str() {
                        "held" => Hold::Held,
                        "freed" => Hold::Freed,
                        "stale" => Hold::Stale,
                        "short" => Hold::Short(pid()?),
                        "unknown" => Hold::Unknown(pid()?),
                        "corrupt" => Hold::Corrupt(pair[1].clone()),
                        "limit" => Hold::Limit(pid()?),
                        "invalid" => Hold::Invalid,
                        _ => return Err(bad("hold")),
                    };
                    out[n].push((first, h));
                }
            }
        }
        // Slots answer in slot order; a refusal names the first item that failed in the
        // order's own item order.
        for ((_, claim), answers) in claimed.iter().zip(out.iter_mut()) {
            answers.sort_by_key(|(pid, _)| {
                claim
                    .items
                    .iter()
                    .position(|it| it.product_id == *pid)
                    .unwrap_or(usize::MAX)
            });
        }
        Ok(out)
    }

    /// Step 3: writes each decision over its claim (`P|<token>|`) unless another decision
    /// is there. Per order: whether written now, and the order's one decision.
    async fn decide(
        &self,
        reqs: &[&ReserveRequest],
        decisions: &[(usize, &Claim, &OrderRecord)],
    ) -> Result<Vec<Option<(bool, OrderRecord)>>, StoreError> {
        let swaps: Vec<(String, String, String)> = decisions
            .iter()
            .map(|(i, claim, rec)| {
                (
                    reqs[*i].order_id.clone(),
                    format!("P|{}|", claim.token),
                    rec.encode(),
                )
            })
            .collect();
        let answers = self.swap(&swaps).await?;
        answers
            .into_iter()
            .map(|a| match a {
                Swap::New(rec) | Swap::Seen(rec) if matches!(rec, OrderRecord::Pending(_)) => Err(
                    StoreError::Retry("a claim changed under its decision".into()),
                ),
                Swap::New(rec) => Ok(Some((true, rec))),
                Swap::Seen(rec) => Ok(Some((false, rec))),
                Swap::Lost => Err(StoreError::Retry(
                    "an order's claim is gone (a rebuild dropped it)".into(),
                )),
                Swap::Unloaded => Ok(None),
            })
            .collect()
    }

    /// Runs `lua/swap.lua` for each (order id, expected prefix, new record).
    async fn swap(&self, swaps: &[(String, String, String)]) -> Result<Vec<Swap>, StoreError> {
        let mut groups: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (i, (id, _, _)) in swaps.iter().enumerate() {
            groups
                .entry(super::slots::of_record(id))
                .or_default()
                .push(i);
        }
        let mut calls: BTreeMap<u16, Vec<redis::ScriptInvocation<'_>>> = BTreeMap::new();
        let mut members: BTreeMap<u16, Vec<Vec<usize>>> = BTreeMap::new();
        for (slot, idx) in &groups {
            for chunk in idx.chunks(self.orders_per_call) {
                let mut inv = SWAP.key(Shard::Slot(*slot).loaded_key());
                for &i in chunk {
                    inv.key(record_base(&swaps[i].0));
                }
                for &i in chunk {
                    inv.arg(&super::record_field(&swaps[i].0)[..])
                        .arg(&swaps[i].1)
                        .arg(&swaps[i].2);
                }
                calls.entry(*slot).or_default().push(inv);
                members.entry(*slot).or_default().push(chunk.to_vec());
            }
        }
        let replies: BTreeMap<u16, Vec<Vec<String>>> = run_per_slot(self, &SWAP, calls).await?;
        let mut out: Vec<Option<Swap>> = (0..swaps.len()).map(|_| None).collect();
        for (slot, per_call) in replies {
            let calls = members.get(&slot).ok_or_else(|| bad("swap"))?;
            for (reply, idx) in per_call.into_iter().zip(calls) {
                if reply.first().map(String::as_str) == Some("unloaded") {
                    for &i in idx {
                        out[i] = Some(Swap::Unloaded);
                    }
                    continue;
                }
                if reply.len() != 2 * idx.len() {
                    return Err(bad("swap"));
                }
                for (&i, pair) in idx.iter().zip(reply.chunks(2)) {
                    let rec = || {
                        OrderRecord::decode(&pair[1]).ok_or_else(|| {
                            StoreError::Protocol(format!("bad record {:?}", pair[1]))
                        })
                    };
                    out[i] = Some(match pair[0].as_str() {
                        "new" => Swap::New(rec()?),
                        "seen" => Swap::Seen(rec()?),
                        "lost" => Swap::Lost,
                        _ => return Err(bad("swap")),
                    });
                }
            }
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| bad("swap")))
            .collect()
    }

    /// Gives back the holds of claims whose token went stale (a slot of theirs was loaded
    /// since), in each slot not loaded since their token's generation, marking them `S`.
    async fn release_stale(&self, claims: &[(String, Claim)]) -> Result<(), StoreError> {
        self.release_in_own_generation(claims, 'S').await?;
        // Given back, the claim not yet replaced: a redelivery meets `S` holds, `stale`.
        crate::failpoint!("producer.xslot.after_stale_release");
        Ok(())
    }

    /// [`Self::release`] of each claim in its token's generation (a slot loaded since has
    /// no hold of it), marking each released hold `mark`.
    async fn release_in_own_generation(
        &self,
        claims: &[(String, Claim)],
        mark: char,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        let gens: Vec<Option<i64>> = claims
            .iter()
            .map(|(_, c)| Token::parse(&c.token).map(|t| t.gen))
            .collect();
        self.release(claims, Some(&gens), mark).await
    }

    /// Step 4 (and a give-back's first step): gives back each claim's holds in every slot
    /// of its items, in generation `gen` (None: any), marking each released hold `mark`
    /// (`lua/release.lua`). Per claim, each slot's answer (`unloaded` for a slot that lost
    /// its data).
    async fn release(
        &self,
        claims: &[(String, Claim)],
        gen: Option<&[Option<i64>]>,
        mark: char,
    ) -> Result<Vec<Vec<String>>, StoreError> {
        let mut groups: BTreeMap<u16, Vec<(usize, Vec<Item>)>> = BTreeMap::new();
        for (n, (_, claim)) in claims.iter().enumerate() {
            for (slot, part) in by_slot(&claim.items) {
                groups.entry(slot).or_default().push((n, part));
            }
        }
        let mut calls: BTreeMap<u16, Vec<redis::ScriptInvocation<'_>>> = BTreeMap::new();
        let mut members: BTreeMap<u16, Vec<Vec<usize>>> = BTreeMap::new();
        for (slot, orders) in &groups {
            let shard = Shard::Slot(*slot);
            for chunk in orders.chunks(self.orders_per_call) {
                let mut inv = RELEASE.key(shard.loaded_key());
                inv.key(shard.epoch_key());
                let mut who = Vec::with_capacity(chunk.len());
                for (n, part) in chunk {
                    let (order_id, claim) = &claims[*n];
                    inv.key(hold_key(*slot, order_id, &claim.token));
                    for it in part {
                        inv.key(stock_key(it.product_id));
                    }
                    for it in part {
                        inv.key(buyers_key(it.product_id));
                    }
                    let g = gen
                        .and_then(|g| g.get(*n).copied().flatten())
                        .map(|g| g.to_string())
                        .unwrap_or_default();
                    inv.arg(g).arg(mark.to_string()).arg(part.len());
                    for it in part {
                        inv.arg(it.quantity);
                    }
                    who.push(*n);
                }
                calls.entry(*slot).or_default().push(inv);
                members.entry(*slot).or_default().push(who);
            }
        }
        let replies: BTreeMap<u16, Vec<Vec<String>>> = run_per_slot(self, &RELEASE, calls).await?;
        let mut out: Vec<Vec<String>> = vec![Vec::new(); claims.len()];
        for (slot, per_call) in replies {
            let calls = members.get(&slot).ok_or_else(|| bad("release"))?;
            for (reply, who) in per_call.into_iter().zip(calls) {
                if reply.first().map(String::as_str) == Some("unloaded") {
                    // The slot lost its data, holds with it: nothing to give back there
                    // (a rebuild loads its stock from PostgreSQL).
                    for &n in who {
                        out[n].push("unloaded".to_owned());
                    }
                    continue;
                }
                if reply.len() != who.len() {
                    return Err(bad("release"));
                }
                for (&n, kind) in who.iter().zip(reply) {
                    out[n].push(kind);
                }
            }
        }
        Ok(out)
    }

    /// Part of a partial rebuild in generation `gen` of `slots`
    /// ([`RedisStore::forget_slots`]): every hold still taken outside `slots`, named before
    /// `gen`, of an order whose record lives in `slots`: the order id, and the claim with
    /// the hold's items.
    pub(super) async fn holds_of_lost_records(
        &self,
        gen: i64,
        slots: &std::collections::BTreeSet<u16>,
    ) -> Result<Vec<(String, Claim)>, StoreError> {
        let mut found: Vec<(String, String, String)> = Vec::new();
        for key in self.scan_all("stockpipe:hold:*").await? {
            if slots.contains(&super::slots::slot(&key)) {
                continue;
            }
            let Some((order_id, token)) = parse_hold_key(&key) else {
                continue;
            };
            let older = Token::parse(token).is_some_and(|t| t.gen < gen);
            if older && slots.contains(&super::slots::of_record(order_id)) {
                let (o, t) = (order_id.to_owned(), token.to_owned());
                found.push((key, o, t));
            }
        }
        let mut out = Vec::new();
        for chunk in found.chunks(1000) {
            let keys: Vec<&str> = chunk.iter().map(|(k, ..)| k.as_str()).collect();
            let values: Vec<Option<String>> =
                redis::AsyncCommands::mget(&mut self.conn(), &keys).await?;
            for ((_, order_id, token), v) in chunk.iter().zip(values) {
                // Only a hold still taken ('H|<items>[|<customer>]').
                let Some(items) = v.as_deref().and_then(|v| v.strip_prefix("H|")) else {
                    continue;
                };
                let items = items.split('|').next().unwrap_or("");
                let items = super::decode_items(items)
                    .ok_or_else(|| StoreError::Protocol(format!("bad hold {v:?}")))?;
                let claim = Claim {
                    token: token.clone(),
                    items,
                };
                out.push((order_id.clone(), claim));
            }
        }
        Ok(out)
    }

    /// Gives back the holds of `claims` (order id, claim: each in the slots of its items,
    /// at most once: `H` to `F`). Returns how many went back now.
    pub async fn release_holds(&self, claims: &[(String, Claim)]) -> Result<usize, StoreError> {
        let answers = self.release_in_own_generation(claims, 'F').await?;
        Ok(answers
            .iter()
            .filter(|a| a.iter().any(|k| k == "released"))
            .count())
    }

    /// [`RedisStore::restore_many`] on a cluster: orders in one slot by `lua/restore.lua`;
    /// held orders across slots release their holds, then their record becomes `C`.
    pub(super) async fn restore_on_cluster(
        &self,
        reqs: &[Compensation],
    ) -> Result<Vec<RestoreOutcome>, StoreError> {
        let mut out: Vec<Option<RestoreOutcome>> = vec![None; reqs.len()];
        let (single, across) = split_by_slot(
            reqs.iter()
                .map(|c| (c.order_id.as_str(), c.items.as_slice(), false)),
        );
        let trips = single.iter().flat_map(|(slot, idx)| {
            idx.chunks(PIPELINE_CHUNK).map(move |chunk| {
                let group: Vec<Compensation> = chunk.iter().map(|&i| reqs[i].clone()).collect();
                async move {
                    let got = self.restore_chunk(Shard::Slot(*slot), &group).await?;
                    Ok::<_, StoreError>((chunk, got))
                }
            })
        });
        for (chunk, got) in futures::future::try_join_all(trips).await? {
            for (&i, o) in chunk.iter().zip(got) {
                out[i] = Some(o);
            }
        }
        if !across.is_empty() {
            let group: Vec<&Compensation> = across.iter().map(|&i| &reqs[i]).collect();
            for (i, o) in across.iter().zip(self.restore_across(&group).await?) {
                out[*i] = Some(o);
            }
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| bad("restore")))
            .collect()
    }

    async fn restore_across(
        &self,
        reqs: &[&Compensation],
    ) -> Result<Vec<RestoreOutcome>, StoreError> {
        // Read each record with its slot's marker (one slot: one pipeline each).
        let reads = reqs.iter().map(|c| async move {
            let read = self.read_record(&c.order_id).await?;
            Ok::<_, StoreError>((read.marker, read.record))
        });
        let read = futures::future::try_join_all(reads).await?;
        let mut out: Vec<Option<RestoreOutcome>> = vec![None; reqs.len()];
        type Release = (usize, String, Vec<Item>, Option<String>);
        let mut to_release: Vec<Release> = Vec::new();
        for (i, (c, (marker, rec))) in reqs.iter().zip(read).enumerate() {
            let Some(marker) = marker else {
                out[i] = Some(RestoreOutcome::Unloaded);
                continue;
            };
            let loaded = super::slots::Marker::parse(&marker)
                .ok_or_else(|| StoreError::Protocol(format!("bad loaded marker {marker:?}")))?
                .loaded;
            if c.gen.is_some_and(|g| g < loaded) {
                out[i] = Some(RestoreOutcome::Stale);
                continue;
            }
            let Some(rec) = rec else {
                out[i] = Some(RestoreOutcome::Unknown);
                continue;
            };
            let record = OrderRecord::decode(&rec)
                .ok_or_else(|| StoreError::Protocol(format!("bad record {rec:?}")))?;
            out[i] = Some(match record {
                OrderRecord::Held { token, .. } | OrderRecord::Returned { token, .. }
                    if c.token.as_ref().is_some_and(|t| *t != token) =>
                {
                    RestoreOutcome::Other
                }
                OrderRecord::Returned { .. } => RestoreOutcome::Already,
                OrderRecord::Held { items, .. }
                    if encode_items(&items) != encode_items(&c.items) =>
                {
                    RestoreOutcome::Mismatch
                }
                OrderRecord::Held {
                    token,
                    items,
                    customer,
                } => {
                    to_release.push((i, token, items, customer));
                    continue;
                }
                OrderRecord::Refused { .. } | OrderRecord::Pending(_) => RestoreOutcome::NotHeld,
            });
        }
        let claims: Vec<(String, Claim)> = to_release
            .iter()
            .map(|(i, token, items, _)| {
                (
                    reqs[*i].order_id.clone(),
                    Claim {
                        token: token.clone(),
                        items: items.clone(),
                    },
                )
            })
            .collect();
        let gens: Vec<Option<i64>> = to_release.iter().map(|(i, ..)| reqs[*i].gen).collect();
        let released = self.release(&claims, Some(&gens), 'F').await?;
        crate::failpoint!("producer.xslot.restore_after_release");
        // A slot that lost its data leaves the give-back undone (the record stays `H`): it
        // is redone after the rebuild, where it is stale.
        let complete: Vec<usize> = (0..claims.len())
            .filter(|&n| !released[n].iter().any(|k| k == "unloaded"))
            .collect();
        let swaps: Vec<(String, String, String)> = complete
            .iter()
            .map(|&n| {
                let (id, c) = &claims[n];
                (
                    id.clone(),
                    format!("R|{}|", c.token),
                    OrderRecord::Returned {
                        token: c.token.clone(),
                        items: c.items.clone(),
                        customer: to_release[n].3.clone(),
                    }
                    .encode(),
                )
            })
            .collect();
        let mut swapped: Vec<Option<Swap>> = (0..claims.len()).map(|_| None).collect();
        for (&n, sw) in complete.iter().zip(self.swap(&swaps).await?) {
            swapped[n] = Some(sw);
        }
        for (((i, ..), kinds), s) in to_release.iter().zip(released).zip(swapped) {
            out[*i] = Some(if kinds.iter().any(|k| k == "stale") {
                RestoreOutcome::Stale
            } else {
                match s {
                    None | Some(Swap::Unloaded) => RestoreOutcome::Unloaded,
                    Some(Swap::Lost) => RestoreOutcome::Unknown,
                    _ if kinds.iter().any(|k| k == "released") => RestoreOutcome::Restored,
                    _ => RestoreOutcome::Already,
                }
            });
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| bad("restore")))
            .collect()
    }
}

/// The claim an order decided again replaces (`ReserveRequest::replaces`), with the
/// request's items: the holds to give back before claiming again.
fn replaced_claim(r: &ReserveRequest) -> Option<(String, Claim)> {
    let claim = Claim {
        token: r.replaces.clone()?,
        items: r.items.clone(),
    };
    Some((r.order_id.clone(), claim))
}

/// What `lua/swap.lua` answered for one record.
enum Swap {
    New(OrderRecord),
    Seen(OrderRecord),
    Lost,
    Unloaded,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_keys_name_their_order_and_token() {
        let k = hold_key(4242, "shop:o-1", "7.123");
        assert_eq!(parse_hold_key(&k), Some(("shop:o-1", "7.123")));
        assert_eq!(parse_hold_key("stockpipe:rec:{o1}:i"), None);
    }
}
