-- A sensor whose device secret or client changed, or that was deleted, is announced on
-- the channel `sensor_changes` (its id), so that every process forgets its cached
-- credentials at once and the MQTT front disconnects devices still using them.
CREATE FUNCTION notify_sensor_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensor_changes', OLD.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER sensors_changed
    AFTER UPDATE OF secret_hash, client_id OR DELETE ON sensors
    FOR EACH ROW EXECUTE FUNCTION notify_sensor_change();
