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
-- and sums unchanged; new ids carry on after the old sequence's last value. On a large history the
-- copy holds an exclusive lock on the table while it runs: run it in a quiet hour.
CREATE TABLE stock_movement_new (
    id               bigserial   PRIMARY KEY,
    kind             text        NOT NULL CONSTRAINT stock_movement_kind_check CHECK (kind IN (
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
    -- One element per product in every array. Kept to one cheap constraint: PostgreSQL
    -- rebuilds a table's CHECK expressions from their stored text at every statement.
    CONSTRAINT stock_movement_arrays CHECK (cardinality(products) > 0
        AND cardinality(quantities) = cardinality(products)
        AND cardinality(available_deltas) = cardinality(products)
        AND cardinality(reserved_deltas) = cardinality(products)
        AND cardinality(sold_deltas) = cardinality(products)
        AND cardinality(orders) = cardinality(products))
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

-- A batch's arrays are stored compressed out of line (TOAST). LZ4 does it in about 2/3 of
-- the default pglz's time and a little smaller (pgbench, session 17: 0.31 against 0.46 ms
-- a row of ~220 products). A server without LZ4 (built without it, or older than
-- PostgreSQL 14) keeps its default, with a notice.
DO $$
BEGIN
    ALTER TABLE stock_movement
        ALTER COLUMN products SET COMPRESSION lz4,
        ALTER COLUMN quantities SET COMPRESSION lz4,
        ALTER COLUMN available_deltas SET COMPRESSION lz4,
        ALTER COLUMN reserved_deltas SET COMPRESSION lz4,
        ALTER COLUMN sold_deltas SET COMPRESSION lz4,
        ALTER COLUMN orders SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'stock_movement keeps the default compression: %', SQLERRM;
END
$$;

-- A product's history, newest first, without reading the rows of other products.
CREATE INDEX stock_movement_products ON stock_movement USING gin (products);

CREATE VIEW stock_movement_item AS
SELECT m.id, e.product_id, m.kind, m.ref, e.quantity, e.available_delta, e.reserved_delta,
       e.sold_delta, e.orders, m.at, m.products
FROM stock_movement m
CROSS JOIN LATERAL unnest(m.products, m.quantities, m.available_deltas, m.reserved_deltas,
                          m.sold_deltas, m.orders)
    AS e(product_id, quantity, available_delta, reserved_delta, sold_delta, orders);
