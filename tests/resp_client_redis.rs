//! The client library against real Redis (standalone and a 3-master Redis Cluster) and against
//! tiny fake servers that misbehave on purpose.

#[path = "resp_redis_support.rs"]
mod support;

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use support::{redis_available, redis_cli, RedisCluster, RedisServer};
use tynamo::client::{
    network_executor, Batch, ClientError, ClientOptions, ClusterClient, ConnectOptions, Connection,
};
use tynamo::resp::frame::{self, Frame, Limits};
use tynamo::shard::slots::key_slot;

fn run<G, F, T>(make: G) -> T
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    network_executor("test")
        .spawn(make)
        .expect("start executor")
        .join()
        .expect("executor thread")
}

fn bulk(s: &str) -> Frame {
    Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
}

fn ok() -> Frame {
    Frame::Simple(Bytes::from_static(b"OK"))
}

#[test]
fn pipelined_requests_get_their_own_replies_in_order() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start(&[]);
    let addr = redis.addr();
    run(move || async move {
        let mut conn = Connection::connect(addr, &ConnectOptions::default())
            .await
            .unwrap();
        for i in 0..1000 {
            let (k, v) = (format!("k{i}"), format!("v{i}"));
            conn.queue(&[b"SET", k.as_bytes(), v.as_bytes()]).unwrap();
            conn.queue(&[b"GET", k.as_bytes()]).unwrap();
        }
        assert_eq!(conn.in_flight(), 2000);
        conn.flush().await.unwrap();
        for i in 0..1000 {
            assert_eq!(conn.read_reply().await.unwrap(), ok());
            assert_eq!(conn.read_reply().await.unwrap(), bulk(&format!("v{i}")));
        }
        assert_eq!(conn.in_flight(), 0);
    });
}

#[test]
fn unreachable_target_is_a_connect_error_naming_it() {
    // A port nobody listens on: bind, learn the port, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let err = run(move || async move {
        Connection::connect(addr, &ConnectOptions::default())
            .await
            .err()
    });
    match err {
        Some(ClientError::Connect { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// A server that reads one request and answers `answer`, then keeps the socket open.
fn fake_server(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer);
            // Hold the connection until the client goes away.
            let _ = s.read(&mut buf);
        }
    });
    addr
}

#[test]
fn garbage_answer_is_a_protocol_error() {
    let addr = fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    let err = run(move || async move {
        let mut conn = Connection::connect(addr, &ConnectOptions::default())
            .await
            .unwrap();
        conn.call(&[b"PING"]).await.err()
    });
    assert!(matches!(err, Some(ClientError::Protocol { .. })), "{err:?}");
    assert!(err.unwrap().to_string().contains("Protocol error"));
}

#[test]
fn silent_server_is_a_timeout_not_a_hang() {
    let addr = fake_server(b"");
    let err = run(move || async move {
        let options = ConnectOptions {
            io_timeout: Duration::from_millis(200),
            ..ConnectOptions::default()
        };
        let mut conn = Connection::connect(addr, &options).await.unwrap();
        conn.call(&[b"PING"]).await.err()
    });
    assert!(matches!(err, Some(ClientError::Timeout { .. })), "{err:?}");
}

#[test]
fn plain_redis_gets_plain_writes_and_lost_connections_are_retried() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start(&[]);
    let (addr, port) = (redis.addr(), redis.port);
    run(move || async move {
        let mut client = ClusterClient::connect_single(addr, ClientOptions::default())
            .await
            .unwrap();
        // Redis has no TYNAMO.SESSION: the client falls back to plain writes.
        assert!(!client.exactly_once());
        assert_eq!(client.call(&[b"SET", b"a", b"1"]).await.unwrap(), ok());
        // Kill our connection from the server side; the next request must reconnect and succeed.
        let killed: u32 = redis_cli(port, &["CLIENT", "KILL", "TYPE", "normal"])
            .parse()
            .unwrap();
        assert!(killed >= 1);
        assert_eq!(client.call(&[b"GET", b"a"]).await.unwrap(), bulk("1"));
        let stats = client.stats();
        assert!(stats.retried >= 1 && stats.connects == 2, "{stats:?}");
    });
}

