//! Hostile input on the real stack (issue 9): messages too large to dead-letter whole,
//! readable orders that serde_json alone cannot read, control characters in logged values,
//! and secrets in malformed settings.

use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_e2e::harness::{self, created};
use stock_e2e::{header, read_topic, set_topic_config, sha256sum, TestEnv, WorkerProcess};

/// Long enough for a healthy pipeline; a stuck worker fails the test in this time.
const WAIT: Duration = Duration::from_secs(60);

fn item(product_id: i64, quantity: i64) -> Item {
    Item {
        product_id,
        quantity,
    }
}

/// Not JSON, `len` printable bytes drawn from a generator seeded by `seed`, so that a
/// truncated copy is told apart from another's prefix. Incompressible: the workers compress
/// their batches (LZ4), and a size limit on the wire is met by the compressed bytes, so a
/// repeating pattern of 150,000 bytes fits a 100,000-byte topic whole.
fn junk(len: usize, seed: u8) -> Vec<u8> {
    // splitmix64
    let mut x = 0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(u64::from(seed) + 1);
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            b'!' + (z % 90) as u8
        })
        .collect()
}

/// The dead letter of `original` among `dead`, found by its source offset's payload prefix.
fn dead_letter_of<'a>(dead: &'a [OwnedMessage], original: &[u8]) -> &'a OwnedMessage {
    dead.iter()
        .find(|m| {
            let p = m.payload().unwrap_or_default();
            !p.is_empty() && original.starts_with(p)
                || header(m, "dlq.original.sha256").as_deref() == Some(&sha256sum(original))
        })
        .unwrap_or_else(|| panic!("no dead letter for a {}-byte message", original.len()))
}

/// A dead letter that kept its message whole: same bytes, no truncation headers.
fn assert_whole(m: &OwnedMessage, original: &[u8], source_topic: &str) {
    assert_eq!(m.payload(), Some(original), "kept whole");
    assert_eq!(header(m, "dlq.truncated"), None);
    assert_eq!(header(m, "dlq.source.topic").as_deref(), Some(source_topic));
}

/// A dead letter that had to be cut: a prefix of the original, at most `limit` bytes on
/// the wire, with the original's size and digest, and its origin as usual.
fn assert_truncated(m: &OwnedMessage, original: &[u8], source_topic: &str, limit: usize) {
    let p = m.payload().unwrap_or_default();
    assert!(p.len() < original.len(), "cut ({} bytes)", p.len());
    let headers: usize = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        })
        .unwrap_or(0);
    let key = m.key().map_or(0, <[u8]>::len);
    assert!(
        p.len() + key + headers <= limit,
        "fits {limit} ({} bytes of payload, {key} of key, {headers} of headers)",
        p.len()
    );
    assert!(original.starts_with(p), "a prefix of the original");
    assert_eq!(header(m, "dlq.truncated").as_deref(), Some("true"));
    assert_eq!(
        header(m, "dlq.original.size"),
        Some(original.len().to_string())
    );
    assert_eq!(
        header(m, "dlq.original.sha256"),
        Some(sha256sum(original)),
        "digest of the whole original"
    );
    assert_eq!(header(m, "dlq.source.topic").as_deref(), Some(source_topic));
    assert!(header(m, "dlq.source.partition").is_some());
    assert!(header(m, "dlq.source.offset").is_some());
    assert!(header(m, "dlq.reason").is_some_and(|r| r.starts_with("not ")));
}

/// Hole 8, client limit: a 999,900-byte unreadable order fits on `orders` but its dead
/// letter (bytes plus headers) does not fit the producer's own `message.max.bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_message_over_the_client_limit_is_dead_lettered_truncated() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let under = junk(998_000, 1); // its dead letter still fits 1,000,000
    let over = junk(999_900, 2); // its dead letter does not
    env.send_orders(vec![("under".into(), under.clone())]).await;
    env.send_orders(vec![("over".into(), over.clone())]).await;
    env.send_orders(vec![("after".into(), created("after", &[item(1, 1)]))])
        .await;
    let ids: HashSet<String> = HashSet::from(["after".into()]);
    assert!(
        collector.wait_for(&ids, 1, WAIT).await,
        "the producer goes on after an oversized dead letter"
    );
    assert_eq!(
        collector.snapshot()["after"][0],
        StockResult::reserved("after")
    );
    let dead = read_topic(&env.kafka, &env.topics.dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2);
    assert_whole(dead_letter_of(&dead, &under), &under, &env.topics.orders);
    assert_truncated(
        dead_letter_of(&dead, &over),
        &over,
        &env.topics.orders,
        1_000_000,
    );
    workers.stop().await;
    collector.stop().await;
    env.cleanup().await;
}

