-- Per-customer limits (issue 13; docs/DESIGN.md, "Per-customer limits").

-- The order's customer_id, as first decided (NULL: the order named none). A release gives
-- this customer's units back; a redelivery with another customer changes nothing.
ALTER TABLE order_ledger ADD COLUMN customer_id text;

-- An order that would take its customer over a product's limit is rejected here too.
ALTER TABLE order_ledger DROP CONSTRAINT IF EXISTS order_ledger_reject_reason_check;
ALTER TABLE order_ledger ADD CONSTRAINT order_ledger_reject_reason_check
    CHECK (reject_reason IN ('insufficient_stock', 'unknown_product', 'invalid_order',
                             'limit_exceeded'));

-- The products that carry a limit: the most units one customer may hold of it (its
-- reserved and confirmed orders). Written only by an operator's change (pg_store::set_limit,
-- under the product's stock row lock); read with the stock row lock by every writer of
-- customer_units. `version` is the limit_request that set it (Redis applies a change only
-- if newer than the one it holds).
CREATE TABLE product_limit (
    product_id   bigint PRIMARY KEY REFERENCES stock (product_id),
    per_customer bigint NOT NULL CHECK (per_customer >= 0),
    version      bigint NOT NULL
);

-- Kept only for products that have a limit: the units of that customer's reserved and
-- confirmed orders of that product. Every writer (the consumer's batch: reserve +,
-- cancel -; the expiry sweep: -; set_limit: computed from the ledger when a limit is
-- first set, deleted when it is removed) holds the product's stock row lock first, in the
-- transaction that changes the order's stock, which is what keeps the counts exact. A
-- count that falls to 0 is deleted in the same statement: a row exists only while held.
CREATE TABLE customer_units (
    product_id  bigint NOT NULL,
    customer_id text   NOT NULL,
    units       bigint NOT NULL CHECK (units >= 0),
    PRIMARY KEY (product_id, customer_id)
);

-- The numbers of limit changes, increasing per change (product_limit.version).
CREATE SEQUENCE limit_version;

-- The version of the product's limit (product_limit.version; NULL: no limit), written by
-- set_limit in the same transaction, which therefore also *updates* the stock row it locks.
-- A writer that waited for that row lock reads the row's new version but the limit as its
-- statement's snapshot saw it (PostgreSQL rechecks only the locked row): the two disagree,
-- and it starts again with a fresh snapshot (pg_store::lock_stock).
ALTER TABLE stock ADD COLUMN limit_version bigint;

-- Operators' limit changes, by request id, so that a retried `stockctl limit` applies once.
-- per_customer NULL: the limit was removed; previous: the limit before (NULL: none), so that
-- a retry is answered with what was done. version: from limit_version, increasing per
-- change (product_limit.version). gen: the Redis generation the PostgreSQL change was
-- committed in (its Redis half applies only to that generation).
CREATE TABLE limit_request (
    request_id   text        PRIMARY KEY,
    product_id   bigint      NOT NULL,
    per_customer bigint      CHECK (per_customer >= 0),
    previous     bigint,
    version      bigint      NOT NULL,
    gen          bigint      NOT NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
