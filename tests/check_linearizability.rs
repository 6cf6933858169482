//! The linearizability checker on hand-written histories, on random histories of a service that
//! is linearizable by construction, and on its budget limits.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tynamo::check::{
    check_history, read_history, write_history, CheckConfig, ClientId, JsonBytes, OpKind, Record,
    Status, Verdict,
};

#[allow(clippy::too_many_arguments)]
fn rec(
    client: u64,
    op: OpKind,
    key: &str,
    value: Option<&str>,
    invoke: u64,
    complete: Option<u64>,
    result: Option<&str>,
    status: Status,
) -> Record {
    Record {
        client: ClientId::Number(client),
        op,
        key: JsonBytes::from(key),
        value: value.map(JsonBytes::from),
        invoke,
        complete,
        result: result.map(JsonBytes::from),
        status,
    }
}

fn put(client: u64, key: &str, value: &str, invoke: u64, complete: u64) -> Record {
    rec(
        client,
        OpKind::Put,
        key,
        Some(value),
        invoke,
        Some(complete),
        None,
        Status::Ok,
    )
}

fn append(client: u64, key: &str, value: &str, invoke: u64, complete: u64) -> Record {
    rec(
        client,
        OpKind::Append,
        key,
        Some(value),
        invoke,
        Some(complete),
        None,
        Status::Ok,
    )
}

fn get(client: u64, key: &str, result: Option<&str>, invoke: u64, complete: u64) -> Record {
    rec(
        client,
        OpKind::Get,
        key,
        None,
        invoke,
        Some(complete),
        result,
        Status::Ok,
    )
}

fn delete(client: u64, key: &str, invoke: u64, complete: u64) -> Record {
    rec(
        client,
        OpKind::Delete,
        key,
        None,
        invoke,
        Some(complete),
        None,
        Status::Ok,
    )
}

fn check(history: &[Record]) -> Verdict {
    check_history(history, &CheckConfig::default()).verdict
}

fn assert_linearizable(history: &[Record]) {
    assert_eq!(check(history), Verdict::Linearizable, "{history:#?}");
}

fn assert_not_linearizable(history: &[Record], failing_key: &str) {
    match check(history) {
        Verdict::NotLinearizable { key, .. } => assert_eq!(key, JsonBytes::from(failing_key)),
        other => panic!("expected NotLinearizable on {failing_key}, got {other:?}"),
    }
}

#[test]
fn sequential_history_is_linearizable() {
    assert_linearizable(&[
        put(1, "k", "a", 0, 1),
        get(1, "k", Some("a"), 2, 3),
        append(1, "k", "b", 4, 5),
        get(1, "k", Some("ab"), 6, 7),
        delete(1, "k", 8, 9),
        get(1, "k", None, 10, 11),
        append(1, "k", "c", 12, 13),
        get(1, "k", Some("c"), 14, 15),
    ]);
}

#[test]
fn concurrent_reads_may_see_either_side_of_a_write() {
    // Both reads overlap the put and each other: the one that saw the old value may be ordered
    // first even though it returned later.
    assert_linearizable(&[
        put(1, "k", "old", 0, 1),
        put(2, "k", "new", 10, 20),
        get(3, "k", Some("new"), 11, 14),
        get(4, "k", Some("old"), 12, 13),
    ]);
    // But once a read that saw the new value completed, a later read may not go back.
    assert_not_linearizable(
        &[
            put(1, "k", "old", 0, 1),
            put(2, "k", "new", 10, 20),
            get(3, "k", Some("new"), 11, 12),
            get(4, "k", Some("old"), 13, 14),
        ],
        "k",
    );
}

#[test]
fn a_read_after_a_completed_write_must_see_it() {
    assert_not_linearizable(&[put(1, "k", "a", 0, 5), get(2, "k", None, 6, 7)], "k");
    // Touching intervals count as concurrent (calls sort before returns at equal times).
    assert_linearizable(&[put(1, "k", "a", 0, 5), get(2, "k", None, 5, 7)]);
}

#[test]
fn missing_and_empty_are_different_unless_configured() {
    let history = [put(1, "k", "", 0, 1), get(2, "k", None, 2, 3)];
    assert_not_linearizable(&history, "k");
    let config = CheckConfig {
        missing_equals_empty: true,
        ..CheckConfig::default()
    };
    assert_eq!(
        check_history(&history, &config).verdict,
        Verdict::Linearizable
    );
}