#[test]
fn cluster_client_routes_every_key_to_its_owner_without_redirects() {
    if !redis_available() {
        return;
    }
    let cluster = RedisCluster::start();
    let seed = cluster.nodes[1].addr();
    let owners: Vec<(String, u16)> = (0..200)
        .map(|i| {
            let key = format!("key:{i}");
            let owner = cluster.nodes[cluster.owner_of(key_slot(key.as_bytes()))].port;
            (key, owner)
        })
        .collect();
    run(move || async move {
        let mut client = ClusterClient::connect_cluster(&[seed], ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(client.node_addrs().len(), 3);
        for (key, owner) in &owners {
            assert_eq!(
                client.slot_owner(key_slot(key.as_bytes())).unwrap().port(),
                *owner,
                "{key}"
            );
        }
        let mut batch = Batch::new();
        for (key, _) in &owners {
            batch.push(
                Some(key.as_bytes()),
                true,
                &[b"SET", key.as_bytes(), key.as_bytes()],
            );
        }
        client.execute(&mut batch).await.unwrap();
        batch.clear();
        for (key, _) in &owners {
            batch.push(Some(key.as_bytes()), false, &[b"GET", key.as_bytes()]);
        }
        client.execute(&mut batch).await.unwrap();
        for (i, (key, _)) in owners.iter().enumerate() {
            assert_eq!(batch.reply(i), &bulk(key));
        }
        assert_eq!(client.stats().moved + client.stats().asked, 0);
    });
}

/// Moves an empty slot from node `from` to node `to`, as `redis-cli --cluster reshard` does.
fn move_empty_slot(cluster: &RedisCluster, slot: u16, from: usize, to: usize) {
    let (s, to_id, from_id) = (slot.to_string(), cluster.node_id(to), cluster.node_id(from));
    assert_eq!(
        redis_cli(
            cluster.nodes[to].port,
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]
        ),
        "OK"
    );
    assert_eq!(
        redis_cli(
            cluster.nodes[from].port,
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]
        ),
        "OK"
    );
    for n in &cluster.nodes {
        assert_eq!(
            redis_cli(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]),
            "OK"
        );
    }
}

#[test]
fn moved_is_followed_and_the_slot_map_refreshed() {
    if !redis_available() {
        return;
    }
    let cluster = RedisCluster::start();
    let key = "moving-key";
    let slot = key_slot(key.as_bytes());
    let from = cluster.owner_of(slot);
    let to = (from + 1) % 3;
    let seed = cluster.nodes[0].addr();
    let to_port = cluster.nodes[to].port;
    // Learn the map first, then move the slot behind the client's back.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let handle = network_executor("test")
        .spawn(move || async move {
            let mut client = ClusterClient::connect_cluster(&[seed], ClientOptions::default())
                .await
                .unwrap();
            done_tx.send(()).unwrap();
            rx.recv().unwrap();
            assert_eq!(
                client.call(&[b"SET", key.as_bytes(), b"v"]).await.unwrap(),
                ok()
            );
            assert_eq!(client.stats().moved, 1);
            assert_eq!(client.slot_owner(slot).unwrap().port(), to_port);
        })
        .unwrap();
    done_rx.recv().unwrap();
    move_empty_slot(&cluster, slot, from, to);
    tx.send(()).unwrap();
    handle.join().unwrap();
    assert_eq!(redis_cli(to_port, &["GET", key]), "v");
}

