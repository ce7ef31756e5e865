-- The ledger's autovacuum round, cheap and spread out (issue 12, session 26).
--
-- ANALYZE samples 300 rows per unit of the largest statistics target of a table's columns
-- (30,000 at the default of 100) and compares every sampled value of every column, the
-- items' jsonb included. On a ledger of 3 million orders that was 0.37-0.40 s of CPU, once a
-- minute at half the maximum rate, on a box already 80% busy. Only the columns a statement
-- filters on keep statistics (order_id, status, reserved_until, announced, customer_id),
-- from a sample of 3,000 rows; no statement filters on the others.
ALTER TABLE order_ledger
    ALTER COLUMN order_id SET STATISTICS 10,
    ALTER COLUMN status SET STATISTICS 10,
    ALTER COLUMN reserved_until SET STATISTICS 10,
    ALTER COLUMN announced SET STATISTICS 10,
    ALTER COLUMN customer_id SET STATISTICS 10,
    ALTER COLUMN reject_reason SET STATISTICS 0,
    ALTER COLUMN reject_product SET STATISTICS 0,
    ALTER COLUMN release_reason SET STATISTICS 0,
    ALTER COLUMN settled_by SET STATISTICS 0,
    ALTER COLUMN items SET STATISTICS 0,
    ALTER COLUMN created_at SET STATISTICS 0,
    ALTER COLUMN settled_at SET STATISTICS 0,
    ALTER COLUMN token SET STATISTICS 0,
    ALTER COLUMN comp_gen SET STATISTICS 0;

-- The ledger only grows by inserts at the rate of orders, and an insert vacuum (which marks
-- its new pages all-visible and frozen) ran once the inserts reached 20% of the table: once
-- a minute at first, then ever larger and rarer rounds as the table grows. With data
-- checksums on, the first change of a page after a checkpoint logs the whole page, so a
-- round over pages written before the last checkpoint logged every one of them again
-- (~140 MB of WAL a minute at 20,000 orders/s, flushed by the next commits). Every
-- 100,000 inserted orders instead, whatever the table's size: with autovacuum_naptime = 10s
-- (deploy/stack-up.sh) a round follows its pages within seconds.
ALTER TABLE order_ledger SET (
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 100000
);
