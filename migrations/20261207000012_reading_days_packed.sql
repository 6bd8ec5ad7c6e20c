-- A day's 24 hourly cells in one bytea, for reading: PostgreSQL sends a float8[] element
-- by element (a year of daily averages, 366 rows × 96 elements, spent ~1.8 ms in
-- array_send alone), a bytea in one copy (~0.3 ms). `packed` is the four arrays in
-- PostgreSQL's binary array format (what array_send writes, the wire format of arrays),
-- one after the other: counts, sums, mins, maxs. Writers keep updating the arrays.
-- array_send is STABLE only because an element type's send function could be; for
-- bigint and float8 it is immutable.
CREATE FUNCTION day_cells_packed(counts bigint[], sums float8[], mins float8[], maxs float8[])
RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN array_send(counts) || array_send(sums) || array_send(mins) || array_send(maxs);

-- A row is ~2.2 kB with `packed`: above the default 2 kB target, PostgreSQL would compress
-- it on every write and decompress it on every read. Kept whole in the heap instead (set
-- first: adding the column rewrites the table).
ALTER TABLE reading_days SET (toast_tuple_target = 8160);

ALTER TABLE reading_days
    ADD COLUMN packed bytea NOT NULL
    GENERATED ALWAYS AS (day_cells_packed(counts, sums, mins, maxs)) STORED;
