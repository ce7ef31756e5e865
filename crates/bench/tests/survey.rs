//! A tiny survey against the real stack (`deploy/stack-up.sh`; `DATABASE_URL`, `REDIS_URL`,
//! `KAFKA_BROKERS`): every strategy at concurrency 1 and 8 on 300 orders. The strategies
//! the survey gets right, and the pipeline, must oversell nothing, wrongly refuse nothing
//! and leave their store consistent; the pipeline's PostgreSQL and Redis must agree; the
//! three files must hold a row per strategy × concurrency.

use clap::Parser;
use stock_bench::env::Stack;
use stock_bench::survey::{self, PgRedis, Strategy, SurveyArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    stack: Stack,
    #[command(flatten)]
    survey: SurveyArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_survey_of_every_strategy() {
    let out = std::env::temp_dir().join(format!("survey-test-{}", uuid::Uuid::new_v4().simple()));
    let out_arg = out.to_string_lossy().into_owned();
    let cli = Cli::try_parse_from([
        "survey-test",
        "--orders",
        "300",
        "--products",
        "20",
        "--concurrency",
        "1,8",
        "--out",
        &out_arg,
    ])
    .expect("arguments");
    let done = survey::run_survey(&cli.stack, &cli.survey)
        .await
        .expect("the survey runs (is the stack up? deploy/stack-up.sh)");

    let all = [
        Strategy::Pessimistic,
        Strategy::Optimistic,
        Strategy::Atomic,
        Strategy::RedisLua,
        Strategy::RedisLock,
        Strategy::RedisSharded,
        Strategy::Pipeline,
    ];
    assert_eq!(done.figures.len(), all.len() * 2);
    for f in &done.figures {
        assert_eq!(f.orders, 300, "{f:?}");
        assert_eq!(f.granted + f.refused, 300, "{f:?}");
        assert!(f.granted > 0 && f.refused > 0, "stock sells out: {f:?}");
        if matches!(
            f.strategy,
            Strategy::Pessimistic | Strategy::Atomic | Strategy::Pipeline
        ) {
            assert_eq!(f.oversold_units, 0, "{f:?}");
            assert_eq!(f.wrongly_refused, 0, "{f:?}");
            assert!(f.store_consistent, "{f:?}");
        }
        match f.strategy {
            Strategy::Pipeline => {
                assert_eq!(f.pg_redis, PgRedis::Compared { differing: 0 }, "{f:?}");
                assert!(f.pipeline_ok());
            }
            Strategy::Pessimistic | Strategy::Optimistic | Strategy::Atomic => {
                assert_eq!(f.pg_redis, PgRedis::PostgresOnly)
            }
            _ => assert_eq!(f.pg_redis, PgRedis::RedisOnly),
        }
    }
    // One client at a time: every strategy answers as a serial store would.
    let serial: Vec<usize> = done
        .figures
        .iter()
        .filter(|f| f.concurrency == 1)
        .map(|f| f.granted)
        .collect();
    assert!(serial.windows(2).all(|w| w[0] == w[1]), "{serial:?}");

    let csv = std::fs::read_to_string(out.join("survey.csv")).expect("survey.csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 1 + all.len() * 2, "{csv}");
    for s in all {
        for c in [1, 8] {
            let start = format!("{},{c},300,", s.name());
            assert!(
                rows.iter().any(|r| r.starts_with(&start)),
                "no row {start} in\n{csv}"
            );
        }
    }
    let md = std::fs::read_to_string(out.join("survey.md")).expect("survey.md");
    for s in all {
        assert!(
            md.contains(&format!("| {} |", s.name())),
            "{} missing from survey.md",
            s.name()
        );
    }
    assert!(
        md.contains("数据库悲观锁") && md.contains("## Command"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out.join("throughput.svg")).expect("throughput.svg");
    assert!(svg.starts_with("<svg") && svg.contains("redis-sharded"));
    std::fs::remove_dir_all(&out).ok();
}
