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
    /// `customer_id` (contract "Per-customer limits"): whose limits the order counts
    /// against; an order without one cannot buy a limited product.
    Created {
        order_id: String,
        items: Vec<Item>,
        customer_id: Option<String>,
    },
    Paid {
        order_id: String,
    },
    Cancelled {
        order_id: String,
    },
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
///
/// The type and the order id are read first, by a top-level scanner that skips every
/// other value without recursion (see [`json`]); only then is the rest judged. serde_json
/// alone would give up on the whole document for a number out of `f64` range (`1e400`) or
/// nesting deeper than 128, anywhere in it, and so dead-letter an order whose id is
/// readable: the contract wants such an order answered (`invalid_order`), and an unknown
/// field ignored however deep it is.
pub fn parse_order_event(bytes: &[u8]) -> Parsed {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return Parsed::Garbage(format!(
                "not JSON: invalid UTF-8 at byte {}",
                e.valid_up_to()
            ))
        }
    };
    let members = match json::object_members(text) {
        Ok(m) => m,
        Err(json::Error::NotObject) => return Parsed::Garbage("not a JSON object".into()),
        Err(json::Error::Syntax(e)) => return Parsed::Garbage(format!("not JSON: {e}")),
    };
    // Of a key given twice the last one counts, as with serde_json's map.
    let field = |name: &str| {
        members
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    };
    let order_id = match field("order_id").map(json::string) {
        // Contract: readable means a non-empty JSON string of at most 1,024 bytes.
        Some(Ok(Some(s))) if !s.is_empty() && s.len() <= MAX_READABLE_ORDER_ID_LEN => {
            s.into_owned()
        }
        Some(Ok(Some(_))) => return Parsed::Garbage("order_id empty or too long to read".into()),
        Some(Ok(None)) => return Parsed::Garbage("order_id is not a string".into()),
        Some(Err(e)) => return Parsed::Garbage(format!("not JSON: order_id: {e}")),
        None => return Parsed::Garbage("no order_id".into()),
    };
    let kind = match field("type").map(json::string) {
        Some(Ok(Some(t))) => match t.as_ref() {
            "order_created" => EventType::Created,
            "order_paid" => EventType::Paid,
            "order_cancelled" => EventType::Cancelled,
            other => return Parsed::Garbage(format!("unknown type {other:?}")),
        },
        Some(Err(e)) => return Parsed::Garbage(format!("not JSON: type: {e}")),
        Some(Ok(None)) | None => return Parsed::Garbage("no type".into()),
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
        EventType::Created => {
            match parse_items(field("items"))
                .and_then(|items| Ok((items, parse_customer(field("customer_id"))?)))
            {
                Ok((items, customer_id)) => Parsed::Valid(OrderEvent::Created {
                    order_id,
                    items,
                    customer_id,
                }),
                Err(detail) => invalid(detail),
            }
        }
    }
}

/// The optional `customer_id` of an `order_created`: absent (or `null`) is none; present,
/// it follows the rules of `order_id` (contract).
fn parse_customer(raw: Option<&str>) -> Result<Option<String>, String> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.trim() == "null" {
        return Ok(None);
    }
    match json::string(raw) {
        Ok(Some(s)) => {
            validate_id("customer_id", &s)?;
            Ok(Some(s.into_owned()))
        }
        Ok(None) => Err("customer_id is not a string".into()),
        Err(e) => Err(format!("customer_id: {e}")),
    }
}

/// Contract: 1 to 128 characters of `A-Z a-z 0-9 - _ . :`.
pub fn validate_order_id(id: &str) -> Result<(), String> {
    validate_id("order_id", id)
}

