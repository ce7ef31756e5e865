-- The history as one row per transaction and kind, its products and their sums as arrays
-- (issue 12).
--
-- Before: one `stock_movement` row per product and kind per transaction. At half the
-- maximum rate a consumer batch of ~250 orders touches ~220 products, so the history was
-- ~220 heap rows and ~440 index entries a batch: as costly as the ledger itself
-- (docs/perf/issue12-profile.md, session 16). Now a batch writes one row per kind, and its
-- arrays hold, element by element, each product it changed (ascending, once each) and that
-- product's sums: `quantities`, the three deltas, and `orders` (how many orders the element
-- sums; 1 for a restock or a set). `ref` is the first order of the row (or the request id).
--
-- The per-product reading is the view `stock_movement_item`: one row per element, with the
-- columns the old table had, plus the row's `products` so that a reader of one product can
-- go through the GIN index (`products @> ARRAY[$1]`), as `stockctl history` does.
--
-- Rows written before this migration are copied as one-element rows with their ids, times
-- and sums unchanged; the ids keep growing from the same sequence. On a large history the
-- copy holds an exclusive lock on the table while it runs: run it in a quiet hour.
CREATE TABLE stock_movement_new (
    id               bigserial   PRIMARY KEY,
    kind             text        NOT NULL CHECK (kind IN (
                         'reserve', 'confirm', 'release_cancelled', 'release_expired',
                         'compensation', 'restock', 'set')),
    -- the first order id of the row (reserve, confirm, release_*, compensation) or the
    -- request id (restock, set)
    ref              text        NOT NULL,
    products         bigint[]    NOT NULL,
    quantities       bigint[]    NOT NULL,
    available_deltas bigint[]    NOT NULL,
    reserved_deltas  bigint[]    NOT NULL,
    sold_deltas      bigint[]    NOT NULL,
    orders           integer[]   NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(products) >= 1 AND array_ndims(products) = 1
       AND array_position(products, NULL) IS NULL),
    CHECK (array_length(quantities, 1) = array_length(products, 1)
       AND array_length(available_deltas, 1) = array_length(products, 1)
       AND array_length(reserved_deltas, 1) = array_length(products, 1)
       AND array_length(sold_deltas, 1) = array_length(products, 1)
       AND array_length(orders, 1) = array_length(products, 1)),
    CHECK (1 <= ALL (orders))
);

INSERT INTO stock_movement_new
    (id, kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders, at)
SELECT id, kind, ref, ARRAY[product_id], ARRAY[quantity], ARRAY[available_delta],
       ARRAY[reserved_delta], ARRAY[sold_delta], ARRAY[orders], at
FROM stock_movement;

SELECT setval(pg_get_serial_sequence('stock_movement_new', 'id'),
              greatest((SELECT max(id) FROM stock_movement_new),
                       (SELECT last_value FROM stock_movement_id_seq)));

DROP TABLE stock_movement;
ALTER TABLE stock_movement_new RENAME TO stock_movement;
ALTER SEQUENCE stock_movement_new_id_seq RENAME TO stock_movement_id_seq;
ALTER INDEX stock_movement_new_pkey RENAME TO stock_movement_pkey;

-- A product's history, newest first, without reading the rows of other products.
CREATE INDEX stock_movement_products ON stock_movement USING gin (products);

CREATE VIEW stock_movement_item AS
SELECT m.id, e.product_id, m.kind, m.ref, e.quantity, e.available_delta, e.reserved_delta,
       e.sold_delta, e.orders, m.at, m.products
FROM stock_movement m
CROSS JOIN LATERAL unnest(m.products, m.quantities, m.available_deltas, m.reserved_deltas,
                          m.sold_deltas, m.orders)
    AS e(product_id, quantity, available_delta, reserved_delta, sold_delta, orders);
