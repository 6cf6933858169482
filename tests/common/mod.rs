//! Shared by the real-process cluster tests (server, ctl, migration, join): one test at a time
//! per binary, a block of free loopback ports for a cluster, a cluster of server processes and
//! tynamo-bench as load.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tynamo::resp::frame::{decode, Frame, Limits};

// Not every test binary that includes this module runs a cluster or a bench.
#[allow(dead_code)]
pub mod bench;
#[allow(dead_code)]
pub mod cluster;

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_BASE: AtomicU64 = AtomicU64::new(0);

/// Serialises the cluster tests of one binary: each starts several multi-threaded servers, and
/// running them side by side on 2 CPUs would only make elections slower.
pub fn lock() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A base port such that client ports base + 10 h + c and peer ports base + 100 + 10 h + c are
/// free for every host h < `hosts` and core c < `cores`.
///
/// The blocks lie in 20000..32100, below the kernel's ephemeral range (32768 and up here): an
/// outgoing connection of any process may hold an ephemeral port, and with it a listener port a
/// test meant to bind. The start is spread by pid so that test binaries run side by side rarely
/// probe the same block; a block is still only free until someone binds it, which the servers
/// report with the address and the other user named.
pub fn free_base(hosts: u16, cores: u16) -> u16 {
    assert!(
        hosts <= 10 && cores <= 10,
        "a block has 10 hosts x 10 cores"
    );
    let pid = u64::from(std::process::id());
    for _ in 0..200 {
        let n = NEXT_BASE.fetch_add(1, Ordering::SeqCst);
        let base = 20_000 + ((pid * 7 + n * 211) % 120) as u16 * 100;
        let free = (0..hosts)
            .flat_map(|h| (0..cores).map(move |c| (h, c)))
            .all(|(h, c)| {
                [base + 10 * h + c, base + 100 + 10 * h + c]
                    .iter()
                    .all(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
            });
        if free {
            return base;
        }
    }
    panic!("no free port block found in 20000..32100");
}

// Not every test binary that includes this module sends raw requests.
#[allow(dead_code)]
/// Whether something accepts connections at `addr` now.
pub fn accepts(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
}

// Not every test binary that includes this module sends raw requests.
#[allow(dead_code)]
/// One RESP request on a fresh connection.
pub fn try_call(addr: &str, args: &[&str]) -> std::io::Result<Frame> {
    let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes())?;
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        if let Some(f) = decode(&mut buf, &Limits::DEFAULT).map_err(std::io::Error::other)? {
            return Ok(f);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// Not every test binary that includes this module reports on processes.
#[allow(dead_code)]
/// What a server process is doing, for a failure message: each thread's kernel wait channel,
/// and the files and sockets it holds. A core that never finished starting shows which store
/// it was opening, and a missing listener shows as a socket that is not there.
pub fn process_state(pid: u32) -> String {
    let mut out = format!("process {pid}:");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for t in tasks.into_iter().flatten().flatten() {
        let dir = t.path();
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push_str(&format!(
            " [{} {} wchan={}]",
            t.file_name().to_string_lossy(),
            read("comm"),
            read("wchan")
        ));
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"));
    let mut held: Vec<String> = fds
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| !p.starts_with("anon_inode") && !p.starts_with("/dev/"))
        .collect();
    held.sort();
    out.push_str(&format!("\n  holds: {}", held.join(", ")));
    out
}