/// The rule of `order_id` and `customer_id` (contract), for the field `name`.
fn validate_id(name: &str, id: &str) -> Result<(), String> {
    let len = id.chars().count();
    if len == 0 || len > MAX_ORDER_ID_LEN {
        return Err(format!(
            "{name} has {len} characters, allowed 1 to {MAX_ORDER_ID_LEN}"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!("{name} contains {c:?}"));
    }
    Ok(())
}

/// The `items` of an `order_created`, from the JSON text of its value. Unknown fields of
/// an item are ignored like those of the event; a number that is not an integer in range
/// (`1.5`, `1e400`, `2^63`) breaks the rule of its field.
fn parse_items(raw: Option<&str>) -> Result<Vec<Item>, String> {
    let Some(entries) = raw.and_then(json::array_elements) else {
        return Err("items missing or not an array".into());
    };
    if entries.is_empty() || entries.len() > MAX_ITEMS {
        return Err(format!("{} items, allowed 1 to {MAX_ITEMS}", entries.len()));
    }
    let mut seen = HashSet::with_capacity(entries.len());
    let mut items = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        // Not an object: no fields, so the first rule below names it.
        let fields = json::object_members(entry).unwrap_or_default();
        let integer = |name: &str| {
            fields
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| json::integer(v))
        };
        let product_id = integer("product_id")
            .filter(|p| *p >= 1)
            .ok_or_else(|| format!("item {i}: product_id must be an integer from 1 to 2^63-1"))?;
        let quantity = integer("quantity")
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

/// Just enough JSON for [`parse_order_event`]: the members of an object and the elements
/// of an array as slices of the text, every value fully checked against the JSON grammar
/// but skipped rather than built. Skipping keeps an explicit stack of open brackets, no
/// recursion, so any depth the message size allows costs memory proportional to it and no
/// call stack; numbers are checked for their syntax only, never converted, so `1e400` is
/// a valid JSON number that only a rule reading it can refuse. Strings are decoded (by
/// serde_json) only where a rule reads them.
mod json {
    use std::borrow::Cow;

    /// Why a text is not what was asked for.
    #[derive(Debug)]
    pub(super) enum Error {
        /// Valid JSON, but not an object.
        NotObject,
        /// Not JSON at all.
        Syntax(String),
    }

    impl From<String> for Error {
        fn from(e: String) -> Self {
            Error::Syntax(e)
        }
    }

    /// A member of an object: its decoded key and the text of its value.
    pub(super) type Member<'a> = (Cow<'a, str>, &'a str);

    /// The members of the object that is the whole of `text` (surrounding whitespace
    /// allowed), in order, duplicates kept.
    pub(super) fn object_members(text: &str) -> Result<Vec<Member<'_>>, Error> {
        let mut s = Scanner::new(text);
        s.ws();
        if s.peek() != Some(b'{') {
            // Tell "JSON, but not an object" from "not JSON".
            s.value()?;
            s.end()?;
            return Err(Error::NotObject);
        }
        s.pos += 1;
        let mut members = Vec::new();
        s.ws();
        if s.peek() == Some(b'}') {
            s.pos += 1;
        } else {
            loop {
                let key = decode(s.member_key()?)?;
                members.push((key, s.value()?));
                s.ws();
                match s.peek() {
                    Some(b',') => s.pos += 1,
                    Some(b'}') => {
                        s.pos += 1;
                        break;
                    }
                    _ => return Err(s.err("expected ',' or '}'").into()),
                }
            }
        }
        s.end()?;
        Ok(members)
    }

    /// The texts of the elements of the array that is the whole of `text`; `None` if it is
    /// not an array (or not JSON).
    pub(super) fn array_elements(text: &str) -> Option<Vec<&str>> {
        let mut s = Scanner::new(text);
        s.ws();
        if s.peek() != Some(b'[') {
            return None;
        }
        s.pos += 1;
        let mut elements = Vec::new();
        s.ws();
        if s.peek() == Some(b']') {
            s.pos += 1;
        } else {
            loop {
                elements.push(s.value().ok()?);
                s.ws();
                match s.peek() {
                    Some(b',') => s.pos += 1,
                    Some(b']') => {
                        s.pos += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        s.end().ok()?;
        Some(elements)
    }

    /// The decoded string that `raw` (a value's text) holds; `Ok(None)` if it is another
    /// kind of value.
    pub(super) fn string(raw: &str) -> Result<Option<Cow<'_, str>>, String> {
        if raw.starts_with('"') {
            decode(raw).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The integer that `raw` (a value's text) holds, if it is written as one (no fraction,
    /// no exponent) and fits an `i64`: serde_json's `as_i64` on the same text.
    pub(super) fn integer(raw: &str) -> Option<i64> {
        let digits = raw.strip_prefix('-').unwrap_or(raw);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        raw.parse().ok()
    }

    /// A string token's text (quotes included, already checked by the scanner) decoded.
    fn decode(raw: &str) -> Result<Cow<'_, str>, String> {
        if raw.contains('\\') {
            serde_json::from_str::<String>(raw)
                .map(Cow::Owned)
                .map_err(|e| e.to_string())
        } else {
            Ok(Cow::Borrowed(&raw[1..raw.len() - 1]))
        }
    }

    struct Scanner<'a> {
        text: &'a str,
        pos: usize,
    }

    impl<'a> Scanner<'a> {
        fn new(text: &'a str) -> Self {
            Scanner { text, pos: 0 }
        }

        fn peek(&self) -> Option<u8> {
            self.text.as_bytes().get(self.pos).copied()
        }

        fn ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.pos += 1;
            }
        }

        fn err(&self, what: &str) -> String {
            match self.peek() {
                Some(c) if c.is_ascii_graphic() => {
                    format!("{what}, found '{}' at byte {}", c as char, self.pos)
                }
                Some(c) => format!("{what}, found byte 0x{c:02x} at byte {}", self.pos),
                None => format!("{what}, found the end at byte {}", self.pos),
            }
        }

        fn eat(&mut self, c: u8, what: &str) -> Result<(), String> {
            if self.peek() == Some(c) {
                self.pos += 1;
                Ok(())
            } else {
                Err(self.err(what))
            }
        }

        /// Only whitespace is left.
        fn end(&mut self) -> Result<(), String> {
            self.ws();
            match self.peek() {
                None => Ok(()),
                Some(_) => Err(self.err("trailing characters")),
            }
        }

        /// A member's key and its colon; returns the key's text.
        fn member_key(&mut self) -> Result<&'a str, String> {
            self.ws();
            let key = self.string()?;
            self.ws();
            self.eat(b':', "expected ':'")?;
            Ok(key)
        }

        fn string(&mut self) -> Result<&'a str, String> {
            let start = self.pos;
            self.eat(b'"', "expected a string")?;
            loop {
                match self.peek() {
                    None => return Err(self.err("unterminated string")),
                    Some(b'"') => {
                        self.pos += 1;
                        return Ok(&self.text[start..self.pos]);
                    }
                    Some(b'\\') => {
                        self.pos += 1;
                        match self.peek() {
                            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                                self.pos += 1
                            }
                            Some(b'u') => {
                                self.pos += 1;
                                for _ in 0..4 {
                                    if !self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                                        return Err(self.err("bad \\u escape"));
                                    }
                                    self.pos += 1;
                                }
                            }
                            _ => return Err(self.err("bad escape")),
                        }
                    }
                    Some(0..=0x1f) => return Err(self.err("control character in a string")),
                    Some(_) => self.pos += 1,
                }
            }
        }

        fn digits(&mut self) -> usize {
            let start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            self.pos - start
        }

        fn number(&mut self) -> Result<(), String> {
            if self.peek() == Some(b'-') {
                self.pos += 1;
            }
            match self.peek() {
                Some(b'0') => self.pos += 1,
                Some(b'1'..=b'9') => {
                    self.digits();
                }
                _ => return Err(self.err("expected a digit")),
            }
            if self.peek() == Some(b'.') {
                self.pos += 1;
                if self.digits() == 0 {
                    return Err(self.err("expected a digit after '.'"));
                }
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.pos += 1;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.pos += 1;
                }
                if self.digits() == 0 {
                    return Err(self.err("expected a digit in the exponent"));
                }
            }
            Ok(())
        }

        fn literal(&mut self, word: &str) -> Result<(), String> {
            if self.text.as_bytes()[self.pos..].starts_with(word.as_bytes()) {
                self.pos += word.len();
                Ok(())
            } else {
                Err(self.err("expected a value"))
            }
        }

        /// Checks one value of any depth and returns its text. Open arrays and objects are
        /// kept on `open` (the bracket that closes each), not on the call stack.
        fn value(&mut self) -> Result<&'a str, String> {
            self.ws();
            let start = self.pos;
            let mut open: Vec<u8> = Vec::new();
            loop {
                // A value starts here.
                self.ws();
                match self.peek() {
                    Some(b'{') => {
                        self.pos += 1;
                        self.ws();
                        if self.peek() == Some(b'}') {
                            self.pos += 1;
                        } else {
                            open.push(b'}');
                            self.member_key()?;
                            continue;
                        }
                    }
                    Some(b'[') => {
                        self.pos += 1;
                        self.ws();
                        if self.peek() == Some(b']') {
                            self.pos += 1;
                        } else {
                            open.push(b']');
                            continue;
                        }
                    }
                    Some(b'"') => {
                        self.string()?;
                    }
                    Some(b'-' | b'0'..=b'9') => self.number()?,
                    Some(b't') => self.literal("true")?,
                    Some(b'f') => self.literal("false")?,
                    Some(b'n') => self.literal("null")?,
                    _ => return Err(self.err("expected a value")),
                }
                // A value ended: close what it ends, or go on to the next one.
                loop {
                    let Some(&close) = open.last() else {
                        return Ok(&self.text[start..self.pos]);
                    };
                    self.ws();
                    match self.peek() {
                        Some(b',') => {
                            self.pos += 1;
                            if close == b'}' {
                                self.member_key()?;
                            }
                            break;
                        }
                        Some(c) if c == close => {
                            self.pos += 1;
                            open.pop();
                        }
                        _ => {
                            return Err(self.err(if close == b'}' {
                                "expected ',' or '}'"
                            } else {
                                "expected ',' or ']'"
                            }))
                        }
                    }
                }
            }
        }
    }
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
    /// The order would take its customer over a product's per-customer limit.
    LimitExceeded,
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
            Reason::LimitExceeded => "limit_exceeded",
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
            "limit_exceeded" => Reason::LimitExceeded,
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
        /// The order's `customer_id`, whose units of limited products this pre-deduction
        /// counted in Redis (as first decided: from the order's Redis record).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        customer: Option<String>,
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
    /// The order's customer: for [`CompensationCause::Redecide`], so that the order is
    /// decided again against its customer's limits. (A give-back finds the customer in
    /// the order's Redis record, which it must match anyway.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
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
                ],
                customer_id: None,
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

    fn nested(depth: usize, inner: &str) -> String {
        format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn numbers_out_of_range_are_invalid_not_garbage() {
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A1","items":[{"product_id":1e400,"quantity":1}]}"#
        )
        .contains("product_id"));
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A1","items":[{"product_id":1,"quantity":-1e400}]}"#
        )
        .contains("quantity"));
        assert!(invalid_detail(
            r#"{"type":"order_created","order_id":"A1","items":[{"product_id":1,"quantity":1E2}]}"#
        )
        .contains("quantity"));
        // An unknown field is ignored, whatever number it holds.
        assert!(matches!(
            parse_order_event(
                br#"{"n":1e400,"type":"order_created","order_id":"A1","items":[{"product_id":1,"quantity":1,"w":-1e999}]}"#
            ),
            Parsed::Valid(_)
        ));
    }

    #[test]
    fn deep_nesting_is_judged_where_it_is() {
        let deep = nested(10_000, "1");
        assert!(invalid_detail(&format!(
            r#"{{"type":"order_created","order_id":"A1","items":{deep}}}"#
        ))
        .contains("product_id"));
        assert!(invalid_detail(&format!(
            r#"{{"type":"order_created","order_id":"A1","items":[{{"product_id":{deep},"quantity":1}}]}}"#
        ))
        .contains("product_id"));
        // In unknown fields (of the event or of an item) it is ignored, however deep:
        // no recursion, so a million levels cost no stack.
        let very_deep = nested(1_000_000, "{}");
        let objects = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
        let created = format!(
            r#"{{"x":{very_deep},"type":"order_created","order_id":"A1","items":[{{"product_id":1,"z":{objects},"quantity":2}}],"y":{objects}}}"#
        );
        assert_eq!(
            parse_order_event(created.as_bytes()),
            Parsed::Valid(OrderEvent::Created {
                order_id: "A1".into(),
                items: vec![Item {
                    product_id: 1,
                    quantity: 2
                }],
                customer_id: None,
            })
        );
        let paid = format!(r#"{{"type":"order_paid","order_id":"A1","x":{deep}}}"#);
        assert!(matches!(
            parse_order_event(paid.as_bytes()),
            Parsed::Valid(OrderEvent::Paid { .. })
        ));
        // A readable start does not make the rest JSON.
        let cut = format!(
            r#"{{"type":"order_created","order_id":"A1","items":{}"#,
            "[".repeat(10_000)
        );
        assert!(
            matches!(parse_order_event(cut.as_bytes()), Parsed::Garbage(r) if r.starts_with("not JSON"))
        );
        let unbalanced = format!(
            r#"{{"type":"order_paid","order_id":"A1","x":{}}}"#,
            "[".repeat(3) + "}}}"
        );
        assert!(
            matches!(parse_order_event(unbalanced.as_bytes()), Parsed::Garbage(r) if r.starts_with("not JSON"))
        );
    }

    #[test]
    fn only_json_is_read() {
        for bytes in [
            &br#"{"type":"order_paid","order_id":"A1",}"#[..],
            br#"{"type":"order_paid","order_id":"A1"} x"#,
            br#"{"type":"order_paid","order_id":"A1","x":[1 2]}"#,
            br#"{"type":"order_paid","order_id":"A1","x":01}"#,
            br#"{"type":"order_paid","order_id":"A1","x":1.}"#,
            br#"{"type":"order_paid","order_id":"A1","x":.5}"#,
            br#"{"type":"order_paid","order_id":"A1","x":tru}"#,
            br#"{"type":"order_paid","order_id":"A1","x":"\q"}"#,
            br#"{"type":"order_paid","order_id":"A1","x":"\u12"}"#,
            b"{\"type\":\"order_paid\",\"order_id\":\"A\x011\"}",
            br#"{"type":"order_paid" "order_id":"A1"}"#,
            br#"{"type":"order_paid","order_id":"A1""#,
            br#"{"type":"order_paid","order_id":"A1","x":[}"#,
            br#"{'type':'order_paid'}"#,
            b"{\"type\":\"order_paid\",\"order_id\":\"A\xff\"}",
            b"",
        ] {
            match parse_order_event(bytes) {
                Parsed::Garbage(r) => assert!(r.starts_with("not JSON"), "{bytes:?}: {r}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
            }
        }
        for bytes in [&b"[1,2]"[..], b" 17 ", b"\"x\"", b"null", b"[[[[]]]]"] {
            assert_eq!(
                parse_order_event(bytes),
                Parsed::Garbage("not a JSON object".into())
            );
        }
    }

    #[test]
    fn keys_and_ids_are_decoded_like_json() {
        // Escapes in keys and values; of a key given twice the last counts.
        assert_eq!(
            parse_order_event(
                br#" { "\u0074ype" : "order_paid", "order_id":"x", "order_id" : "A\u002d1" } "#
            ),
            Parsed::Valid(OrderEvent::Paid {
                order_id: "A-1".into()
            })
        );
        assert_eq!(
            parse_order_event(br#"{"type":"order_paid","order_id":"A\n1"}"#),
            Parsed::Invalid {
                kind: EventType::Paid,
                order_id: "A\n1".into(),
                detail: "order_id contains '\\n'".into()
            }
        );
        // Readable means at most 1,024 bytes (contract), not characters.
        let two_byte = |n: usize| "é".repeat(n);
        let at_limit = format!(r#"{{"type":"order_paid","order_id":"{}"}}"#, two_byte(512));
        assert!(matches!(
            parse_order_event(at_limit.as_bytes()),
            Parsed::Invalid { .. }
        ));
        let over = format!(r#"{{"type":"order_paid","order_id":"{}"}}"#, two_byte(513));
        assert!(matches!(
            parse_order_event(over.as_bytes()),
            Parsed::Garbage(_)
        ));
        assert_eq!(
            parse_order_event(br#"{"type":["order_paid"],"order_id":"A1"}"#),
            Parsed::Garbage("no type".into())
        );
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
    fn customer_id_follows_the_order_id_rules() {
        let created = |customer: &str| {
            parse_order_event(
                format!(
                    r#"{{"type":"order_created","order_id":"A1","items":[{{"product_id":1,"quantity":1}}]{customer}}}"#
                )
                .as_bytes(),
            )
        };
        let customer_of = |p: Parsed| match p {
            Parsed::Valid(OrderEvent::Created { customer_id, .. }) => customer_id,
            other => panic!("expected a valid order, got {other:?}"),
        };
        assert_eq!(customer_of(created("")), None);
        assert_eq!(customer_of(created(r#","customer_id":null"#)), None);
        assert_eq!(
            customer_of(created(r#","customer_id":"c-1.x:y_z""#)),
            Some("c-1.x:y_z".into())
        );
        for bad in [
            r#","customer_id":"""#,
            r#","customer_id":"a b""#,
            r#","customer_id":"a|b""#,
            r#","customer_id":7"#,
        ] {
            assert!(
                matches!(
                    created(bad),
                    Parsed::Invalid {
                        kind: EventType::Created,
                        ..
                    }
                ),
                "{bad}"
            );
        }
        let long = format!(r#","customer_id":"{}""#, "c".repeat(129));
        assert!(matches!(created(&long), Parsed::Invalid { .. }));
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
            customer: None,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert_eq!(
            json,
            r#"{"op":"reserve","v":1,"order_id":"A","items":[{"product_id":1,"quantity":2}]}"#
        );
        assert_eq!(serde_json::from_str::<DeductCommand>(&json).unwrap(), cmd);
    }
}