#[test]
fn timed_out_writes_may_or_may_not_have_applied() {
    let timed_out = rec(
        1,
        OpKind::Put,
        "k",
        Some("t"),
        5,
        None,
        None,
        Status::Timeout,
    );
    // Seen long after its call...
    assert_linearizable(&[timed_out.clone(), get(2, "k", Some("t"), 100, 101)]);
    // ...or never seen.
    assert_linearizable(&[timed_out.clone(), get(2, "k", None, 100, 101)]);
    // Seen, then not seen: impossible (a write applies at one point).
    assert_not_linearizable(
        &[
            timed_out.clone(),
            get(2, "k", Some("t"), 100, 101),
            get(2, "k", None, 102, 103),
        ],
        "k",
    );
    // But it cannot have applied before its call.
    assert_not_linearizable(&[timed_out, get(2, "k", Some("t"), 1, 2)], "k");
}

#[test]
fn failed_writes_are_known_not_applied() {
    let failed = rec(
        1,
        OpKind::Put,
        "k",
        Some("f"),
        0,
        Some(1),
        None,
        Status::Fail,
    );
    assert_linearizable(&[failed.clone(), get(2, "k", None, 2, 3)]);
    assert_not_linearizable(&[failed, get(2, "k", Some("f"), 2, 3)], "k");
}

#[test]
fn timed_out_reads_constrain_nothing() {
    let timed_out_get = rec(
        2,
        OpKind::Get,
        "k",
        None,
        2,
        None,
        Some("nonsense"),
        Status::Timeout,
    );
    assert_linearizable(&[put(1, "k", "a", 0, 1), timed_out_get]);
}

