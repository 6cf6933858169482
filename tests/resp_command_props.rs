//! Property tests of typed commands: any argument list either parses or is refused with a
//! Redis-worded error (never a panic), and whatever parses encodes back to arguments that parse
//! to the same request.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tynamo::resp::command::Request;
use tynamo::resp::frame::{self, Limits};

/// Command names, as clients spell them.
const NAMES: &[&str] = &[
    "GET",
    "SET",
    "PING",
    "ECHO",
    "APPEND",
    "DEL",
    "EXISTS",
    "INCR",
    "MGET",
    "MSET",
    "INFO",
    "HELLO",
    "COMMAND",
    "CLUSTER",
    "READONLY",
    "READWRITE",
    "ASKING",
    "QUIT",
    "TYNAMO.SESSION",
    "TYNAMO.SEQ",
    "get",
    "set",
    "Cluster",
];

/// Arguments that steer the parser into every option and subcommand.
const WORDS: &[&str] = &[
    "NX",
    "XX",
    "GET",
    "EX",
    "PX",
    "EXAT",
    "PXAT",
    "KEEPTTL",
    "AUTH",
    "SETNAME",
    "COUNT",
    "DOCS",
    "INFO",
    "SLOTS",
    "SHARDS",
    "NODES",
    "KEYSLOT",
    "MYID",
    "SET",
    "INCR",
    "2",
    "3",
    "0",
    "1",
    "7",
    "-1",
    "99999999999999999999",
    "nx",
    "ex",
];

fn arg() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => prop::sample::select(WORDS).prop_map(|w| Bytes::from_static(w.as_bytes())),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from),
    ]
}

fn request_args() -> impl Strategy<Value = Vec<Bytes>> {
    let name = prop_oneof![
        9 => prop::sample::select(NAMES).prop_map(|w| Bytes::from_static(w.as_bytes())),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from),
    ];
    (name, proptest::collection::vec(arg(), 0..8)).prop_map(|(name, mut rest)| {
        rest.insert(0, name);
        rest
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_and_round_trips(args in request_args()) {
        match Request::parse(&args) {
            Err(e) => {
                // Every refusal is one line starting with an upper-case error code.
                let text = e.to_string();
                let code = text.split(' ').next().unwrap_or_default();
                prop_assert!(!code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase()), "{}", text);
            }
            Ok(request) => {
                let mut wire = BytesMut::new();
                request.encode(&mut wire);
                let mut decoded = Vec::new();
                prop_assert!(frame::decode_request(&mut wire, &Limits::DEFAULT, &mut decoded).unwrap());
                prop_assert!(wire.is_empty());
                prop_assert_eq!(Request::parse(&decoded), Ok(request));
            }
        }
    }
}
