//! What the producer does with each incoming message, decided without I/O.

use stock_common::config::Topics;
use stock_common::events::{
    parse_order_event, validate_order_id, Compensation, CompensationCause, DeductCommand,
    EventType, OrderEvent, Parsed, Reason, Status, StockResult, INTERNAL_VERSION,
};
use stock_common::redis_store::ReserveRequest;

/// The work one message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An `order_created` (valid, or invalid with a readable id: then `forced` is set), or
    /// an order the consumer asks to decide again (its pre-deduction was taken in a Redis
    /// generation a rebuild replaced), for the reserve script.
    Reserve(ReserveRequest),
    /// A pay or cancel, passed on to the consumer, which owns the reservation's state.
    Forward(DeductCommand),
    /// A result known without any I/O (`ignored`/`not_reserved` for an invalid pay/cancel).
    Reply(StockResult),
    /// A compensation from the consumer: one pre-deduction to give back, for the restore
    /// script.
    Restore(Compensation),
    /// Not processable: dead-letter with this reason.
    Dead(String),
    /// An order or pay/cancel of an order that waits for a Redis Cluster slot (set by the
    /// worker, never by [`classify`]): no script runs for it, it waits behind its order.
    Waiting(String),
}

/// The id of an `orders` message, carried by forwarded pays and cancels.
pub fn event_id(partition: i32, offset: i64) -> String {
    format!("p{partition}@{offset}")
}

pub fn classify(
    topics: &Topics,
    topic: &str,
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
) -> Input {
    let Some(bytes) = payload else {
        return Input::Dead("empty message".into());
    };
    if topic == topics.compensate {
        return match serde_json::from_slice::<Compensation>(bytes) {
            Ok(c) if c.v == INTERNAL_VERSION && c.cause == CompensationCause::Redecide => {
                Input::Reserve(ReserveRequest {
                    order_id: c.order_id,
                    items: c.items,
                    forced: None,
                    customer: c.customer,
                    replaces: c.token,
                })
            }
            Ok(c) if c.v == INTERNAL_VERSION && !c.items.is_empty() => Input::Restore(c),
            Ok(c) => Input::Dead(format!(
                "unsupported compensation (version {}, {} items)",
                c.v,
                c.items.len()
            )),
            Err(e) => Input::Dead(format!("not a compensation: {e}")),
        };
    }
    if topic != topics.orders {
        return Input::Dead(format!("message from unexpected topic {topic}"));
    }
    match parse_order_event(bytes) {
        Parsed::Valid(OrderEvent::Created {
            order_id,
            items,
            customer_id,
        }) => Input::Reserve(ReserveRequest {
            order_id,
            items,
            forced: None,
            customer: customer_id,
            replaces: None,
        }),
        Parsed::Valid(OrderEvent::Paid { order_id }) => Input::Forward(DeductCommand::Pay {
            v: INTERNAL_VERSION,
            order_id,
            event: event_id(partition, offset),
        }),
        Parsed::Valid(OrderEvent::Cancelled { order_id }) => {
            Input::Forward(DeductCommand::Cancel {
                v: INTERNAL_VERSION,
                order_id,
                event: event_id(partition, offset),
            })
        }
        Parsed::Invalid {
            kind: EventType::Created,
            order_id,
            detail,
        } => {
            tracing::info!(%order_id, %detail, "invalid order");
            if validate_order_id(&order_id).is_err() {
                // An id that breaks the contract's rules makes every event carrying it
                // invalid, now and on any replay: the answer needs no memory, and such an
                // id (it may hold a NUL) is not one to store in the ledger.
                return Input::Reply(StockResult::rejected(&order_id, Reason::InvalidOrder, None));
            }
            // A valid id with invalid content: its refusal is its one outcome for good,
            // recorded like any other decision.
            Input::Reserve(ReserveRequest {
                order_id,
                items: Vec::new(),
                forced: Some(Reason::InvalidOrder),
                customer: None,
                replaces: None,
            })
        }
        Parsed::Invalid {
            order_id, detail, ..
        } => {
            tracing::info!(%order_id, %detail, "invalid pay/cancel");
            Input::Reply(StockResult::new(
                &order_id,
                Status::Ignored,
                Some(Reason::NotReserved),
                None,
            ))
        }
        Parsed::Garbage(reason) => Input::Dead(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stock_common::events::Item;

    fn t() -> Topics {
        Topics::prefixed("")
    }

    #[test]
    fn routes_each_kind() {
        let created =
            br#"{"type":"order_created","order_id":"A","items":[{"product_id":1,"quantity":2}]}"#;
        assert_eq!(
            classify(&t(), "orders", 0, 5, Some(created)),
            Input::Reserve(ReserveRequest {
                order_id: "A".into(),
                items: vec![Item {
                    product_id: 1,
                    quantity: 2
                }],
                forced: None,
                customer: None,
                replaces: None,
            })
        );
        let paid = br#"{"type":"order_paid","order_id":"A"}"#;
        assert_eq!(
            classify(&t(), "orders", 3, 9, Some(paid)),
            Input::Forward(DeductCommand::Pay {
                v: 1,
                order_id: "A".into(),
                event: "p3@9".into()
            })
        );
        let bad =
            br#"{"type":"order_created","order_id":"A B","items":[{"product_id":1,"quantity":2}]}"#;
        assert_eq!(
            classify(&t(), "orders", 0, 0, Some(bad)),
            Input::Reply(StockResult::rejected("A B", Reason::InvalidOrder, None))
        );
        let bad_items = br#"{"type":"order_created","order_id":"A-1","items":[]}"#;
        assert!(matches!(
            classify(&t(), "orders", 0, 0, Some(bad_items)),
            Input::Reserve(ReserveRequest {
                forced: Some(Reason::InvalidOrder),
                ..
            })
        ));
        let bad_cancel = br#"{"type":"order_cancelled","order_id":"A B"}"#;
        assert_eq!(
            classify(&t(), "orders", 0, 0, Some(bad_cancel)),
            Input::Reply(StockResult::new(
                "A B",
                Status::Ignored,
                Some(Reason::NotReserved),
                None
            ))
        );
        assert!(matches!(
            classify(&t(), "orders", 0, 0, Some(b"garbage")),
            Input::Dead(_)
        ));
        assert!(matches!(
            classify(&t(), "orders", 0, 0, None),
            Input::Dead(_)
        ));
        let comp =
            br#"{"v":1,"order_id":"A","items":[{"product_id":1,"quantity":2}],"cause":"rejected"}"#;
        assert!(matches!(
            classify(&t(), "stock.compensate", 0, 0, Some(comp)),
            Input::Restore(_)
        ));
        assert!(matches!(
            classify(&t(), "stock.compensate", 0, 0, Some(b"{}")),
            Input::Dead(_)
        ));
    }
}
