-- Order and customer ids compare byte by byte (collation "C") instead of through the
-- database's locale (C.UTF-8 on the local stack: every comparison a strcoll call).
-- Profiled in issue 12: text comparisons were 6% of PostgreSQL's CPU in the consumer's
-- batches, most of it the ledger's primary key (docs/perf/issue12-profile.md). Equality
-- is unchanged (both collations are deterministic), and so is the order of valid UTF-8
-- ids (byte order is code point order). The indexes on these columns are rebuilt: on a
-- large ledger this holds an exclusive lock for the rebuild, so run it in a quiet hour.
ALTER TABLE order_ledger ALTER COLUMN order_id TYPE text COLLATE "C";
ALTER TABLE customer_units ALTER COLUMN customer_id TYPE text COLLATE "C";
