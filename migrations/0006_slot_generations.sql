-- Rebuilding some slots of a Redis Cluster (docs/DESIGN.md "Rebuilding some slots").
--
-- `loaded_gen`: the generation of the last load of the whole of Redis. A partial rebuild
-- advances `gen` like any rebuild, and records in `redis_slot_generation` the ranges of
-- slots it loaded in that generation; a whole load clears that table. A slot was loaded in
-- the newest generation of a range holding it, or else in `loaded_gen`: a pre-deduction
-- named in an older generation than one of its slots' is not held there any more. Ranges,
-- not slots: the consumer reads the table with every batch, and a master's slots are a few
-- ranges.
ALTER TABLE redis_generation ADD COLUMN loaded_gen bigint;
UPDATE redis_generation SET loaded_gen = gen;
ALTER TABLE redis_generation ALTER COLUMN loaded_gen SET NOT NULL;

CREATE TABLE redis_slot_generation (
    gen bigint  NOT NULL,
    lo  integer NOT NULL CHECK (lo >= 0 AND lo < 16384),
    hi  integer NOT NULL CHECK (hi >= lo AND hi < 16384),
    PRIMARY KEY (gen, lo)
);
