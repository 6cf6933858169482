//! One pipelined RESP connection on a glommio executor.
//!
//! Requests are encoded into a write buffer ([`Connection::queue`]), sent with one write
//! ([`Connection::flush`]), and their replies read back in the order they were sent
//! ([`Connection::read_reply`]): RESP servers answer a connection's requests in order, so the
//! n-th reply belongs to the n-th request. Many requests in flight on one connection is what
//! lets one client core drive a server at full speed (one syscall per batch, not per request).
//!
//! A connection belongs to one task on one executor (`&mut self`), as everything on a core.
//! Every wait is bounded: connect by `connect_timeout`, each read and write by `io_timeout`.

use super::error::ClientError;
use crate::resp::frame::{self, Frame, Limits};
use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// How a connection behaves. `Default` suits a benchmark or an application client.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// Bound on each read or write; a server silent for this long is reported, not waited for.
    pub io_timeout: Duration,
    /// Caps on replies (a reply over them is garbage, not something to buffer).
    pub limits: Limits,
    /// Bytes asked of the kernel per read.
    pub read_chunk_bytes: usize,
    /// Most requests queued or sent but not yet answered.
    pub in_flight_max: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(10),
            limits: Limits::DEFAULT,
            read_chunk_bytes: 16 * 1024,
            in_flight_max: 64 * 1024,
        }
    }
}

/// A pipelined connection to one RESP server.
pub struct Connection {
    addr: SocketAddr,
    stream: TcpStream,
    read_buf: BytesMut,
    /// The kernel reads into this fixed buffer and only the bytes received are appended to
    /// `read_buf`: cheaper than zeroing a fresh chunk of `read_buf` before every read.
    scratch: Box<[u8]>,
    write_buf: BytesMut,
    /// Requests queued or sent whose replies have not been read yet.
    in_flight: usize,
    options: ConnectOptions,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Connection {
    /// Opens a TCP connection (Nagle off: requests are batched by us, not by the kernel).
    pub async fn connect(
        addr: SocketAddr,
        options: &ConnectOptions,
    ) -> Result<Connection, ClientError> {
        assert!(options.read_chunk_bytes > 0 && options.in_flight_max > 0);
        let stream = match TcpStream::connect_timeout(addr, options.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                let e = io::Error::from(e);
                return Err(match e.kind() {
                    io::ErrorKind::TimedOut => ClientError::ConnectTimeout {
                        addr,
                        after_ms: millis(options.connect_timeout),
                    },
                    _ => ClientError::Connect { addr, source: e },
                });
            }
        };
        let setup = |r: glommio::Result<(), ()>| {
            r.map_err(|e| ClientError::Connect {
                addr,
                source: e.into(),
            })
        };
        setup(stream.set_nodelay(true))?;
        setup(stream.set_read_timeout(Some(options.io_timeout)))?;
        setup(stream.set_write_timeout(Some(options.io_timeout)))?;
        Ok(Connection {
            addr,
            stream,
            read_buf: BytesMut::with_capacity(options.read_chunk_bytes),
            scratch: vec![0u8; options.read_chunk_bytes].into_boxed_slice(),
            write_buf: BytesMut::with_capacity(options.read_chunk_bytes),
            in_flight: 0,
            options: options.clone(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests queued or sent whose replies have not been read.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a request (an array of bulk strings); it leaves on the next [`flush`](Self::flush).
    pub fn queue(&mut self, args: &[&[u8]]) -> Result<(), ClientError> {
        self.reserve_slot()?;
        frame::put_request(&mut self.write_buf, args);
        Ok(())
    }

    /// Queues an already encoded request (exactly one RESP request in `wire`).
    pub fn queue_encoded(&mut self, wire: &[u8]) -> Result<(), ClientError> {
        self.reserve_slot()?;
        self.write_buf.extend_from_slice(wire);
        Ok(())
    }

    /// Queues a request the caller encodes straight into the write buffer (zero copy): `encode`
    /// must append exactly one request.
    pub fn queue_with(&mut self, encode: impl FnOnce(&mut BytesMut)) -> Result<(), ClientError> {
        self.reserve_slot()?;
        encode(&mut self.write_buf);
        Ok(())
    }

    fn reserve_slot(&mut self) -> Result<(), ClientError> {
        if self.in_flight >= self.options.in_flight_max {
            return Err(ClientError::TooManyInFlight {
                addr: self.addr,
                in_flight_max: self.options.in_flight_max,
            });
        }
        self.in_flight += 1;
        Ok(())
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ClientError::Timeout {
                addr: self.addr,
                after_ms: millis(self.options.io_timeout),
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => ClientError::Closed {
                addr: self.addr,
                in_flight: self.in_flight,
            },
            _ => ClientError::Io {
                addr: self.addr,
                source: e,
            },
        }
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.write_buf).await;
        self.write_buf.clear();
        result.map_err(|e| self.io_error(e))
    }

    /// The next reply, in request order. Waits at most `io_timeout` for each read.
    pub async fn read_reply(&mut self) -> Result<Frame, ClientError> {
        loop {
            match frame::decode(&mut self.read_buf, &self.options.limits) {
                Ok(Some(reply)) => {
                    if self.in_flight == 0 {
                        // A reply nobody asked for: the stream is out of step, trust nothing.
                        return Err(ClientError::Unexpected {
                            addr: self.addr,
                            request: "no request",
                            reply: reply.to_string(),
                        });
                    }
                    self.in_flight -= 1;
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ClientError::Protocol {
                        addr: self.addr,
                        source,
                    })
                }
            }
            match self.stream.read(&mut self.scratch).await {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        addr: self.addr,
                        in_flight: self.in_flight,
                    });
                }
                Ok(n) => self.read_buf.extend_from_slice(&self.scratch[..n]),
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    /// Sends one request and waits for its reply (everything queued before it is answered
    /// first, so call it with nothing in flight).
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Frame, ClientError> {
        assert_eq!(
            self.in_flight, 0,
            "call() with replies outstanding would return the wrong one"
        );
        self.queue(args)?;
        self.flush().await?;
        self.read_reply().await
    }

    /// `call` that turns an error reply into [`ClientError::Server`].
    pub async fn call_ok(&mut self, args: &[&[u8]]) -> Result<Frame, ClientError> {
        let reply = self.call(args).await?;
        match reply.as_error() {
            Some(message) => Err(ClientError::Server {
                addr: self.addr,
                message: String::from_utf8_lossy(message).into_owned(),
            }),
            None => Ok(reply),
        }
    }
}