/// Publishes one unreadable order alone, so that no other dead letter shares its batch
/// (a batch the broker refuses is cut as a whole), and reads the dead-letter topic from the
/// start until it holds `n` dead letters.
async fn dead_letter_alone(
    env: &TestEnv,
    sender: &FutureProducer,
    key: &str,
    bytes: &[u8],
    n: usize,
) -> Vec<OwnedMessage> {
    harness::publish(
        sender,
        &env.topics.orders,
        vec![(key.into(), bytes.to_vec())],
    )
    .await
    .expect("publish");
    let dead = read_topic(&env.kafka, &env.topics.dlq, n, WAIT).await;
    assert_eq!(dead.len(), n, "dead-lettered");
    dead
}

/// Hole 8, broker limit: the dead-letter topic takes at most 100,000 bytes
/// (`max.message.bytes`, of the compressed batch), `orders` takes 3 MB. Dead letters just
/// under the topic's limit go whole, and so does a repetitive one that is over it only as
/// written; over it (and over the client's limit too) they go truncated, and the producer
/// carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_message_over_the_dlq_topic_limit_is_dead_lettered_truncated() {
    let env = TestEnv::new().await;
    set_topic_config(
        &env.kafka,
        &env.topics.orders,
        &[("max.message.bytes", "3000000")],
    )
    .await;
    set_topic_config(
        &env.kafka,
        &env.topics.dlq,
        &[("max.message.bytes", "100000")],
    )
    .await;
    env.load_stock(&[(1, 10)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();
    let mut big_client = env.kafka.clone();
    big_client.options.push("message.max.bytes=3000000".into());
    let sender = stock_common::kafka::producer(&big_client).expect("producer");

    let under = junk(99_000, 3);
    let first = dead_letter_alone(&env, &sender, "under", &under, 1).await;
    assert_whole(&first[0], &under, &env.topics.orders);

    // Over the topic's limit as written, far under it compressed: it goes whole.
    let repetitive: Vec<u8> = b"not json at all "
        .iter()
        .copied()
        .cycle()
        .take(150_000)
        .collect();
    let second = dead_letter_alone(&env, &sender, "repetitive", &repetitive, 2).await;
    assert_whole(
        dead_letter_of(&second, &repetitive),
        &repetitive,
        &env.topics.orders,
    );

    let over_topic = junk(150_000, 4);
    let over_both = junk(1_500_000, 5);
    for (key, bytes) in [("over-topic", &over_topic), ("over-both", &over_both)] {
        harness::publish(
            &sender,
            &env.topics.orders,
            vec![(key.into(), bytes.clone())],
        )
        .await
        .expect("publish");
    }
    harness::publish(
        &sender,
        &env.topics.orders,
        vec![("after".into(), created("after", &[item(1, 1)]))],
    )
    .await
    .expect("publish");
    let ids: HashSet<String> = HashSet::from(["after".into()]);
    assert!(
        collector.wait_for(&ids, 1, WAIT).await,
        "the producer goes on after dead letters the topic refused whole"
    );
    let dead = read_topic(&env.kafka, &env.topics.dlq, 4, WAIT).await;
    assert_eq!(dead.len(), 4);
    for original in [&over_topic, &over_both] {
        assert_truncated(
            dead_letter_of(&dead, original),
            original,
            &env.topics.orders,
            100_000,
        );
    }
    workers.stop().await;
    collector.stop().await;
    env.cleanup().await;
}

/// Hole 8 for the consumer: unreadable `stock.deduct` messages over the client's and over
/// the dead-letter topic's limit are dead-lettered truncated, and the consumer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_dead_letters_oversized_deduct_messages_truncated() {
    let env = TestEnv::new().await;
    set_topic_config(
        &env.kafka,
        &env.topics.dlq,
        &[("max.message.bytes", "100000")],
    )
    .await;
    env.load_stock(&[(1, 10)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();
    let producer = stock_common::kafka::producer(&env.kafka).expect("producer");

    let under = junk(99_000, 6);
    let over_topic = junk(150_000, 7);
    let over_client = junk(999_900, 8);
    // Keyed like the order that follows, so that they share its deduct partition.
    for bytes in [&under, &over_topic, &over_client] {
        harness::publish(
            &producer,
            &env.topics.deduct,
            vec![("after".into(), bytes.clone())],
        )
        .await
        .expect("publish");
    }
    env.send_orders(vec![("after".into(), created("after", &[item(1, 1)]))])
        .await;
    let ids: HashSet<String> = HashSet::from(["after".into()]);
    assert!(
        collector.wait_for(&ids, 1, WAIT).await,
        "the consumer goes on after oversized dead letters"
    );
    assert_eq!(
        collector.snapshot()["after"][0],
        StockResult::reserved("after")
    );
    let dead = read_topic(&env.kafka, &env.topics.dlq, 3, WAIT).await;
    assert_eq!(dead.len(), 3);
    for m in &dead {
        assert_eq!(header(m, "dlq.worker").as_deref(), Some("consumer"));
    }
    for original in [&over_topic, &over_client] {
        assert_truncated(
            dead_letter_of(&dead, original),
            original,
            &env.topics.deduct,
            100_000,
        );
    }
    // The one under the limit may have shared a refused batch with the others: it is
    // dead-lettered, whole or cut, and in any case with its origin.
    let u = dead_letter_of(&dead, &under);
    assert_eq!(
        header(u, "dlq.source.topic").as_deref(),
        Some(env.topics.deduct.as_str())
    );
    workers.stop().await;
    env.assert_invariants(&[1]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// `depth` nested arrays around `inner`.
fn nested(depth: usize, inner: &str) -> String {
    format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Hole 10: readable orders whose other parts serde_json alone gives up on (a number out
/// of range, nesting deeper than its limit) are answered, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readable_orders_with_unreadable_parts_get_results() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let deep = nested(10_000, "1");
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let orders: Vec<(&str, String)> = vec![
        (
            "big-product",
            r#"{"type":"order_created","order_id":"big-product","items":[{"product_id":1e400,"quantity":1}]}"#.into(),
        ),
        (
            "big-quantity",
            r#"{"type":"order_created","order_id":"big-quantity","items":[{"product_id":1,"quantity":1e400}]}"#.into(),
        ),
        (
            "deep-items",
            format!(r#"{{"type":"order_created","order_id":"deep-items","items":[{{"product_id":{deep},"quantity":1}}]}}"#),
        ),
        (
            // An unknown field of an item is ignored like one of the event.
            "deep-item-extra",
            format!(r#"{{"type":"order_created","order_id":"deep-item-extra","items":[{{"product_id":1,"quantity":1,"x":{deep}}}]}}"#),
        ),
        (
            "deep-items-2",
            format!(r#"{{"type":"order_created","order_id":"deep-items-2","items":{deep}}}"#),
        ),
        (
            // Contract: unknown extra fields are ignored, however deep.
            "deep-extra",
            format!(r#"{{"extra":{deep},"type":"order_created","order_id":"deep-extra","items":[{{"product_id":1,"quantity":2}}],"more":{deep_object},"n":1e400}}"#),
        ),
        (
            "deep-extra-invalid",
            format!(r#"{{"extra":{deep},"type":"order_created","order_id":"deep-extra-invalid","items":[{{"product_id":1,"quantity":0}}]}}"#),
        ),
        (
            "deep-pay",
            format!(r#"{{"type":"order_paid","order_id":"deep-pay x","extra":{deep}}}"#),
        ),
    ];
    let mut msgs: Vec<(String, Vec<u8>)> = orders
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    // Not an event at all, however readable its start: still dead-lettered.
    msgs.push((
        "deep-junk".into(),
        format!(r#"{{"type":"order_created","order_id":"deep-junk","items":{deep}"#).into_bytes(),
    ));
    env.send_orders(msgs).await;

    let ids: HashSet<String> = [
        "big-product",
        "big-quantity",
        "deep-items",
        "deep-items-2",
        "deep-item-extra",
        "deep-extra",
        "deep-extra-invalid",
        "deep-pay x",
    ]
    .map(String::from)
    .into();
    let answered = collector.wait_for(&ids, 1, WAIT).await;
    let o = collector.snapshot();
    let dead = read_topic(
        &env.kafka,
        &env.topics.dlq,
        usize::MAX,
        Duration::from_secs(5),
    )
    .await;
    let dead_keys: Vec<String> = dead
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    assert!(
        answered,
        "every readable order answered; answered {:?}, dead-lettered {dead_keys:?}",
        o.keys().collect::<Vec<_>>()
    );
    for id in [
        "big-product",
        "big-quantity",
        "deep-items",
        "deep-items-2",
        "deep-extra-invalid",
    ] {
        assert_eq!(
            o[id][0],
            StockResult::rejected(id, Reason::InvalidOrder, None),
            "{id}"
        );
    }
    assert_eq!(o["deep-extra"][0], StockResult::reserved("deep-extra"));
    assert_eq!(
        o["deep-item-extra"][0],
        StockResult::reserved("deep-item-extra")
    );
    assert_eq!(
        o["deep-pay x"][0],
        StockResult::new(
            "deep-pay x",
            Status::Ignored,
            Some(Reason::NotReserved),
            None
        )
    );
    assert_eq!(dead_keys, vec!["deep-junk".to_owned()], "only the junk");
    workers.stop().await;
    let row = env.stock_row(1).await;
    assert_eq!((row.available, row.reserved), (7, 3));
    env.assert_invariants(&[1]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Hole 11: an order id with a newline, an ANSI escape and a NUL is logged by the real
/// producer binary (invalid order) into a file: the file holds neither raw byte, no line
/// starts with the forged text, and no colour codes are written to a non-terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_reach_the_text_log_raw() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10)]).await;
    let producer = WorkerProcess::spawn(&env.process_flags("producer"), &[]);
    // Outcomes of order_created are published by the consumer, from the ledger.
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    let collector = env.collector();

    let evil = "evil\nFORGED ERROR stock_producer: all stock given away\x1b[31m red\x00nul";
    env.send_orders(vec![(evil.into(), created(evil, &[item(1, 1)]))])
        .await;
    let ids: HashSet<String> = HashSet::from([evil.to_owned()]);
    assert!(collector.wait_for(&ids, 1, WAIT).await, "answered");
    assert_eq!(
        collector.snapshot()[evil][0],
        StockResult::rejected(evil, Reason::InvalidOrder, None)
    );
    let log_path = producer.log.clone();
    assert!(producer.terminate(), "clean exit");
    assert!(consumer.terminate(), "clean exit");
    let log = std::fs::read(&log_path).expect("log file");
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("invalid order"),
        "the order was logged:\n{text}"
    );
    assert!(!log.contains(&0x1b), "no raw ESC in the log:\n{text}");
    assert!(!log.contains(&0), "no raw NUL in the log:\n{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("FORGED")),
        "no forged line:\n{text}"
    );
    collector.stop().await;
    env.cleanup().await;
}

/// Runs `name` with `env` set and returns (exit code, stdout + stderr).
fn run_binary(name: &str, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(stock_e2e::binary(name))
        .args(args)
        .envs(env.iter().copied())
        .env("METRICS_ADDR", "off")
        .output()
        .expect("run binary");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// Hole 12: a malformed connection URL is refused without echoing its password, naming
/// the setting; `--help` does not show a URL's password from the environment either.
#[test]
fn malformed_urls_never_print_their_password() {
    for (bin, var, flag, bad) in [
        (
            "consumer",
            "DATABASE_URL",
            "--database-url",
            "postgres://u:s3cret@host:badport/db",
        ),
        (
            "producer",
            "REDIS_URL",
            "--redis-url",
            "redis://:s3cret@host:badport/0",
        ),
        (
            "consumer",
            "DATABASE_URL",
            "--database-url",
            "s3cret is not a url",
        ),
    ] {
        let (code, out) = run_binary(bin, &[(var, bad)], &[]);
        assert!(!out.contains("s3cret"), "{bin} printed the password: {out}");
        assert_eq!(code, Some(2), "{bin} refuses {var}: {out}");
        assert!(out.contains(flag), "{bin} names {flag}: {out}");
        let (_, out) = run_binary(bin, &[], &[&format!("{flag}={bad}")]);
        assert!(!out.contains("s3cret"), "{bin} printed the password: {out}");
    }
    // A well-formed URL is refused too when it carries a password on the command line,
    // where any user of the host can read it.
    for (bin, flag, good) in [
        (
            "consumer",
            "--database-url",
            "postgres://u:s3cret@host:5432/db",
        ),
        ("producer", "--redis-url", "redis://:s3cret@host:6379/0"),
    ] {
        let (code, out) = run_binary(bin, &[], &[&format!("{flag}={good}")]);
        assert_eq!(code, Some(2), "{bin} refuses a password in {flag}: {out}");
        assert!(out.contains(flag), "{bin} names {flag}: {out}");
        assert!(!out.contains("s3cret"), "{bin} printed the password: {out}");
    }
    for (bin, var, good) in [
        (
            "consumer",
            "DATABASE_URL",
            "postgres://u:s3cret@host:5432/db",
        ),
        ("producer", "REDIS_URL", "redis://:s3cret@host:6379/0"),
        ("producer", "KAFKA_OPTIONS", "sasl.password=s3cret"),
    ] {
        let (code, out) = run_binary(bin, &[(var, good)], &["--help"]);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            !out.contains("s3cret"),
            "{bin} --help printed the password: {out}"
        );
    }
}
