//! Every message the pipeline reads or writes, and the rules that decide whether an
//! incoming order event is valid. Producer and consumer both use these types, so the wire
//! formats cannot drift apart.
//!
//! * [`parse_order_event`] reads the bytes of the `orders` topic and classifies them
//!   (contract: "Order events").
//! * [`StockResult`] is the JSON on `stock.results` (contract: "Results").
//! * [`DeductCommand`] (`stock.deduct`) and [`Compensation`] (`stock.compensate`) are the
//!   project's own internal events.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;

/// Longest valid order id, in characters (contract).
pub const MAX_ORDER_ID_LEN: usize = 128;
/// Longest order id that is still "readable": such an id gets an `invalid_order` result.
/// Anything longer is treated as garbage and dead-lettered, so that a result never
/// carries an unbounded string.
pub const MAX_READABLE_ORDER_ID_LEN: usize = 1024;
/// Most items in one order (contract).
pub const MAX_ITEMS: usize = 100;
/// Largest quantity of one item (contract).
pub const MAX_QUANTITY: i64 = 1_000_000;

/// One line of an order: `quantity` units of `product_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Item {
    pub product_id: i64,
    pub quantity: i64,
}

/// A valid event of the `orders` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Created { order_id: String, items: Vec<Item> },
    Paid { order_id: String },
    Cancelled { order_id: String },
}

impl OrderEvent {
    pub fn order_id(&self) -> &str {
        match self {
            OrderEvent::Created { order_id, .. }
            | OrderEvent::Paid { order_id }
            | OrderEvent::Cancelled { order_id } => order_id,
        }
    }
}

/// The three kinds of order event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Created,
    Paid,
    Cancelled,
}

/// What a message of the `orders` topic turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A valid event.
    Valid(OrderEvent),
    /// An event of a known type whose `order_id` can be read but that breaks a rule.
    /// It gets `rejected`/`invalid_order` (created) or `ignored`/`not_reserved` (paid,
    /// cancelled); `detail` is for logs only.
    Invalid {
        kind: EventType,
        order_id: String,
        detail: String,
    },
    /// Not an order event at all: goes to the dead-letter topic with this reason.
    Garbage(String),
}

