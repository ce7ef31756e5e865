-- Order lifecycle and stock operations: expiry outbox, movement history, admin requests.

-- false while an expiry is committed but its result and compensation are not yet
-- published (the expiry sweeper's outbox); true for every other row.
ALTER TABLE order_ledger ADD COLUMN announced boolean NOT NULL DEFAULT true;
CREATE INDEX order_ledger_unannounced ON order_ledger (order_id) WHERE NOT announced;

-- Every change of stock, by product: what, for which order or request, how much.
CREATE TABLE stock_movement (
    id              bigserial   PRIMARY KEY,
    product_id      bigint      NOT NULL,
    kind            text        NOT NULL CHECK (kind IN (
                        'reserve', 'confirm', 'release_cancelled', 'release_expired',
                        'compensation', 'restock', 'set')),
    -- the order id (reserve, confirm, release_*, compensation) or request id (restock, set)
    ref             text        NOT NULL,
    quantity        bigint      NOT NULL,
    available_delta bigint      NOT NULL DEFAULT 0,
    reserved_delta  bigint      NOT NULL DEFAULT 0,
    sold_delta      bigint      NOT NULL DEFAULT 0,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_movement_product ON stock_movement (product_id, id);

-- Operators' stock changes, by request id, so that a retried command applies once.
CREATE TABLE stock_request (
    request_id      text        PRIMARY KEY,
    product_id      bigint      NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('restock', 'set')),
    available_delta bigint      NOT NULL,
    at              timestamptz NOT NULL DEFAULT now()
);