#[test]
fn ask_is_followed_during_migration_and_tryagain_is_bounded() {
    if !redis_available() {
        return;
    }
    let cluster = RedisCluster::start();
    let (present, absent) = ("{mig}present", "{mig}absent");
    let slot = key_slot(present.as_bytes());
    let from = cluster.owner_of(slot);
    let to = (from + 1) % 3;
    assert_eq!(
        redis_cli(cluster.nodes[from].port, &["SET", present, "old"]),
        "OK"
    );
    let s = slot.to_string();
    let (from_id, to_id) = (cluster.node_id(from), cluster.node_id(to));
    redis_cli(
        cluster.nodes[to].port,
        &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id],
    );
    redis_cli(
        cluster.nodes[from].port,
        &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id],
    );
    let seed = cluster.nodes[0].addr();
    let from_port = cluster.nodes[from].port;
    run(move || async move {
        let options = ClientOptions {
            attempts_max: 2,
            backoff_initial: Duration::from_millis(1),
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_cluster(&[seed], options)
            .await
            .unwrap();
        // The key is not on the migrating node: it answers -ASK, the client asks the importer.
        assert_eq!(
            client
                .call(&[b"SET", absent.as_bytes(), b"new"])
                .await
                .unwrap(),
            ok()
        );
        assert_eq!(client.stats().asked, 1);
        // The map does not change during a migration.
        assert_eq!(client.slot_owner(slot).unwrap().port(), from_port);
        // A key still on the migrating node is served there.
        assert_eq!(
            client.call(&[b"GET", present.as_bytes()]).await.unwrap(),
            bulk("old")
        );
        // One key here, one moved: Redis answers -TRYAGAIN until the migration ends.
        let err = client
            .call(&[b"MGET", present.as_bytes(), absent.as_bytes()])
            .await
            .unwrap_err();
        match err {
            ClientError::RetriesExhausted { attempts, last, .. } => {
                assert_eq!(attempts, 3);
                assert!(last.starts_with("TRYAGAIN"), "{last}");
            }
            other => panic!("expected RetriesExhausted, got {other}"),
        }
    });
    assert_eq!(
        redis_cli(cluster.nodes[to].port, &["CLUSTER", "COUNTKEYSINSLOT", &s]),
        "1"
    );
}

/// A fake TynamoDB: accepts TYNAMO.SESSION, drops the first connection right after receiving
/// the first write (as a crashed leader would), answers on the second. Returns every request.
fn session_server() -> (SocketAddr, std::thread::JoinHandle<Vec<Vec<Bytes>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for connection in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = BytesMut::new();
            let mut args = Vec::new();
            let mut chunk = [0u8; 4096];
            'conn: loop {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
                while frame::decode_request(&mut buf, &Limits::DEFAULT, &mut args).unwrap() {
                    seen.push(args.clone());
                    if args[0].as_ref() == b"TYNAMO.SESSION" {
                        s.write_all(b"+OK\r\n").unwrap();
                    } else if connection == 0 {
                        break 'conn; // crash before answering
                    } else {
                        s.write_all(b"+OK\r\n").unwrap();
                        return seen;
                    }
                }
            }
        }
        seen
    });
    (addr, handle)
}