/// Classifies the bytes of one `orders` message. Never fails: every input gets a verdict.
pub fn parse_order_event(bytes: &[u8]) -> Parsed {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Parsed::Garbage(format!("not JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return Parsed::Garbage("not a JSON object".into());
    };
    let order_id = match obj.get("order_id") {
        Some(Value::String(s))
            if !s.is_empty() && s.chars().count() <= MAX_READABLE_ORDER_ID_LEN =>
        {
            s.clone()
        }
        Some(Value::String(_)) => {
            return Parsed::Garbage("order_id empty or too long to read".into())
        }
        Some(_) => return Parsed::Garbage("order_id is not a string".into()),
        None => return Parsed::Garbage("no order_id".into()),
    };
    let kind = match obj.get("type").and_then(Value::as_str) {
        Some("order_created") => EventType::Created,
        Some("order_paid") => EventType::Paid,
        Some("order_cancelled") => EventType::Cancelled,
        Some(other) => return Parsed::Garbage(format!("unknown type {other:?}")),
        None => return Parsed::Garbage("no type".into()),
    };
    let invalid = |detail: String| Parsed::Invalid {
        kind,
        order_id: order_id.clone(),
        detail,
    };
    if let Err(detail) = validate_order_id(&order_id) {
        return invalid(detail);
    }
    match kind {
        EventType::Paid => Parsed::Valid(OrderEvent::Paid { order_id }),
        EventType::Cancelled => Parsed::Valid(OrderEvent::Cancelled { order_id }),
        EventType::Created => match parse_items(obj.get("items")) {
            Ok(items) => Parsed::Valid(OrderEvent::Created { order_id, items }),
            Err(detail) => invalid(detail),
        },
    }
}

/// Contract: 1 to 128 characters of `A-Z a-z 0-9 - _ . :`.
pub fn validate_order_id(id: &str) -> Result<(), String> {
    let len = id.chars().count();
    if len == 0 || len > MAX_ORDER_ID_LEN {
        return Err(format!(
            "order_id has {len} characters, allowed 1 to {MAX_ORDER_ID_LEN}"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!("order_id contains {c:?}"));
    }
    Ok(())
}

fn parse_items(value: Option<&Value>) -> Result<Vec<Item>, String> {
    let Some(Value::Array(raw)) = value else {
        return Err("items missing or not an array".into());
    };
    if raw.is_empty() || raw.len() > MAX_ITEMS {
        return Err(format!("{} items, allowed 1 to {MAX_ITEMS}", raw.len()));
    }
    let mut seen = HashSet::with_capacity(raw.len());
    let mut items = Vec::with_capacity(raw.len());
    for (i, entry) in raw.iter().enumerate() {
        let product_id = entry
            .get("product_id")
            .and_then(Value::as_i64)
            .filter(|p| *p >= 1)
            .ok_or_else(|| format!("item {i}: product_id must be an integer from 1 to 2^63-1"))?;
        let quantity = entry
            .get("quantity")
            .and_then(Value::as_i64)
            .filter(|q| (1..=MAX_QUANTITY).contains(q))
            .ok_or_else(|| {
                format!("item {i}: quantity must be an integer from 1 to {MAX_QUANTITY}")
            })?;
        if !seen.insert(product_id) {
            return Err(format!("product {product_id} appears twice"));
        }
        items.push(Item {
            product_id,
            quantity,
        });
    }
    Ok(items)
}

/// `status` of a result (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Reserved,
    Rejected,
    Confirmed,
    Released,
    Ignored,
}

/// `reason` of a result (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    InsufficientStock,
    UnknownProduct,
    InvalidOrder,
    Cancelled,
    Expired,
    NotReserved,
    AlreadyReleased,
    AlreadyConfirmed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InsufficientStock => "insufficient_stock",
            Reason::UnknownProduct => "unknown_product",
            Reason::InvalidOrder => "invalid_order",
            Reason::Cancelled => "cancelled",
            Reason::Expired => "expired",
            Reason::NotReserved => "not_reserved",
            Reason::AlreadyReleased => "already_released",
            Reason::AlreadyConfirmed => "already_confirmed",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Some(match s {
            "insufficient_stock" => Reason::InsufficientStock,
            "unknown_product" => Reason::UnknownProduct,
            "invalid_order" => Reason::InvalidOrder,
            "cancelled" => Reason::Cancelled,
            "expired" => Reason::Expired,
            "not_reserved" => Reason::NotReserved,
            "already_released" => Reason::AlreadyReleased,
            "already_confirmed" => Reason::AlreadyConfirmed,
            _ => return None,
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message of `stock.results` (contract).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StockResult {
    pub order_id: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<i64>,
}

impl StockResult {
    pub fn reserved(order_id: &str) -> Self {
        Self::new(order_id, Status::Reserved, None, None)
    }

    /// A `rejected` result; `product_id` names the first item short, where there is one.
    pub fn rejected(order_id: &str, reason: Reason, product_id: Option<i64>) -> Self {
        Self::new(order_id, Status::Rejected, Some(reason), product_id)
    }

    pub fn new(
        order_id: &str,
        status: Status,
        reason: Option<Reason>,
        product_id: Option<i64>,
    ) -> Self {
        StockResult {
            order_id: order_id.to_owned(),
            status,
            reason,
            product_id,
        }
    }
}

/// Version of the internal event formats; a consumer dead-letters versions it does not know.
pub const INTERNAL_VERSION: u32 = 1;

/// A message of `stock.deduct`, written by the producer for the consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DeductCommand {
    /// The order's items were pre-deducted in Redis; reserve them in PostgreSQL. `token`
    /// names that pre-deduction (`<generation>.<sequence>`, see [`Token`]): the ledger
    /// keeps the token it applied, so a deduct with another token is a second
    /// pre-deduction of the same order, given back rather than applied. Absent in
    /// commands written before tokens existed (treated as a redelivery).
    Reserve {
        v: u32,
        order_id: String,
        items: Vec<Item>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Redis refused the order (or it was invalid): PostgreSQL records the refusal, so that
    /// the order id keeps this one outcome for good, and the consumer publishes it.
    Refuse {
        v: u32,
        order_id: String,
        reason: Reason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        product_id: Option<i64>,
    },
    /// `order_paid` from the order service. `event` names the `orders` message it came
    /// from (`p<partition>@<offset>`), so that its redelivery is told apart from a second
    /// payment.
    Pay {
        v: u32,
        order_id: String,
        event: String,
    },
    /// `order_cancelled` from the order service; `event` as for `Pay`.
    Cancel {
        v: u32,
        order_id: String,
        event: String,
    },
}

impl DeductCommand {
    pub fn order_id(&self) -> &str {
        match self {
            DeductCommand::Reserve { order_id, .. }
            | DeductCommand::Refuse { order_id, .. }
            | DeductCommand::Pay { order_id, .. }
            | DeductCommand::Cancel { order_id, .. } => order_id,
        }
    }

    pub fn version(&self) -> u32 {
        match self {
            DeductCommand::Reserve { v, .. }
            | DeductCommand::Refuse { v, .. }
            | DeductCommand::Pay { v, .. }
            | DeductCommand::Cancel { v, .. } => *v,
        }
    }
}

/// A pre-deduction's name, `<generation>.<sequence>`: the Redis generation (the value of
/// the loaded marker, advanced by every rebuild) it was taken in, and a sequence number
/// unique within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub gen: i64,
    pub seq: i64,
}

impl Token {
    /// Reads `"<gen>.<seq>"`; None for anything else (a legacy empty token).
    pub fn parse(s: &str) -> Option<Token> {
        let (g, q) = s.split_once('.')?;
        Some(Token {
            gen: g.parse().ok()?,
            seq: q.parse().ok()?,
        })
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.gen, self.seq)
    }
}

/// Why stock goes back to Redis, or what else the consumer asks of the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompensationCause {
    /// PostgreSQL refused the reservation that Redis had granted.
    Rejected,
    /// The reservation was cancelled; PostgreSQL already made the stock available.
    Cancelled,
    /// The reservation expired; PostgreSQL already made the stock available.
    Expired,
    /// A second pre-deduction of an order PostgreSQL had already decided (its Redis record
    /// was forgotten, or the order id came again): give that pre-deduction back.
    Duplicate,
    /// Not a give-back: the order's pre-deduction was taken in a Redis generation that a
    /// rebuild has since replaced, before PostgreSQL applied it. Decide the order again,
    /// with these items, in the current generation.
    Redecide,
}

