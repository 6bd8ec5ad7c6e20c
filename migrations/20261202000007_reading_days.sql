-- The hourly rollups (migration 6) become 24 hourly cells per sensor per UTC day.
DROP TABLE reading_hours;

-- Each sensor's rollups per UTC day in 24 hourly cells: a local day in any zone is whole
-- hours of one or two UTC days (plus the 15-minute buckets of an hour a :30 or :45
-- boundary splits), so a year of daily averages reads ~366 rows, not ~35,000 buckets
-- or ~8,800 hours. Empty cells hold count 0, min +Infinity, max -Infinity. Sums are
-- float8: the exact NUMERIC sums are the buckets'.
CREATE TABLE reading_days (
    sensor_id  uuid     NOT NULL REFERENCES sensors (id) ON DELETE CASCADE,
    day        date     NOT NULL,
    counts     bigint[] NOT NULL,
    sums       float8[] NOT NULL,
    mins       float8[] NOT NULL,
    maxs       float8[] NOT NULL,
    PRIMARY KEY (sensor_id, day)
);

-- A day's 24 cells from sparse (hour, value) pairs; hours without a value get `empty`.
CREATE FUNCTION day_cells(hours int[], vals anyarray, empty anyelement) RETURNS anyarray
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(coalesce(u.v, empty) ORDER BY i)
    FROM generate_series(0, 23) i LEFT JOIN unnest(hours, vals) AS u(h, v) ON u.h = i
$$;

-- Cell by cell: sums, least and greatest of two days' cells.
CREATE FUNCTION cells_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT array_agg(x + y ORDER BY i) FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i));
CREATE FUNCTION cells_add(a float8[], b float8[]) RETURNS float8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT array_agg(x + y ORDER BY i) FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i));
CREATE FUNCTION cells_least(a float8[], b float8[]) RETURNS float8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT array_agg(least(x, y) ORDER BY i) FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i));
CREATE FUNCTION cells_greatest(a float8[], b float8[]) RETURNS float8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT array_agg(greatest(x, y) ORDER BY i) FROM unnest(a, b) WITH ORDINALITY AS t(x, y, i));

-- Rebuilds a sensor's days from its buckets (the data migration below, and rollups
-- loaded in bulk by the benchmark).
CREATE FUNCTION rebuild_reading_days(sensor uuid, first date, last date) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM reading_days WHERE sensor_id = sensor AND day BETWEEN first AND last;
    INSERT INTO reading_days (sensor_id, day, counts, sums, mins, maxs)
    SELECT sensor_id, day,
           day_cells(array_agg(h), array_agg(n), 0::bigint),
           day_cells(array_agg(h), array_agg(s), 0::float8),
           day_cells(array_agg(h), array_agg(lo), 'Infinity'::float8),
           day_cells(array_agg(h), array_agg(hi), '-Infinity'::float8)
    FROM (SELECT sensor_id, (bucket AT TIME ZONE 'UTC')::date AS day,
                 extract(hour FROM bucket AT TIME ZONE 'UTC')::int AS h,
                 sum(count)::bigint AS n, sum(sum)::float8 AS s, min(min) AS lo, max(max) AS hi
          FROM reading_buckets
          WHERE sensor_id = sensor AND bucket >= first::timestamp AT TIME ZONE 'UTC'
            AND bucket < (last + 1)::timestamp AT TIME ZONE 'UTC'
          GROUP BY 1, 2, 3) h
    GROUP BY sensor_id, day;
$$;
SELECT rebuild_reading_days(id, '1970-01-01', '2999-12-31') FROM sensors;
