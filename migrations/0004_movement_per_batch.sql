-- The history as one row per product and kind per transaction (issue 12).
--
-- A consumer batch, an expiry sweep or an operator's request writes one `stock_movement`
-- row per product and kind it changed, summing its orders: `quantity` and the deltas are
-- the sums, `ref` the first order of the batch (or the request id), `orders` how many
-- orders the row sums (1 for a restock or a set: its own request). Each order's own story
-- is its ledger row (`order_ledger`: items, status, times), which `stockctl history
-- --order` reads. Rows written before this migration are one per order and item, so 1
-- is the right default for them.
ALTER TABLE stock_movement ADD COLUMN orders integer NOT NULL DEFAULT 1 CHECK (orders >= 1);
