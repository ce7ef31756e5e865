-- The contract's stock table, and the consumer's ledger of orders.

CREATE TABLE stock (
    product_id  bigint      PRIMARY KEY CHECK (product_id > 0),
    -- may still be reserved
    available   bigint      NOT NULL DEFAULT 0 CHECK (available >= 0),
    -- held for orders not yet paid
    reserved    bigint      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    -- held for paid orders
    sold        bigint      NOT NULL DEFAULT 0 CHECK (sold >= 0),
    -- all stock ever added (initial stock plus restocks): contract guarantee 1, enforced
    total_added bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stock_conserved CHECK (available + reserved + sold = total_added)
);

-- One row per order that reached PostgreSQL, written in the same transaction as its stock
-- change: the idempotency key of every deduction, and the order's state.
CREATE TABLE order_ledger (
    order_id       text        PRIMARY KEY,
    -- reserved -> confirmed (paid) | released (cancelled, expired); rejected is final
    status         text        NOT NULL CHECK (status IN ('reserved', 'rejected', 'confirmed', 'released')),
    -- the outcome of order_created, when it was rejected here
    reject_reason  text        CHECK (reject_reason IN ('insufficient_stock', 'unknown_product')),
    reject_product bigint,
    release_reason text        CHECK (release_reason IN ('cancelled', 'expired')),
    -- the event that confirmed or released the order ('p<partition>@<offset>' of the
    -- orders topic, or 'expiry'): its redelivery re-emits the same result, any other
    -- pay or cancel is ignored
    settled_by     text,
    -- [{"product_id":42,"quantity":2}, ...] in the order's own item order
    items          jsonb       NOT NULL,
    reserved_until timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    settled_at     timestamptz,
    CHECK ((status = 'rejected') = (reject_reason IS NOT NULL)),
    CHECK ((status = 'released') = (release_reason IS NOT NULL))
);

-- The expiry sweeper's work list.
CREATE INDEX order_ledger_expiry ON order_ledger (reserved_until) WHERE status = 'reserved';
