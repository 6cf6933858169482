//! The controller state machine as a simulator application, so that controller commands can
//! run through a simulated Raft group under crashes, partitions and message loss.

use bytes::Bytes;

use super::state_machine::{Settings, StateMachine};
use crate::raft::{Entry, EntryKind, Snapshot};
use crate::sim::App;

/// One controller replica inside the simulator. Normal entries are controller commands;
/// the reply to a command is its encoded [`super::Reply`] (empty for no-op and membership
/// entries).
#[derive(Clone, Debug)]
pub struct ControllerApp {
    pub sm: StateMachine,
}

impl Default for ControllerApp {
    fn default() -> Self {
        ControllerApp {
            sm: StateMachine::new(Settings::default()).expect("default settings are valid"),
        }
    }
}

impl App for ControllerApp {
    fn apply(&mut self, entry: &Entry) -> Result<Bytes, String> {
        if entry.index <= self.sm.applied_index() {
            return Err(format!(
                "apply out of order: got index {} after {}",
                entry.index,
                self.sm.applied_index()
            ));
        }
        let payload: &[u8] = match entry.kind {
            EntryKind::Normal => &entry.data,
            EntryKind::Noop | EntryKind::Conf => &[],
        };
        Ok(match self.sm.apply(entry.index, payload) {
            Some(reply) => Bytes::from(reply.encode()),
            None => Bytes::new(),
        })
    }

    fn snapshot(&self) -> Bytes {
        Bytes::from(self.sm.snapshot())
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let sm = StateMachine::restore(self.sm.settings().clone(), &snapshot.data)
            .map_err(|e| format!("controller snapshot at {}: {e}", snapshot.meta.index))?;
        if sm.applied_index() != snapshot.meta.index {
            return Err(format!(
                "controller snapshot at {} claims applied index {}",
                snapshot.meta.index,
                sm.applied_index()
            ));
        }
        self.sm = sm;
        Ok(())
    }
}
