//! A cluster of `tynamo server` processes on loopback: the initial hosts from
//! `--initial-cluster`, and the hosts that join later with `--join` (or restart from their data
//! directory alone). Host h (1-based) serves clients on `base + 10 (h - 1) + core` and peers on
//! that + 100 (core 0), as `tynamo demo`. Dropping it kills every host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use super::free_base;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Running hosts by id.
    pub children: BTreeMap<u16, Child>,
    pub base: u16,
    /// Cores of host `id` at `cores[id - 1]`; hosts 1..=initial are in `--initial-cluster`.
    pub cores: Vec<u16>,
    pub initial: u16,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    /// A cluster of `cores.len()` possible hosts whose first `initial` start now.
    pub fn start(cores: &[u16], initial: u16) -> Cluster {
        let base = free_base(cores.len() as u16, *cores.iter().max().unwrap());
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            children: BTreeMap::new(),
            base,
            cores: cores.to_vec(),
            initial,
        };
        c.spawn_initial();
        c
    }

    /// Starts every initial host that is not running.
    pub fn spawn_initial(&mut self) {
        for id in 1..=self.initial {
            if !self.children.contains_key(&id) {
                self.spawn(id, true);
            }
        }
    }

    pub fn map(&self) -> String {
        (1..=self.initial)
            .map(|h| format!("{h}={}/{}", self.peer(h), self.addr(h, 0)))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn addr(&self, host: u16, core: u16) -> String {
        format!("127.0.0.1:{}", self.base + 10 * (host - 1) + core)
    }

    pub fn peer(&self, host: u16) -> String {
        format!("127.0.0.1:{}", self.base + 100 + 10 * (host - 1))
    }

    pub fn data(&self, id: u16) -> PathBuf {
        self.dir.path().join(format!("host-{id}"))
    }

    pub fn running(&self, id: u16) -> bool {
        self.children.contains_key(&id)
    }

    /// Starts host `id` (again) on its data directory; its log is appended to. A host beyond
    /// the initial ones runs with `--join` through host 1 when `seed` is set, and with nothing
    /// but its data directory and addresses when not (a restart).
    pub fn spawn(&mut self, id: u16, seed: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("host-{id}.log")))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tynamo"));
        cmd.args(["server", "--id", &id.to_string()])
            .arg("--data")
            .arg(self.data(id))
            .args(["--cores", &self.cores[usize::from(id - 1)].to_string()])
            .args(["--placement", "unbound"]);
        if id <= self.initial {
            cmd.args(["--initial-cluster", &self.map()]);
        } else {
            cmd.args(["--peer-addr", &self.peer(id)])
                .args(["--client-addr", &self.addr(id, 0)]);
            if seed {
                cmd.args(["--join", &self.addr(1, 0)]);
            }
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.children.insert(id, child);
    }

    /// SIGKILL: nothing the host did not fsync survives.
    pub fn kill(&mut self, id: u16) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every host and starts the initial ones again.
    pub fn restart_initial(&mut self) {
        let ids: Vec<u16> = self.children.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
        self.spawn_initial();
    }

    /// `ID=PEER,CLIENT,CORES` for `tynamo ctl join`.
    pub fn join_spec(&self, id: u16) -> String {
        format!(
            "{id}={},{},{}",
            self.peer(id),
            self.addr(id, 0),
            self.cores[usize::from(id - 1)]
        )
    }

    /// Client addresses of every core of the initial hosts (a client's seeds).
    pub fn seeds(&self) -> String {
        (1..=self.initial)
            .flat_map(|h| (0..self.cores[usize::from(h - 1)]).map(move |c| (h, c)))
            .map(|(h, c)| self.addr(h, c))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every host's log, each under a `--- host N` line, with what a running host's process is
    /// doing and whether its core 0 accepts clients (a host that never finished starting
    /// shows there).
    pub fn logs(&self) -> String {
        (1..=self.cores.len() as u16)
            .map(|id| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("host-{id}.log")))
                    .unwrap_or_default();
                let state = match self.children.get(&id) {
                    Some(c) => format!(
                        "{}\n  {} accepts clients: {}\n",
                        super::process_state(c.id()),
                        self.addr(id, 0),
                        super::accepts(&self.addr(id, 0))
                    ),
                    None => "not running\n".to_string(),
                };
                format!("--- host {id}\n{state}{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `tynamo ctl --cluster <addr> <args>`.
    pub fn ctl_at(&self, addr: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tynamo"))
            .args(["ctl", "--cluster", addr, "--timeout-ms", "20000"])
            .args(args)
            .output()
            .unwrap()
    }

    /// `tynamo ctl` through host 1.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_at(&self.addr(1, 0), args)
    }

    /// A change through `tynamo ctl`; returns the configuration it produced.
    pub fn change(&self, args: &[&str]) -> u64 {
        let out = self.ctl(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.trim()
            .strip_prefix("configuration ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("ctl {args:?} printed {text:?}"))
    }
}
