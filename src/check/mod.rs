//! The linearizability checker for recorded key-value histories.
//!
//! - [`history`]: the JSON-lines history format (`--history-out DIR` of the simulator), its serde
//!   types, reader and writer (a file, or every `*.jsonl` of a directory), and a [`Recorder`]
//!   that builds a history from invoke / complete / fail events. Keys and values are bytes: a
//!   JSON string when UTF-8, else `{"hex": "..."}`.
//! - [`linearizable`]: Wing & Gong / Porcupine search per key, with memoisation, timed-out writes
//!   treated as possibly applied, and a step and time budget that ends in an `Unknown` verdict.
//!
//! ```
//! use tynamo::check::{check_history, read_history, CheckConfig, Verdict};
//! let text = r#"{"client":1,"op":"put","key":"k","value":"v","invoke":1,"complete":2,"status":"ok"}
//! {"client":2,"op":"get","key":"k","invoke":3,"complete":4,"result":null,"status":"ok"}"#;
//! let history = read_history(text.as_bytes()).unwrap();
//! let report = check_history(&history, &CheckConfig::default());
//! // The get started after the put completed, yet saw nothing.
//! assert!(matches!(report.verdict, Verdict::NotLinearizable { .. }));
//! ```

pub mod history;
pub mod linearizable;

pub use history::{
    read_history, read_history_dir, read_history_file, write_history, ClientId, HistoryError,
    HistoryWriter, JsonBytes, OpId, OpKind, Record, Recorder, Status,
};
pub use linearizable::{check_history, CheckConfig, CheckReport, Verdict};
