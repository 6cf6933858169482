//! tynamo-wal: not yet written.
