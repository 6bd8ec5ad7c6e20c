-- Each sensor's 96 15-minute buckets of a UTC day in one row. A local day that starts
-- inside an hour (zones at :30 and :45) takes that hour's quarters on either side of its
-- start: read from these rows, fetched in the same range as the days' hourly cells, a
-- year costs about what the hourly cells do (0.8 ms), where four buckets per day from
-- reading_buckets were 366 index probes (~2 ms). A table of its own: in reading_days'
-- rows (5.3 kB, one a page) every zone's year would read six times the pages. Empty
-- cells hold count 0, min +Infinity, max -Infinity; sums are float8 (the exact NUMERIC
-- sums are the buckets').
CREATE TABLE reading_day_quarters (
    sensor_id  uuid     NOT NULL REFERENCES sensors (id) ON DELETE CASCADE,
    day        date     NOT NULL,
    counts     bigint[] NOT NULL,
    sums       float8[] NOT NULL,
    mins       float8[] NOT NULL,
    maxs       float8[] NOT NULL,
    PRIMARY KEY (sensor_id, day)
) WITH (toast_tuple_target = 8160);

-- A day's 96 cells from sparse (quarter, value) pairs (quarters 0..95); quarters
-- without a value get `empty`.
CREATE FUNCTION quarter_cells(quarters int[], vals anyarray, empty anyelement)
RETURNS anyarray LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_agg(coalesce(u.v, empty) ORDER BY i)
    FROM generate_series(0, 95) i LEFT JOIN unnest(quarters, vals) AS u(q, v) ON u.q = i
$$;

-- Rebuilds a sensor's quarters from its buckets.
CREATE FUNCTION rebuild_reading_day_quarters(sensor uuid, first date, last date)
RETURNS void LANGUAGE sql AS $$
    DELETE FROM reading_day_quarters WHERE sensor_id = sensor AND day BETWEEN first AND last;
    INSERT INTO reading_day_quarters (sensor_id, day, counts, sums, mins, maxs)
    SELECT sensor_id, day,
           quarter_cells(array_agg(q), array_agg(count), 0::bigint),
           quarter_cells(array_agg(q), array_agg(sum::float8), 0::float8),
           quarter_cells(array_agg(q), array_agg(min), 'Infinity'::float8),
           quarter_cells(array_agg(q), array_agg(max), '-Infinity'::float8)
    FROM (SELECT sensor_id, (bucket AT TIME ZONE 'UTC')::date AS day,
                 extract(hour FROM bucket AT TIME ZONE 'UTC')::int * 4
                   + extract(minute FROM bucket AT TIME ZONE 'UTC')::int / 15 AS q,
                 count, sum, min, max
          FROM reading_buckets
          WHERE sensor_id = sensor AND bucket >= first::timestamp AT TIME ZONE 'UTC'
            AND bucket < (last + 1)::timestamp AT TIME ZONE 'UTC') b
    GROUP BY sensor_id, day;
$$;

-- Rebuilds a sensor's days, hourly cells and quarters, from its buckets (rollups loaded
-- in bulk by the benchmark).
CREATE OR REPLACE FUNCTION rebuild_reading_days(sensor uuid, first date, last date)
RETURNS void LANGUAGE sql AS $$
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
    SELECT rebuild_reading_day_quarters(sensor, first, last);
$$;

SELECT rebuild_reading_day_quarters(id, '0001-01-01', '9999-12-30') FROM sensors;
