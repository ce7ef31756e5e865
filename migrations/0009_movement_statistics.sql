-- ANALYZE of the history, cheap and flat (issue 12, session 25).
--
-- ANALYZE samples 300 rows per unit of the largest statistics target of a table's columns
-- (30,000 at the default of 100), and for an array column it computes element statistics
-- over every element of every sampled row. With ~250 products a row (a consumer batch at
-- half the maximum rate) that was some 45 million elements over the six arrays: autoanalyze
-- of stock_movement grew to 2 s of CPU once a minute, in bursts of 5 s, and the soak's p99
-- jumped in every window that held one (docs/perf/issue12-session25.txt). No statement
-- filters on the sums, so they keep no statistics; the other columns, `products` included
-- (`stockctl history` reads `products @> ARRAY[$1]` through the GIN index), keep a sample of
-- 3,000 rows. ANALYZE of 40,000 such rows: 2.3-2.5 s before, 0.034-0.037 s after.
ALTER TABLE stock_movement
    ALTER COLUMN quantities SET STATISTICS 0,
    ALTER COLUMN available_deltas SET STATISTICS 0,
    ALTER COLUMN reserved_deltas SET STATISTICS 0,
    ALTER COLUMN sold_deltas SET STATISTICS 0,
    ALTER COLUMN orders SET STATISTICS 0,
    ALTER COLUMN products SET STATISTICS 10,
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN kind SET STATISTICS 10,
    ALTER COLUMN ref SET STATISTICS 10,
    ALTER COLUMN at SET STATISTICS 10;
