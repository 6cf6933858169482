//! WAL benchmark: not yet written.
fn main() {}
