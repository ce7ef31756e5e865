//! Metrics, health and readiness endpoints, and secrets kept out of logs (issue 4).

use std::time::Duration;
use stock_common::events::Item;
use stock_e2e::harness::created;
use stock_e2e::{free_port, http_get, wait_until, TestEnv, WorkerProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_metrics_health_and_readiness() {
    let env = TestEnv::new().await; // Redis database empty: not loaded
    let (pport, cport) = (free_port(), free_port());
    let producer = WorkerProcess::spawn(
        &env.process_flags("producer")
            .set("--metrics-addr", format!("127.0.0.1:{pport}")),
        &[],
    );
    let consumer = WorkerProcess::spawn(
        &env.process_flags("consumer")
            .set("--metrics-addr", format!("127.0.0.1:{cport}")),
        &[],
    );
    assert!(
        wait_until(|| async {
            http_get(pport, "/healthz")
                .await
                .is_some_and(|(c, _)| c == 200)
        })
        .await
    );
    let (code, body) = http_get(pport, "/readyz").await.expect("readyz");
    assert_eq!(code, 503, "not ready while Redis is not loaded: {body}");
    assert!(body.contains("not loaded"), "{body}");
    assert!(
        wait_until(|| async {
            http_get(cport, "/readyz")
                .await
                .is_some_and(|(c, _)| c == 200)
        })
        .await
    );

    env.load_stock(&[(1, 1)]).await;
    assert!(
        wait_until(|| async {
            http_get(pport, "/readyz")
                .await
                .is_some_and(|(c, _)| c == 200)
        })
        .await
    );

    let item = Item {
        product_id: 1,
        quantity: 1,
    };
    env.send_orders(vec![
        ("m1".into(), created("m1", &[item])),
        ("m2".into(), created("m2", &[item])),
        ("junk".into(), b"junk".to_vec()),
    ])
    .await;
    let has = |port: u16, needle: &'static str| async move {
        http_get(port, "/metrics")
            .await
            .is_some_and(|(_, body)| body.contains(needle))
    };
    // Every order_created outcome is published by the consumer, from the ledger.
    assert!(wait_until(|| has(cport, r#"stockpipe_outcomes_total{reason="insufficient_stock",status="rejected",worker="consumer"} 1"#)).await);
    assert!(
        wait_until(|| has(
            pport,
            r#"stockpipe_dead_letters_total{worker="producer"} 1"#
        ))
        .await
    );
    assert!(
        wait_until(|| has(
            cport,
            r#"stockpipe_outcomes_total{reason="-",status="reserved",worker="consumer"} 1"#
        ))
        .await
    );
    for name in [
        "stockpipe_batch_size_bucket",
        "stockpipe_redis_script_seconds_bucket",
        r#"stockpipe_retries_total{cause="redis_unloaded",worker="producer"}"#,
        r#"stockpipe_compensations_total{stage="restored",worker="producer"} 0"#,
        "stockpipe_consumer_lag{topic=",
    ] {
        assert!(
            wait_until(|| has(pport, name)).await,
            "producer metrics lack {name}"
        );
    }
    let (_, metrics) = http_get(cport, "/metrics").await.expect("metrics");
    assert!(metrics.contains("stockpipe_apply_seconds_bucket"));

    assert!(producer.terminate());
    assert!(consumer.terminate());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_log() {
    let env = TestEnv::new().await;
    let secret = format!("s3cr3t-{}", env.id);
    let mut url = url::Url::parse(env.db.url.expose()).expect("url");
    url.set_password(Some(&secret)).expect("password");
    let flags = env
        .process_flags("consumer")
        .set("--database-url", url)
        .set("--migrate", true);
    let mut consumer = WorkerProcess::spawn(&flags, &[]);
    // It cannot log in: it must say so, and exit, without printing the password.
    let code = consumer.wait_exit(Duration::from_secs(60));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exits with an error, got {code:?}"
    );
    let log = std::fs::read_to_string(&consumer.log).expect("log");
    assert!(log.contains("***"), "the URL is shown masked: {log}");
    assert!(!log.contains(&secret), "password leaked: {log}");
    env.cleanup().await;
}