#[test]
fn the_smallest_failing_key_is_reported_with_its_operations() {
    let mut history = vec![
        // Key "big" fails with 4 operations.
        put(1, "big", "1", 0, 1),
        put(1, "big", "2", 2, 3),
        get(2, "big", Some("1"), 4, 5),
        get(2, "big", Some("2"), 6, 7),
        // Key "small" fails with 2 operations.
        put(3, "small", "x", 0, 1),
        get(3, "small", Some("y"), 2, 3),
    ];
    // Plus a healthy key.
    history.push(put(4, "fine", "v", 0, 1));
    history.push(get(4, "fine", Some("v"), 2, 3));
    match check(&history) {
        Verdict::NotLinearizable { key, ops } => {
            assert_eq!(key, JsonBytes::from("small"));
            assert_eq!(ops, vec![history[4].clone(), history[5].clone()]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn binary_keys_and_values_survive_the_file_format() {
    let key = JsonBytes::new(vec![0u8, 0xff, b'{']);
    let value = JsonBytes::new(vec![0xc3u8, 0x28]); // invalid UTF-8
    let history = vec![
        Record {
            client: ClientId::Number(1),
            op: OpKind::Put,
            key: key.clone(),
            value: Some(value.clone()),
            invoke: 0,
            complete: Some(1),
            result: None,
            status: Status::Ok,
        },
        Record {
            client: ClientId::Number(2),
            op: OpKind::Get,
            key: key.clone(),
            value: None,
            invoke: 2,
            complete: Some(3),
            result: Some(value),
            status: Status::Ok,
        },
    ];
    let mut file = Vec::new();
    write_history(&mut file, &history).unwrap();
    let text = String::from_utf8(file.clone()).unwrap();
    assert!(text.contains(r#""key":{"hex":"00ff7b"}"#), "{text}");
    let back = read_history(&file[..]).unwrap();
    assert_eq!(back, history);
    assert_eq!(check(&back), Verdict::Linearizable);
}

/// A service that applies each operation atomically at a random instant inside its interval:
/// linearizable by construction. Some operations time out (applied or not) or fail (not applied).
fn random_linearizable_history(
    seed: u64,
    clients: u64,
    ops_per_client: usize,
    keys: usize,
) -> Vec<Record> {
    random_history_with_mix(seed, clients, ops_per_client, keys, Mix::All)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    All,
    AppendsAndGets,
}

fn random_history_with_mix(
    seed: u64,
    clients: u64,
    ops_per_client: usize,
    keys: usize,
    mix: Mix,
) -> Vec<Record> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    struct Planned {
        record: Record,
        point: u64,
        applied: bool,
    }
    let mut planned = Vec::new();
    for client in 0..clients {
        let mut t = rng.gen_range(0..10u64);
        for i in 0..ops_per_client {
            let key = format!("k{}", rng.gen_range(0..keys));
            let invoke = t;
            // Unique linearization points: time * clients + client.
            let point = (invoke + rng.gen_range(0..20)) * clients + client;
            let complete = point / clients + rng.gen_range(1..20);
            let op = match (mix, rng.gen_range(0..10)) {
                (_, 0..=3) => OpKind::Get,
                (Mix::AppendsAndGets, _) => OpKind::Append,
                (Mix::All, 4..=5) => OpKind::Put,
                (Mix::All, 6..=8) => OpKind::Append,
                (Mix::All, _) => OpKind::Delete,
            };
            let value = match op {
                OpKind::Put | OpKind::Append => {
                    Some(JsonBytes::from(format!("c{client}i{i};").as_str()))
                }
                _ => None,
            };
            let fault_range = if std::env::var("NOFAULT").is_ok() {
                1000
            } else {
                20
            };
            let (status, applied) = match rng.gen_range(0..fault_range) {
                0 => (Status::Timeout, rng.gen_bool(0.5)),
                1 if op != OpKind::Get => (Status::Fail, false),
                _ => (Status::Ok, true),
            };
            planned.push(Planned {
                record: Record {
                    client: ClientId::Number(client),
                    op,
                    key: JsonBytes::from(key.as_str()),
                    value,
                    invoke,
                    complete: (status != Status::Timeout).then_some(complete),
                    result: None,
                    status,
                },
                point,
                applied,
            });
            // A client whose op timed out moves on (it gave up on it).
            t = complete + rng.gen_range(1..5);
        }
    }
    planned.sort_by_key(|p| p.point);
    let mut store: std::collections::HashMap<JsonBytes, Vec<u8>> = Default::default();
    for p in &mut planned {
        if !p.applied {
            continue;
        }
        let r = &mut p.record;
        match r.op {
            OpKind::Get => r.result = store.get(&r.key).map(|v| JsonBytes::new(v.clone())),
            OpKind::Put => {
                store.insert(r.key.clone(), r.value.as_ref().unwrap().0.to_vec());
            }
            OpKind::Append => store
                .entry(r.key.clone())
                .or_default()
                .extend_from_slice(&r.value.as_ref().unwrap().0),
            OpKind::Delete => {
                store.remove(&r.key);
            }
        }
    }
    let mut history: Vec<Record> = planned.into_iter().map(|p| p.record).collect();
    history.sort_by_key(|r| r.invoke);
    history
}

#[test]
fn random_histories_of_a_linearizable_service_pass() {
    for seed in 0..40 {
        let history = random_linearizable_history(seed, 6, 40, 3);
        let report = check_history(&history, &CheckConfig::default());
        assert_eq!(report.verdict, Verdict::Linearizable, "seed {seed}");
        let history = random_history_with_mix(seed, 6, 40, 2, Mix::AppendsAndGets);
        let report = check_history(&history, &CheckConfig::default());
        assert_eq!(
            report.verdict,
            Verdict::Linearizable,
            "seed {seed}, appends"
        );
    }
}

#[test]
fn a_corrupted_read_in_a_random_history_is_caught() {
    // Take correct histories and make one completed read return a value no write ever wrote.
    for seed in 0..20 {
        let mut history = random_linearizable_history(seed, 5, 30, 2);
        let Some(i) = history
            .iter()
            .position(|r| r.op == OpKind::Get && r.status == Status::Ok)
        else {
            continue;
        };
        history[i].result = Some(JsonBytes::from("never written"));
        let key = history[i].key.clone();
        match check(&history) {
            Verdict::NotLinearizable { key: failing, .. } => {
                assert_eq!(failing, key, "seed {seed}")
            }
            other => panic!("seed {seed}: {other:?}"),
        }
    }
}

#[test]
fn thousands_of_operations_on_one_key_check_within_the_step_budget() {
    // 8 clients x 500 ops on a single key: 4000 operations, about seven in flight at any time,
    // with puts, appends, deletes, timeouts and failures. (Measured: 20-35k steps; 10 clients
    // 0.15-0.7M; 12 clients up to millions.)
    let config = CheckConfig {
        steps_max_per_key: 400_000,
        memo_bytes_max_per_key: 1 << 30,
        time_budget: None,
        missing_equals_empty: false,
    };
    for seed in [0, 7] {
        let history = random_linearizable_history(seed, 8, 500, 1);
        let report = check_history(&history, &config);
        assert_eq!(report.verdict, Verdict::Linearizable, "seed {seed}");
        assert!(report.ops_checked > 3500, "{}", report.ops_checked);
    }
    // 10 clients x 400 ops, a seed measured at ~170k steps.
    let history = random_linearizable_history(1, 10, 400, 1);
    let report = check_history(&history, &config);
    assert_eq!(report.verdict, Verdict::Linearizable);

    // Appends only, 12 clients: pending reads pin the order of concurrent appends, so the
    // search takes about one step per operation.
    let history = random_history_with_mix(7, 12, 250, 1, Mix::AppendsAndGets);
    let report = check_history(&history, &config);
    assert_eq!(report.verdict, Verdict::Linearizable);
    assert!(
        report.steps < 3 * report.ops_checked as u64,
        "{} steps for {} ops",
        report.steps,
        report.ops_checked
    );
}

#[test]
fn an_exhausted_budget_gives_unknown_not_a_verdict() {
    let history = random_linearizable_history(3, 8, 50, 1);
    let config = CheckConfig {
        steps_max_per_key: 10,
        memo_bytes_max_per_key: 1 << 30,
        time_budget: None,
        missing_equals_empty: false,
    };
    match check_history(&history, &config).verdict {
        Verdict::Unknown { keys } => assert_eq!(keys, vec![JsonBytes::from("k0")]),
        other => panic!("{other:?}"),
    }
    let config = CheckConfig {
        steps_max_per_key: u64::MAX,
        memo_bytes_max_per_key: 1000,
        time_budget: None,
        missing_equals_empty: false,
    };
    assert!(matches!(
        check_history(&history, &config).verdict,
        Verdict::Unknown { .. }
    ));
}

#[test]
fn appends_seen_in_an_impossible_order_are_caught() {
    // Two reads, one after the other, see the two appends in opposite orders.
    assert_not_linearizable(
        &[
            append(1, "k", "a", 0, 10),
            append(2, "k", "b", 0, 10),
            get(3, "k", Some("ab"), 11, 12),
            get(3, "k", Some("ba"), 13, 14),
        ],
        "k",
    );
    // Reads during the appends may see a prefix of the final order only.
    assert_linearizable(&[
        append(1, "k", "a", 0, 10),
        append(2, "k", "b", 0, 10),
        get(3, "k", Some("b"), 1, 2),
        get(3, "k", Some("ba"), 11, 12),
    ]);
    assert_not_linearizable(
        &[
            append(1, "k", "a", 0, 10),
            append(2, "k", "b", 0, 10),
            get(3, "k", Some("a"), 1, 2),
            get(3, "k", Some("ba"), 11, 12),
        ],
        "k",
    );
    // A concurrent put may reset the value between the reads.
    assert_linearizable(&[
        append(1, "k", "a", 0, 10),
        append(2, "k", "b", 0, 10),
        get(3, "k", Some("a"), 1, 2),
        put(4, "k", "", 0, 10),
        get(3, "k", Some("b"), 11, 12),
    ]);
    // A timed-out put may too, but not before its call.
    let late_put = rec(
        4,
        OpKind::Put,
        "k",
        Some(""),
        5,
        None,
        None,
        Status::Timeout,
    );
    assert_linearizable(&[
        append(1, "k", "a", 0, 10),
        append(2, "k", "b", 0, 10),
        get(3, "k", Some("a"), 1, 2),
        late_put.clone(),
        get(3, "k", Some("b"), 11, 12),
    ]);
    assert_not_linearizable(
        &[
            append(1, "k", "a", 0, 3),
            append(2, "k", "b", 0, 3),
            get(3, "k", Some("a"), 1, 2),
            late_put,
            get(3, "k", Some("b"), 3, 4),
        ],
        "k",
    );
}

#[test]
fn an_operation_completing_at_the_end_of_time_is_still_checked() {
    // Completion time u64::MAX must not be mistaken for "timed out".
    let late_get = rec(
        1,
        OpKind::Get,
        "k",
        None,
        0,
        Some(u64::MAX),
        Some("nonsense"),
        Status::Ok,
    );
    let timed_out = rec(
        2,
        OpKind::Put,
        "k",
        Some("v"),
        0,
        None,
        None,
        Status::Timeout,
    );
    assert_not_linearizable(&[late_get.clone(), timed_out.clone()], "k");
    let mut fine = late_get;
    fine.result = Some(JsonBytes::from("v"));
    assert_linearizable(&[fine, timed_out]);
}

#[test]
fn concurrent_puts_cannot_be_seen_out_of_order_unless_a_put_intervenes() {
    let base = [
        put(1, "k", "a", 0, 10),
        put(2, "k", "b", 0, 10),
        get(3, "k", Some("a"), 11, 12),
        get(3, "k", Some("b"), 13, 14),
    ];
    assert_not_linearizable(&base, "k");
    // A third put of "b", concurrent with the second read, explains it.
    let mut explained = base.to_vec();
    explained.push(put(4, "k", "b", 12, 20));
    assert_linearizable(&explained);
    // So does a delete followed by an append of "b".
    let mut rebuilt = base.to_vec();
    rebuilt.push(delete(4, "k", 12, 13));
    rebuilt.push(append(5, "k", "b", 12, 13));
    assert_linearizable(&rebuilt);
}

#[test]
fn random_histories_with_many_clients_on_one_key_pass() {
    // Heavier concurrency than the other random test, on short histories.
    for seed in 0..30 {
        let history = random_linearizable_history(seed, 10, 12, 1);
        let report = check_history(&history, &CheckConfig::default());
        assert_eq!(report.verdict, Verdict::Linearizable, "seed {seed}");
    }
}