/// A message of `stock.compensate`, written by the consumer for the producer: give one
/// pre-deduction of an order back to Redis, at most once (or, [`CompensationCause::Redecide`],
/// decide the order again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compensation {
    pub v: u32,
    pub order_id: String,
    pub items: Vec<Item>,
    pub cause: CompensationCause,
    /// The pre-deduction to give back; it is given back only while the order's Redis record
    /// holds that very token. Absent in compensations written before tokens existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The Redis generation of the PostgreSQL change behind this compensation: in any
    /// other generation, Redis was loaded from a snapshot that already holds the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<i64>,
}

/// The canonical text form of an order's items, `"42:2,7:1"`, as kept in Redis so that a
/// redelivered order is always handled with the items it was first decided with.
pub fn encode_items(items: &[Item]) -> String {
    let mut s = String::with_capacity(items.len() * 8);
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&it.product_id.to_string());
        s.push(':');
        s.push_str(&it.quantity.to_string());
    }
    s
}

/// Inverse of [`encode_items`].
pub fn decode_items(s: &str) -> Option<Vec<Item>> {
    s.split(',')
        .map(|pair| {
            let (p, q) = pair.split_once(':')?;
            Some(Item {
                product_id: p.parse().ok()?,
                quantity: q.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_detail(json: &str) -> String {
        match parse_order_event(json.as_bytes()) {
            Parsed::Invalid { detail, .. } => detail,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn parses_contract_examples() {
        let created = parse_order_event(
            br#"{"type":"order_created","order_id":"A-1001","items":[{"product_id":42,"quantity":2},{"product_id":7,"quantity":1}],"extra":true}"#,
        );
        assert_eq!(
            created,
            Parsed::Valid(OrderEvent::Created {
                order_id: "A-1001".into(),
                items: vec![
                    Item {
                        product_id: 42,
                        quantity: 2
                    },
                    Item {
                        product_id: 7,
                        quantity: 1
                    }
                ]
            })
        );
        assert_eq!(
            parse_order_event(br#"{"type":"order_paid","order_id":"A-1001"}"#),
            Parsed::Valid(OrderEvent::Paid {
                order_id: "A-1001".into()
            })
        );
        assert_eq!(
            parse_order_event(br#"{"type":"order_cancelled","order_id":"a_b.c:d-9"}"#),
            Parsed::Valid(OrderEvent::Cancelled {
                order_id: "a_b.c:d-9".into()
            })
        );
    }

    #[test]
    fn garbage_goes_to_dlq() {
        for bytes in [
            &b"\xff\xfe not json"[..],
            b"[1,2]",
            b"{\"type\":\"order_created\"}",
            b"{\"type\":\"order_created\",\"order_id\":17}",
            b"{\"type\":\"order_shipped\",\"order_id\":\"A-1\"}",
            b"{\"order_id\":\"A-1\"}",
            b"{\"type\":\"order_paid\",\"order_id\":\"\"}",
        ] {
            assert!(
                matches!(parse_order_event(bytes), Parsed::Garbage(_)),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn rule_breakers_are_invalid_with_their_order_id() {
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A 1","items":[{"product_id":1,"quantity":1}]}"#
        )
        .contains("' '"));
        let long = "x".repeat(129);
        assert!(
            invalid_detail(&format!(r#"{{"type":"order_paid","order_id":"{long}"}}"#))
                .contains("129")
        );
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A1","items":[{"product_id":1,"quantity":0}]}"#
        )
        .contains("quantity"));
        assert!(invalid_detail(r#"{"type":"order_created","order_id":"A1","items":[{"product_id":1,"quantity":1000001}]}"#).contains("quantity"));
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A1","items":[{"product_id":0,"quantity":1}]}"#
        )
        .contains("product_id"));
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A1","items":[{"product_id":1.5,"quantity":1}]}"#
        )
        .contains("product_id"));
        assert!(invalid_detail(r#"{"type":"order_created","order_id":"A1","items":[{"product_id":9223372036854775808,"quantity":1}]}"#).contains("product_id"));
        assert!(
            invalid_detail(r#"{"type":"order_created","order_id":"A1","items":[]}"#)
                .contains("0 items")
        );
        assert!(invalid_detail(r#"{"type":"order_created","order_id":"A1"}"#).contains("items"));
        assert!(invalid_detail(r#"{"type":"order_created","order_id":"A1","items":[{"product_id":3,"quantity":1},{"product_id":3,"quantity":2}]}"#).contains("twice"));
        let many: Vec<String> = (1..=101)
            .map(|p| format!(r#"{{"product_id":{p},"quantity":1}}"#))
            .collect();
        assert!(invalid_detail(&format!(
            r#"{{"type":"order_created","order_id":"A1","items":[{}]}}"#,
            many.join(",")
        ))
        .contains("101 items"));
    }

    #[test]
    fn limits_are_inclusive() {
        let id = "x".repeat(128);
        let max: Vec<String> = (1..=100)
            .map(|p| format!(r#"{{"product_id":{p},"quantity":1000000}}"#))
            .collect();
        let json = format!(
            r#"{{"type":"order_created","order_id":"{id}","items":[{}]}}"#,
            max.join(",")
        );
        assert!(matches!(
            parse_order_event(json.as_bytes()),
            Parsed::Valid(_)
        ));
        let big = r#"{"type":"order_created","order_id":"A","items":[{"product_id":9223372036854775807,"quantity":1}]}"#;
        assert!(matches!(
            parse_order_event(big.as_bytes()),
            Parsed::Valid(_)
        ));
    }

    #[test]
    fn results_serialize_as_in_contract() {
        let r = StockResult::rejected("A-1002", Reason::InsufficientStock, Some(42));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"order_id":"A-1002","status":"rejected","reason":"insufficient_stock","product_id":42}"#
        );
        assert_eq!(
            serde_json::to_string(&StockResult::reserved("A-1001")).unwrap(),
            r#"{"order_id":"A-1001","status":"reserved"}"#
        );
        let released = StockResult::new("A-1003", Status::Released, Some(Reason::Expired), None);
        assert_eq!(
            serde_json::to_string(&released).unwrap(),
            r#"{"order_id":"A-1003","status":"released","reason":"expired"}"#
        );
    }

    #[test]
    fn items_round_trip() {
        let items = vec![
            Item {
                product_id: 42,
                quantity: 2,
            },
            Item {
                product_id: i64::MAX,
                quantity: 1,
            },
        ];
        assert_eq!(decode_items(&encode_items(&items)), Some(items));
        assert_eq!(decode_items("1:x"), None);
    }

    #[test]
    fn deduct_command_wire_format() {
        let cmd = DeductCommand::Reserve {
            v: 1,
            order_id: "A".into(),
            items: vec![Item {
                product_id: 1,
                quantity: 2,
            }],
            token: None,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert_eq!(
            json,
            r#"{"op":"reserve","v":1,"order_id":"A","items":[{"product_id":1,"quantity":2}]}"#
        );
        assert_eq!(serde_json::from_str::<DeductCommand>(&json).unwrap(), cmd);
    }
}
