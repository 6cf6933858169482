//! Not yet written: see the open issues.
