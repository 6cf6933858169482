//! The check for stale reads, which are not linearizable and so not in the checked history:
//! a stale read may return an old value or none, but never a value that was never written.
//!
//! Every write's value is one token `"<client>.<op>;"`, unique in the run, so a value read is
//! the token of the put that started it (or of an append on a missing key) followed by append
//! tokens. It passes when every token belongs to a put or append on that key invoked before the
//! read completed, only the first may be a put's, and none appears twice (a write applied twice
//! is not a value that was ever written either).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::check::OpKind;

/// Writes invoked so far, by key and token.
#[derive(Default, Debug)]
pub struct StaleReadCheck {
    written: BTreeMap<Bytes, BTreeMap<Bytes, OpKind>>,
    /// Stale reads checked so far.
    pub checked: u64,
}

impl StaleReadCheck {
    /// Records a put or append as soon as it is invoked: from then on it may be visible.
    pub fn on_write_invoked(&mut self, key: &Bytes, kind: OpKind, value: &Bytes) {
        debug_assert!(matches!(kind, OpKind::Put | OpKind::Append));
        self.written
            .entry(key.clone())
            .or_default()
            .insert(value.clone(), kind);
    }

    /// Checks one stale read of `key` that returned `value`.
    pub fn check(&mut self, key: &Bytes, value: Option<&Bytes>) -> Result<(), String> {
        self.checked += 1;
        let Some(value) = value else {
            return Ok(());
        };
        let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let written = self.written.get(key);
        if value.is_empty() || !value.ends_with(b";") {
            return Err(format!(
                "stale read of {} returned {:?}, not a sequence of written values",
                show(key),
                show(value)
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, token) in value.split_inclusive(|&b| b == b';').enumerate() {
            let kind = written.and_then(|w| w.get(token));
            let allowed = match kind {
                Some(OpKind::Append) => true,
                Some(OpKind::Put) => i == 0,
                _ => false,
            };
            if !allowed || !seen.insert(token) {
                return Err(format!(
                    "stale read of {} returned {:?}: piece {:?} (#{i}) was {}",
                    show(key),
                    show(value),
                    show(token),
                    match kind {
                        None => "never written to this key",
                        Some(_) if !allowed => "a put in the middle of the value",
                        Some(_) => "applied twice",
                    }
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn written_sequences_pass_and_forgeries_fail() {
        let mut c = StaleReadCheck::default();
        c.on_write_invoked(&b("k"), OpKind::Put, &b("1.1;"));
        c.on_write_invoked(&b("k"), OpKind::Append, &b("2.1;"));
        c.on_write_invoked(&b("k"), OpKind::Append, &b("3.1;"));
        c.on_write_invoked(&b("j"), OpKind::Append, &b("4.1;"));
        for ok in [None, Some("1.1;"), Some("1.1;3.1;2.1;"), Some("2.1;")] {
            c.check(&b("k"), ok.map(b).as_ref()).unwrap();
        }
        for bad in [
            "",
            "1.1",
            "9.9;",
            "4.1;",
            "2.1;1.1;",
            "1.1;2.1;2.1;",
            "1.1;x",
        ] {
            assert!(c.check(&b("k"), Some(&b(bad))).is_err(), "{bad:?} passed");
        }
        assert_eq!(c.checked, 11);
    }
}
