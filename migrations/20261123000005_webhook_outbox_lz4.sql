-- The outbox's packed records are compressed on every group write; lz4 costs a fraction
-- of the default pglz's CPU for about the same size. A server built without lz4 keeps
-- pglz.
DO $$
BEGIN
    ALTER TABLE webhook_outbox ALTER COLUMN documents SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available: webhook_outbox.documents keeps pglz';
END
$$;
