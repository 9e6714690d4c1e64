-- Up Migration

-- A device cookie now names the credential version it was issued under (a password change or
-- "sign out everywhere" retires them all), and the failures of an account's known devices count
-- together, by account: nothing looks failures up by device id any more.
DROP INDEX login_failures_device_at_idx;

-- Down Migration

CREATE INDEX login_failures_device_at_idx ON login_failures (device, at) WHERE device IS NOT NULL;
