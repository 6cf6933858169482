//! `--local`: run a throwaway 3-host TynamoDB cluster for the duration of the benchmark.
//!
//! The cluster is one child process, `tynamo demo --hosts 3 --base-port P --data-dir D`, found
//! next to this binary (or at `$TYNAMO_BIN`). It is ready when its first port accepts
//! connections and answers `CLUSTER SLOTS` with every slot covered; it is killed and its data
//! directory removed when the benchmark ends (also on error). A child that exits before it
//! serves is reported with its exit status: until the server exists, that is what happens.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Hosts in the local cluster.
const HOSTS: u16 = 3;
/// How long the cluster may take to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// A running local cluster; dropping it stops it.
pub struct LocalCluster {
    child: Child,
    dir: PathBuf,
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

/// A base port with `HOSTS` consecutive free ports after it.
fn free_base_port() -> Result<u16, String> {
    for _ in 0..100 {
        let base = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        if base < u16::MAX - HOSTS
            && (1..HOSTS).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return Ok(base);
        }
    }
    Err("no run of free loopback ports found".into())
}

impl LocalCluster {
    pub fn start() -> Result<LocalCluster, String> {
        let binary = tynamo_binary()?;
        let base = free_base_port()?;
        let dir =
            std::env::temp_dir().join(format!("tynamo-bench-local-{}-{base}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let child = Command::new(&binary)
            .args([
                "demo",
                "--hosts",
                &HOSTS.to_string(),
                "--base-port",
                &base.to_string(),
            ])
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let seeds = (0..HOSTS)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], base + i)))
            .collect();
        let mut cluster = LocalCluster { child, dir, seeds };
        cluster.wait_ready(&binary)?;
        Ok(cluster)
    }

    fn wait_ready(&mut self, binary: &std::path::Path) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "--local is not available: `{} demo` exited ({status}) before serving",
                    binary.display()
                ));
            }
            if TcpStream::connect_timeout(&self.seeds[0], POLL).is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "--local: the cluster did not listen on {} within {READY_TIMEOUT:?}",
                    self.seeds[0]
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
