//! `--local`: run a throwaway 3-host TynamoDB cluster for the duration of the benchmark.
//!
//! The cluster is `tynamo demo` (the server's own "local 3-host cluster" command: three child
//! processes, data in a temporary directory, addresses printed on stdout, clean stop on Ctrl-C),
//! found next to this binary or at `$TYNAMO_BIN`. We:
//! - start it in its own process group, with stdout piped; every line it prints is copied to our
//!   stderr, and every `ip:port` in it is taken as a seed, in the order printed (the first one
//!   must be a client address: the demo prints the client addresses and `redis-cli -c` examples);
//! - wait (bounded) for the first address to accept connections; the client then reads the slot
//!   map with `CLUSTER SLOTS` as for any cluster;
//! - on drop, send SIGINT to the whole group (what Ctrl-C does, so the demo stops its hosts
//!   cleanly), wait (bounded), then SIGKILL the group, so no host outlives the benchmark.
//!
//! A demo that exits before printing an address is reported with its exit status (until the
//! server exists, that is what `tynamo demo` does).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the cluster may take to print its addresses and accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the demo may take to stop after SIGINT before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Seeds kept from the demo's output.
const SEEDS_MAX: usize = 64;

/// The demo's process group, for the signal handler (0: none).
static DEMO_GROUP: AtomicI32 = AtomicI32::new(0);

/// On Ctrl-C or SIGTERM, pass SIGINT on to the demo's group (it is not in our group, so the
/// terminal does not reach it) and then die of the signal as we would have without a handler.
extern "C" fn forward_and_die(signal: libc::c_int) {
    let group = DEMO_GROUP.load(Ordering::SeqCst);
    // SAFETY: kill, signal and raise are async-signal-safe; the atomic load is lock-free.
    unsafe {
        if group > 0 {
            libc::kill(-group, libc::SIGINT);
        }
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

fn install_signal_forwarding(group: i32) {
    DEMO_GROUP.store(group, Ordering::SeqCst);
    let handler = forward_and_die as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installs a handler that only calls async-signal-safe functions (see above).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// A running local cluster; dropping it stops it.
pub struct LocalCluster {
    child: Child,
    pub seeds: Vec<SocketAddr>,
}

fn tynamo_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TYNAMO_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot locate tynamo-bench itself: {e}"))?;
    let sibling = exe.with_file_name("tynamo");
    if sibling.exists() {
        Ok(sibling)
    } else {
        Err(format!(
            "no tynamo binary at {} (build it, or set TYNAMO_BIN)",
            sibling.display()
        ))
    }
}

/// Every `ip:port` token of a line (punctuation around it ignored).
pub fn addresses_in(line: &str) -> impl Iterator<Item = SocketAddr> + '_ {
    line.split(|c: char| {
        c.is_whitespace() || c == ',' || c == '(' || c == ')' || c == '"' || c == '\''
    })
    .map(|t| t.trim_end_matches(['.', ';']))
    .filter_map(|t| t.parse::<SocketAddr>().ok())
}

impl LocalCluster {
    pub fn start() -> Result<LocalCluster, String> {
        let binary = tynamo_binary()?;
        let mut child = Command::new(&binary)
            .arg("demo")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Its own process group: SIGINT/SIGKILL reach the hosts it starts, and a Ctrl-C
            // typed at our terminal is ours to handle.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {} demo: {e}", binary.display()))?;
        if let Ok(group) = i32::try_from(child.id()) {
            install_signal_forwarding(group);
        }
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    eprintln!("[tynamo demo] {line}");
                    for addr in addresses_in(&line) {
                        if tx.send(addr).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        let mut cluster = LocalCluster {
            child,
            seeds: Vec::new(),
        };
        cluster.wait_ready(&binary, &rx)?;
        Ok(cluster)
    }

    fn wait_ready(
        &mut self,
        binary: &std::path::Path,
        rx: &mpsc::Receiver<SocketAddr>,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            while let Ok(addr) = rx.try_recv() {
                if !self.seeds.contains(&addr) && self.seeds.len() < SEEDS_MAX {
                    self.seeds.push(addr);
                }
            }
            if let Some(first) = self.seeds.first() {
                if TcpStream::connect_timeout(first, POLL).is_ok() {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "--local is not available: `{} demo` exited ({status}) before serving",
                    binary.display()
                ));
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(match self.seeds.first() {
                    Some(a) => format!("--local: the cluster did not accept connections on {a} within {READY_TIMEOUT:?}"),
                    None => format!("--local: `tynamo demo` printed no ip:port within {READY_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

fn signal_group(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group we created for the child
    // (process_group(0) makes its pgid equal to its pid); it touches no memory of ours.
    unsafe {
        libc::kill(-pid, signal);
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        DEMO_GROUP.store(0, Ordering::SeqCst);
        if let Ok(Some(_)) = self.child.try_wait() {
            // The demo is gone; its hosts may not be.
            signal_group(&self.child, libc::SIGKILL);
            return;
        }
        signal_group(&self.child, libc::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(POLL);
        }
        // Whatever is left of the group (a demo that ignored SIGINT, or hosts it left behind).
        signal_group(&self.child, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_found_in_free_text() {
        let line =
            "host 1: clients at 127.0.0.1:7001, peers 127.0.0.1:7101. try: redis-cli -c -p 7001";
        let found: Vec<SocketAddr> = addresses_in(line).collect();
        assert_eq!(
            found,
            vec![
                "127.0.0.1:7001".parse().unwrap(),
                "127.0.0.1:7101".parse().unwrap()
            ]
        );
        assert_eq!(addresses_in("no address (localhost:1) here").count(), 0);
    }
}