#[test]
fn a_retried_write_carries_the_same_sequence() {
    let (addr, server) = session_server();
    let client_id = run(move || async move {
        let options = ClientOptions {
            backoff_initial: Duration::from_millis(1),
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_single(addr, options).await.unwrap();
        assert!(client.exactly_once());
        assert_eq!(client.call(&[b"SET", b"k", b"v"]).await.unwrap(), ok());
        assert_eq!(client.stats().retried, 1);
        client.client_id()
    });
    let seen = server.join().unwrap();
    let words: Vec<Vec<String>> = seen
        .iter()
        .map(|a| {
            a.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        })
        .collect();
    let id = client_id.to_string();
    let session = vec!["TYNAMO.SESSION".to_string(), id];
    let write: Vec<String> = ["TYNAMO.SEQ", "1", "1", "SET", "k", "v"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(words, vec![session.clone(), write.clone(), session, write]);
}

#[test]
fn a_dead_server_ends_in_retries_exhausted_after_the_bound() {
    // Answers the session probe as Redis would, then dies (listener and connection closed).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"-ERR unknown command 'TYNAMO.SESSION', with args beginning with: \r\n")
            .unwrap();
    });
    let (err, stats) = run(move || async move {
        let options = ClientOptions {
            attempts_max: 3,
            backoff_initial: Duration::from_millis(1),
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_single(addr, options).await.unwrap();
        server.join().unwrap();
        let mut batch = Batch::new();
        for i in 0..50u32 {
            let key = i.to_string();
            batch.push(Some(key.as_bytes()), false, &[b"GET", key.as_bytes()]);
        }
        (
            client.execute(&mut batch).await.unwrap_err(),
            client.stats(),
        )
    });
    match err {
        ClientError::RetriesExhausted { attempts, last, .. } => {
            assert_eq!(attempts, 4);
            assert!(
                last.starts_with(&format!("cannot connect to {addr}")),
                "{last}"
            );
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    // One connection, then every retry round failed to connect: no connect storm per request.
    assert_eq!(stats.connects, 1);
    assert_eq!(stats.retried, 50 * 4);
}

/// A server whose every answer comes from `answer` (one thread per connection).
fn scripted_server(answer: fn(SocketAddr, &[Bytes]) -> Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let (mut buf, mut args, mut chunk) = (BytesMut::new(), Vec::new(), [0u8; 4096]);
                loop {
                    let n = match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while frame::decode_request(&mut buf, &Limits::DEFAULT, &mut args).unwrap() {
                        if s.write_all(&answer(addr, &args)).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_hole_in_the_slot_map_is_retried_then_reported_and_the_client_stays_usable() {
    // Owns slots 0..=100 only.
    let addr = scripted_server(|me, args| {
        let mut out = BytesMut::new();
        match args[0].to_ascii_uppercase().as_slice() {
            b"CLUSTER" => {
                let reply = format!(
                    "*1\r\n*3\r\n:0\r\n:100\r\n*2\r\n$9\r\n127.0.0.1\r\n:{}\r\n",
                    me.port()
                );
                out.extend_from_slice(reply.as_bytes());
            }
            b"GET" => frame::put_bulk(&mut out, b"v"),
            _ => frame::put_error(&mut out, b"ERR unknown command"),
        }
        out.to_vec()
    });
    let owned_key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| key_slot(k.as_bytes()) <= 100)
        .unwrap();
    let (err, reply, stats) = run(move || async move {
        let options = ClientOptions {
            attempts_max: 2,
            backoff_initial: Duration::from_millis(1),
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_cluster(&[addr], options)
            .await
            .unwrap();
        let err = client.call(&[b"GET", b"foo"]).await.unwrap_err();
        let reply = client.call(&[b"GET", owned_key.as_bytes()]).await.unwrap();
        (err, reply, client.stats())
    });
    match err {
        ClientError::RetriesExhausted { last, attempts, .. } => {
            assert_eq!(last, "slot 12182 has no owner in the slot map");
            assert_eq!(attempts, 3);
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    assert_eq!(reply, bulk("v"));
    assert_eq!(stats.retried, 3);
}

/// Where the MOVED of the test below points (a `fn` server cannot capture it).
static MOVED_TO: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

#[test]
fn a_moved_answer_outlives_a_refreshed_map_that_still_names_the_old_node() {
    // `b` serves every key. `a` claims every slot in CLUSTER SLOTS but answers MOVED to `b`:
    // a host that does not know yet who leads a group lists a follower first. The map the
    // client refreshes from `a` after the MOVED undoes it; applied again, the MOVED wins.
    let b = scripted_server(|me, args| {
        let mut out = BytesMut::new();
        match args[0].to_ascii_uppercase().as_slice() {
            b"CLUSTER" => slots_of(me, &mut out),
            b"GET" => frame::put_bulk(&mut out, b"v"),
            _ => frame::put_error(&mut out, b"ERR unknown command"),
        }
        out.to_vec()
    });
    MOVED_TO.set(b).unwrap();
    let a = scripted_server(|me, args| {
        let mut out = BytesMut::new();
        match args[0].to_ascii_uppercase().as_slice() {
            b"CLUSTER" => slots_of(me, &mut out),
            b"GET" => {
                let slot = key_slot(&args[1]);
                let to = MOVED_TO.get().unwrap();
                frame::put_error(&mut out, format!("MOVED {slot} {to}").as_bytes());
            }
            _ => frame::put_error(&mut out, b"ERR unknown command"),
        }
        out.to_vec()
    });
    let (replies, stats) = run(move || async move {
        let options = ClientOptions {
            redirects_max: 4,
            exactly_once: false,
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_cluster(&[a], options).await.unwrap();
        let first = client.call(&[b"GET", b"foo"]).await.unwrap();
        // The slot stays with `b` for the next request: no second redirect.
        let second = client.call(&[b"GET", b"foo"]).await.unwrap();
        (vec![first, second], client.stats())
    });
    assert_eq!(replies, vec![bulk("v"), bulk("v")]);
    assert_eq!(stats.moved, 1);
}

/// Where the old owner of the test below sends its ASKs, and how many more times the new owner
/// bounces a request back with MOVED before it has the slot (`u32::MAX`: never settles).
static ASK_TO: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
static MOVED_BACK_TO: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
static BOUNCES_LEFT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A `CLUSTER SLOTS` answer that gives every slot to `me`.
fn slots_of(me: SocketAddr, out: &mut BytesMut) {
    let reply = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{}\r\n",
        me.port()
    );
    out.extend_from_slice(reply.as_bytes());
}

#[test]
fn redirections_that_bounce_during_a_move_back_off_and_stay_bounded() {
    use std::sync::atomic::Ordering::SeqCst;
    // `new` answers ASKING, then MOVED back to `old` until the slot arrives, as a node that has
    // not yet applied the configuration that gives it the slot does. `old` answers ASK.
    let new = scripted_server(|_, args| {
        let mut out = BytesMut::new();
        match args[0].to_ascii_uppercase().as_slice() {
            b"ASKING" => frame::put_simple(&mut out, b"OK"),
            b"GET" => {
                let left = BOUNCES_LEFT.load(SeqCst);
                if left == 0 {
                    frame::put_bulk(&mut out, b"v");
                } else {
                    if left != u32::MAX {
                        BOUNCES_LEFT.store(left - 1, SeqCst);
                    }
                    let to = MOVED_BACK_TO.get().unwrap();
                    let slot = key_slot(&args[1]);
                    frame::put_error(&mut out, format!("MOVED {slot} {to}").as_bytes());
                }
            }
            _ => frame::put_error(&mut out, b"ERR unknown command"),
        }
        out.to_vec()
    });
    ASK_TO.set(new).unwrap();
    let old = scripted_server(|me, args| {
        let mut out = BytesMut::new();
        match args[0].to_ascii_uppercase().as_slice() {
            b"CLUSTER" => slots_of(me, &mut out),
            b"GET" => {
                let slot = key_slot(&args[1]);
                let to = ASK_TO.get().unwrap();
                frame::put_error(&mut out, format!("ASK {slot} {to}").as_bytes());
            }
            _ => frame::put_error(&mut out, b"ERR unknown command"),
        }
        out.to_vec()
    });
    MOVED_BACK_TO.set(old).unwrap();
    // 40 bounces are 80 redirections, five times `redirects_max`: the client waits between
    // runs of them and gets its answer once the move is over.
    BOUNCES_LEFT.store(40, SeqCst);
    let (reply, stats) = run(move || async move {
        let options = ClientOptions {
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            exactly_once: false,
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_cluster(&[old], options)
            .await
            .unwrap();
        let reply = client.call(&[b"GET", b"foo"]).await.unwrap();
        (reply, client.stats())
    });
    assert_eq!(reply, bulk("v"));
    assert_eq!(stats.asked, 41);
    assert_eq!(stats.moved, 40);
    // A move that never settles still ends in an error after `attempts_max` waits.
    BOUNCES_LEFT.store(u32::MAX, SeqCst);
    let err = run(move || async move {
        let options = ClientOptions {
            redirects_max: 4,
            attempts_max: 3,
            backoff_initial: Duration::from_millis(1),
            exactly_once: false,
            ..ClientOptions::default()
        };
        let mut client = ClusterClient::connect_cluster(&[old], options)
            .await
            .unwrap();
        client.call(&[b"GET", b"foo"]).await.unwrap_err()
    });
    match err {
        ClientError::RetriesExhausted {
            attempts,
            redirects,
            ..
        } => {
            assert_eq!(attempts, 4);
            assert_eq!(redirects, 4 * 5);
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
}
