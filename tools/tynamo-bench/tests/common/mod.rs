//! Shared by the tynamo-bench end-to-end tests: reading what a run printed.

use std::collections::HashMap;
use std::process::Output;

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `key=value` pairs of the RESULT line, which must be the last line of stdout.
pub fn result_fields(out: &Output) -> HashMap<String, String> {
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("RESULT "),
        "last line is not RESULT: {last:?}\nstderr: {}",
        text(&out.stderr)
    );
    last["RESULT ".len()..]
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
