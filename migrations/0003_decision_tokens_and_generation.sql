-- Decision tokens and the Redis generation fence (docs/DESIGN.md, "Generations and tokens").

-- The generation of Redis that PostgreSQL currently answers to. A rebuild advances it in
-- the same transaction that takes the snapshot Redis is loaded from. Every writer whose
-- effect must reach Redis (consumer batch, expiry sweep, restock, set) reads it first in
-- its transaction: the rebuild's ACCESS EXCLUSIVE lock then orders each of them wholly
-- before the snapshot (its effect is in it) or wholly after (it carries the new generation).
CREATE TABLE redis_generation (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    gen     bigint  NOT NULL,
    -- true from the fence until Redis holds generation `gen`: an operator's change
    -- committed in `gen` meanwhile is not in the snapshot and must wait for the load
    loading boolean NOT NULL DEFAULT false
);
INSERT INTO redis_generation (id, gen) VALUES (true, 0);

-- The Redis decision this row applied ('<generation>.<sequence>'): a deduct carrying
-- another token is a second pre-deduction of the same order (its record was forgotten,
-- or the order id was sent again), to be given back, never applied.
ALTER TABLE order_ledger ADD COLUMN token text;
-- The generation of the PostgreSQL change that gives this order's stock back to Redis
-- (a refusal here, a cancel, an expiry): its compensation applies only to that generation.
ALTER TABLE order_ledger ADD COLUMN comp_gen bigint;

-- Every order_created outcome now goes through the ledger, Redis refusals included.
ALTER TABLE order_ledger DROP CONSTRAINT IF EXISTS order_ledger_reject_reason_check;
ALTER TABLE order_ledger ADD CONSTRAINT order_ledger_reject_reason_check
    CHECK (reject_reason IN ('insufficient_stock', 'unknown_product', 'invalid_order'));

-- The generation an operator's stock request was applied in, in PostgreSQL: its Redis half
-- applies only to that generation (a later rebuild loaded it from the snapshot).
ALTER TABLE stock_request ADD COLUMN gen bigint;
